"""Video input layer: sampling, both decoders, the limits and every rejection, on clips written here.

Each synthetic frame carries its own number in five black/white stripes (binary, robust to any
codec) and a 16 px square that moves right and cycles red/green/blue, so a decoded frame tells
which frame it was and whether its colours and position survived.
"""

from __future__ import annotations

from functools import partial

import cv2
import decord
import numpy as np
import pytest
from PIL import Image

from model import video
from model.video import VideoError, decord_to_rgb, read_frames, sample_indices, write_clip

BITS = 5
SQUARE = 16
COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230)]  # RGB; frame i uses COLOURS[i % 3]
SUFFIXES = [".webm", ".mp4", ".avi"]


def make_frame(i: int, width: int = 64, height: int = 48) -> np.ndarray:
    frame = np.full((height, width, 3), 128, np.uint8)
    stripe = width // BITS
    for bit in range(BITS):  # most significant bit on the left
        frame[: height // 3, bit * stripe:(bit + 1) * stripe] = 255 * (i >> (BITS - 1 - bit) & 1)
    x = square_x(i, width)
    frame[height // 2: height // 2 + SQUARE, x:x + SQUARE] = COLOURS[i % 3]
    return frame


def square_x(i: int, width: int) -> int:
    return 2 * i % (width - SQUARE)


def frame_number(frame: np.ndarray) -> int:
    height, width = frame.shape[:2]
    stripe = width // BITS
    bits = [frame[height // 6, bit * stripe + stripe // 2].mean() > 128 for bit in range(BITS)]
    return int("".join("1" if bit else "0" for bit in bits), 2)


def assert_frame(image: Image.Image, i: int) -> None:
    """`image` is frame i: its number, and its square's colour and place (codec loss allowed)."""
    frame = np.asarray(image)
    assert frame_number(frame) == i
    height, width = frame.shape[:2]
    centre = frame[height // 2 + SQUARE // 2, square_x(i, width) + SQUARE // 2].astype(int)
    assert np.abs(centre - COLOURS[i % 3]).max() < 40, (i, centre)


def clip(path, count: int = 24, width: int = 64, height: int = 48, fps: float = 4):
    return write_clip(path, [make_frame(i, width, height) for i in range(count)], fps=fps)


def truncated(folder, suffix):
    path = clip(folder / f"cut{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {suffix: clip(folder / f"clip{suffix}") for suffix in SUFFIXES}


def test_sampling_rule():
    assert sample_indices(24, 8) == [1, 4, 7, 10, 13, 16, 19, 22]
    assert sample_indices(10, 1) == [5]
    assert sample_indices(3, 5) == [0, 0, 1, 2, 2]  # short clips repeat frames
    for total in range(1, 40):
        for count in range(1, 17):
            indices = sample_indices(total, count)
            assert len(indices) == count and indices == sorted(indices)
            assert 0 <= indices[0] <= indices[-1] < total


@pytest.mark.parametrize("backend", ["decord", "opencv"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_reads_sampled_frames(clips, suffix, backend):
    result = read_frames(clips[suffix], 8, backend=backend)
    assert result.backend == backend
    assert result.indices == [1, 4, 7, 10, 13, 16, 19, 22]
    assert (result.total_frames, result.fps, result.duration_s) == (24, 4.0, 6.0)
    assert (result.width, result.height) == (64, 48)
    assert len(result.frames) == 8
    for image, i in zip(result.frames, result.indices):
        assert image.mode == "RGB" and image.size == (64, 48)
        assert_frame(image, i)


def test_short_clip_repeats_frames(tmp_path):
    result = read_frames(clip(tmp_path / "short.webm", count=5), 16)
    assert result.indices == sample_indices(5, 16) and len(result.frames) == 16
    for image, i in zip(result.frames, result.indices):
        assert_frame(image, i)


def test_decord_padded_rows_are_unpadded(tmp_path):
    """A real 48 px wide clip: decord 0.6.0 hands its frames over as (48, 48, 4) (dmlc/decord#336)."""
    path = clip(tmp_path / "w48.avi", count=6, width=48, height=48)
    assert decord.VideoReader(str(path))[0].shape == (48, 48, 4)  # the quirk is still there
    result = read_frames(path, 3, backend="decord")
    assert result.backend == "decord" and (result.width, result.height) == (48, 48)
    for image, i in zip(result.frames, result.indices):
        assert_frame(image, i)


def test_decord_to_rgb_cuts_row_padding():
    rgb = np.random.RandomState(0).randint(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    padded = np.zeros((2, 5, 6 * 4), np.uint8)
    padded[:, :, : 6 * 3] = rgb.reshape(2, 5, 6 * 3)  # decord's layout: W*3 pixel bytes, then padding
    np.testing.assert_array_equal(decord_to_rgb(padded.reshape(2, 5, 6, 4)), rgb)
    np.testing.assert_array_equal(decord_to_rgb(rgb), rgb)


def test_decord_to_rgb_expands_grey():
    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4, 1)
    out = decord_to_rgb(grey)
    assert out.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(out, np.broadcast_to(grey, (2, 3, 4, 3)))


def test_falls_back_to_opencv_without_decord(clips, monkeypatch):
    monkeypatch.setattr(video, "decord", None)
    result = read_frames(clips[".mp4"])  # default: 8 frames
    assert result.backend == "opencv" and result.indices == sample_indices(24, 8)
    for image, i in zip(result.frames, result.indices):
        assert_frame(image, i)


@pytest.mark.parametrize("suffix, backend", [(".webm", "decord"), (".avi", "opencv")])
def test_truncated_stream_gives_the_frames_that_decode(tmp_path, suffix, backend):
    """Half a WebM/AVI still opens; its container promises 24 frames. On the AVI, decord stops
    with an internal error on the cut frame and OpenCV takes over; both sample what exists."""
    result = read_frames(truncated(tmp_path, suffix), 4)
    assert result.backend == backend
    assert 0 < result.total_frames < 24 and result.indices == sample_indices(result.total_frames, 4)
    for image, i in zip(result.frames, result.indices):
        assert_frame(image, i)


def test_write_clip_takes_pil_and_rgba_frames(tmp_path):
    rgba = np.dstack([make_frame(2), np.full((48, 64), 9, np.uint8)])
    frames = [Image.fromarray(make_frame(0)), make_frame(1), rgba]
    result = read_frames(write_clip(tmp_path / "mixed.avi", frames), 3)
    for image, i in zip(result.frames, [0, 1, 2]):
        assert_frame(image, i)


def test_write_clip_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="webm"):
        write_clip(tmp_path / "clip.gif", [make_frame(0)])
    with pytest.raises(ValueError, match="same size"):
        write_clip(tmp_path / "clip.mp4", [make_frame(0), make_frame(1, width=32)])
    with pytest.raises(ValueError, match="at least one"):
        write_clip(tmp_path / "clip.mp4", [])


def missing(folder):
    return folder / "nope.mp4"


def zero_bytes(folder):
    (folder / "empty.mp4").touch()
    return folder / "empty.mp4"


def text_file(folder):
    (folder / "notes.mp4").write_text("not a video\n" * 50)
    return folder / "notes.mp4"


def no_frames(folder, suffix):
    """A writer opened and closed at once: a valid container with an empty stream."""
    path = folder / f"none{suffix}"
    fourcc = cv2.VideoWriter_fourcc(*video.CODECS[suffix])
    cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, fourcc, 4, (64, 48)).release()
    assert path.stat().st_size > 0
    return path


@pytest.mark.parametrize("make, message", [
    (missing, "not found: nope.mp4"),
    (zero_bytes, "empty \\(0 bytes\\)"),
    (text_file, "could not be read as a video"),
    (partial(truncated, suffix=".mp4"), "could not be read as a video"),  # its index is at the end
    (partial(no_frames, suffix=".avi"), "has no frames"),
    (partial(no_frames, suffix=".mp4"), "could not be read as a video"),
], ids=["missing", "zero-bytes", "text", "truncated.mp4", "no-frames.avi", "no-frames.mp4"])
def test_unreadable_files(tmp_path, make, message):
    with pytest.raises(VideoError, match=message):
        read_frames(make(tmp_path))


@pytest.mark.parametrize("backend", ["decord", "opencv"])
def test_rejects_tiny_video(tmp_path, backend):
    with pytest.raises(VideoError, match=r"too small \(8×8\); each side needs at least 14 pixels"):
        read_frames(clip(tmp_path / "tiny.avi", count=4, width=8, height=8), backend=backend)


@pytest.mark.parametrize("backend", ["decord", "opencv"])
def test_duration_limit(clips, backend):
    with pytest.raises(VideoError, match=r"too long \(6 s; at most 5 s\)"):
        read_frames(clips[".mp4"], max_duration_s=5, backend=backend)
    assert read_frames(clips[".mp4"], 2, max_duration_s=6, backend=backend).duration_s == 6.0


def test_byte_limit_is_checked_before_decoding(tmp_path, clips):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(2000))  # not a video: only the size check can name the problem
    with pytest.raises(VideoError, match=r"too large \(0.0 MB; at most 0 MB\)"):
        read_frames(junk, max_bytes=1000)
    size = clips[".mp4"].stat().st_size
    with pytest.raises(VideoError, match="too large"):
        read_frames(clips[".mp4"], max_bytes=size - 1)
    assert read_frames(clips[".mp4"], 1, max_bytes=size).indices == [12]


@pytest.mark.parametrize("count", [0, 17, 2.5, -1])
def test_rejects_frame_counts_out_of_range(clips, count):
    with pytest.raises(VideoError, match=f"from 1 to 16 \\(got {count}\\)"):
        read_frames(clips[".mp4"], count)

