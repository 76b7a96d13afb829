"""Video input: uniform frame sampling with decord, an OpenCV fallback, and checked limits.

Sampling rule: the N frames of a clip are cut into `num_frames` equal segments and the frame at
the centre of each is taken, index_k = floor((k + 1/2) * N / num_frames), k = 0..num_frames-1. The
samples cover the whole clip evenly and never sit on the first/last frame just by rounding (fades
and black leaders live there). A clip with fewer than `num_frames` frames repeats some, so the
model always gets exactly `num_frames`.

Limits (defaults sized for a public demo; every breach is a :class:`VideoError` whose message is
written for the user):
- file size <= 50 MB, checked from the file system before anything is opened or decoded;
- the container must be MP4/MOV, WebM/Matroska or AVI, told by its first bytes: FFmpeg would
  otherwise open anything it knows (playlists that name other files or URLs among them), and
  random bytes reached the size check as a "0×0" video;
- frame geometry from the container's metadata, before a frame is decoded, through the same
  :func:`model.inputs.check_geometry` as images: each side 14..8192 px, aspect ratio <= 8,
  at most 3840×2160 pixels (4K UHD) per frame;
- duration <= 120 s, from the container's frame count and frame rate, before sampled frames are
  decoded;
- 1 <= num_frames <= 16, default 8.
Frames are decoded one at a time and kept scaled down (shorter side 336 px, as
:func:`model.inputs.shrink`): decord scales them in FFmpeg as it decodes (16 frames of 3840×2160
took 107 MB over the process's start instead of 1.08 GB for the old full-size batch), OpenCV
decodes one full-size frame at a time and PIL scales it (193 MB). A result keeps 16 small frames
(<= 2.7 MB each).

Why a fallback: decord seeks straight to the sampled frames, so it is the fast path, but it has no
wheels for some platforms (dmlc/decord#213, #335), it trusts the container's frame count, and it
fails on some files OpenCV reads (a cut last frame stops it with an internal error). OpenCV
decodes sequentially and counts the frames it actually gets, so a container that promises more
frames than it holds is resampled over the real ones. A truncated WebM or AVI upload therefore
yields its readable part; a truncated MP4 (its index sits at the end) is rejected as unreadable.

decord quirk seen here (dmlc/decord#336): for frame widths of 8, 12, 16, 24, 48 and 72 px, decord
0.6.0 returns arrays of shape (H, W, C) with C = 12, 8, 6, 4, 4, 4. They are not RGBA: each row is
FFmpeg's row of W*3 RGB bytes plus alignment padding, and decord divides the padded row length by W.
Dropping a "4th channel" gives wrong pixels; :func:`decord_to_rgb` cuts the padding instead. Its
`get_batch` rejects such frames (a size check in its copy), so they are decoded one by one.

Writing clips (:func:`write_clip`, used for `assets/` examples and in tests): the codec follows the
file suffix. All three were checked here to write with the OpenCV wheel (no system ffmpeg) and to
read back through decord and OpenCV:
- `.webm`: VP8. Browsers play it, so `gr.Video` can preview it: the choice for example clips.
  OpenCV logs "tag 'VP80' is not supported ... webm" when it opens the writer; the message is
  harmless (it falls back to the codec id) and the file is fine.
- `.mp4`: MPEG-4 Part 2 (`mp4v`). Small and fast, but browsers do not play it (the OpenCV wheel
  has no H.264 encoder).
- `.avi`: Motion JPEG. Every frame is a key frame, the least loss and the largest files.

Import order matters: decord loads its own FFmpeg 4 and libvpx with RTLD_GLOBAL. Imported before
cv2 in a process, it shadows OpenCV's libvpx and OpenCV can no longer open VP8/VP9 writers (reading
is unaffected). So cv2 is imported first here, and `write_clip` says so when the writer fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2  # before decord: see "Import order matters" above

try:
    import decord
except ImportError:  # no wheel for this platform: OpenCV alone reads videos
    decord = None
import numpy as np
from PIL import Image

from .inputs import MIN_IMAGE_SIDE_PX, InputError, check_geometry, check_upload, kept_size, shrink

DEFAULT_NUM_FRAMES = 8
MAX_NUM_FRAMES = 16
MAX_VIDEO_BYTES = 50 * 2**20
MAX_DURATION_S = 120.0
MAX_FRAME_PIXELS = 3840 * 2160
MAX_FRAME_SIDE_PX = 8192
# First bytes of the containers read here: (offset, magic).
CONTAINERS = {"mp4": (4, b"ftyp"), "webm": (0, b"\x1a\x45\xdf\xa3"), "avi": (8, b"AVI ")}
UNREADABLE = ("This file could not be read as a video: it is not a video, or it is damaged, truncated or has no "
              "frames, or its codec is not supported. Try an MP4, WebM or AVI file.")
CODECS = {".webm": "VP80", ".mp4": "mp4v", ".avi": "MJPG"}

log = logging.getLogger(__name__)

# decord signals failure with any of these, depending on which layer (C++, ctypes, Python) noticed.
_DECORD_ERRORS = (RuntimeError, AssertionError, IndexError, StopIteration,
                  *((decord.DECORDError,) if decord else ()))


class VideoError(InputError):
    """Bad video input; the message is written for the user. An InputError, so the UI shows it."""


class _DecodeFailed(Exception):
    """One backend could not read the file; the next one gets a try."""


@dataclass(frozen=True)
class VideoFrames:
    frames: list[Image.Image]  # RGB, in clip order, scaled down by model.inputs.shrink
    indices: list[int]  # frame index of each entry of `frames`
    fps: float
    total_frames: int  # frames in the clip (as counted by the backend that decoded it)
    duration_s: float
    width: int  # of the decoded frames, before shrink
    height: int
    backend: str  # "decord" or "opencv"


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Centres of `num_frames` equal segments of range(total) (integer arithmetic: exact)."""
    return [(2 * k + 1) * total // (2 * num_frames) for k in range(num_frames)]


def decord_to_rgb(frames: np.ndarray) -> np.ndarray:
    """decord's (T, H, W, C) uint8 output -> (T, H, W, 3) RGB.

    C > 3 means padded rows (dmlc/decord#336, see the module docstring): the first W*3 bytes of
    each row are the pixels. C = 1 is grey.
    """
    count, height, width, channels = frames.shape
    if channels == 3:
        return frames
    if channels == 1:
        return np.repeat(frames, 3, axis=-1)
    if channels < 3:
        raise _DecodeFailed(f"decord returned {channels}-channel frames")
    return np.ascontiguousarray(frames.reshape(count, height, width * channels)[:, :, : width * 3]).reshape(
        count, height, width, 3)


def read_frames(path, num_frames: int = DEFAULT_NUM_FRAMES, *, max_frames: int = MAX_NUM_FRAMES,
                max_bytes: int = MAX_VIDEO_BYTES, max_duration_s: float = MAX_DURATION_S,
                min_side_px: int = MIN_IMAGE_SIDE_PX, backend: str = "auto") -> VideoFrames:
    """`num_frames` frames sampled uniformly from the video at `path` (rule in the module docstring).

    backend: "auto" (decord, then OpenCV if decord fails), "decord" or "opencv" (one only).
    Raises VideoError, with a message for the user, for anything wrong with the input.
    """
    if not 1 <= num_frames <= max_frames or int(num_frames) != num_frames:
        raise VideoError(f"Choose a whole number of frames from 1 to {max_frames} (got {num_frames}).")
    path = check_upload(path, "video", max_bytes, VideoError)
    if not is_container(path):
        raise VideoError(UNREADABLE)
    size = _probe_size(path)
    check_geometry(*size, "video", MAX_FRAME_PIXELS, max_side=MAX_FRAME_SIDE_PX, min_side=min_side_px,
                   error=VideoError)
    readers = {"auto": (_read_decord, _read_opencv), "decord": (_read_decord,),
               "opencv": (_read_opencv,)}[backend]
    check = partial(_check_limits, max_duration_s=max_duration_s)
    for reader in readers:
        try:
            return reader(path, int(num_frames), check, size)
        except _DecodeFailed as failure:
            log.info("%s could not read %s: %s", reader.__name__, path.name, failure)
    raise VideoError(UNREADABLE)


def is_container(path: Path) -> bool:
    """Whether the file starts like one of :data:`CONTAINERS`."""
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[offset:offset + len(magic)] == magic for offset, magic in CONTAINERS.values())


def _probe_size(path: Path) -> tuple[int, int]:
    """Frame width and height as stored (not turned by rotation metadata, as decord reads them),
    from the container's metadata: OpenCV decodes no frame for this, so the geometry is checked
    before decord or OpenCV decode a full-size frame."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) if capture.isOpened() else 0
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) if capture.isOpened() else 0
    finally:
        capture.release()
    if width <= 0 or height <= 0:
        raise VideoError(UNREADABLE)
    return width, height


def _check_limits(total: int, fps: float, *, max_duration_s: float) -> float:
    """Raise VideoError if the clip breaks a limit; return its duration in seconds."""
    if total <= 0:
        raise VideoError("The video has no frames.")
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError("The video does not state a valid frame rate, so its length cannot be checked.")
    duration = total / fps
    if duration > max_duration_s:
        raise VideoError(f"The video is too long ({duration:.0f} s; at most {max_duration_s:.0f} s). "
                         "Trim it and try again.")
    return duration


def _kept(rgb: np.ndarray) -> Image.Image:
    """One decoded RGB frame as the small picture a result keeps."""
    return shrink(Image.fromarray(rgb))


def _read_decord(path: Path, num_frames: int, check, size: tuple[int, int]) -> VideoFrames:
    if decord is None:
        raise _DecodeFailed("decord is not installed")
    width, height = kept_size(size) if kept_size(size) != size else (-1, -1)  # -1: as stored
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height)
        total, fps = len(reader), reader.get_avg_fps()
        duration = check(total, fps)
        indices = sample_indices(total, num_frames)
        # One frame at a time: also how padded rows come through (module docstring).
        kept = {i: _kept(decord_to_rgb(reader[i].asnumpy()[None])[0]) for i in sorted(set(indices))}
    except _DECORD_ERRORS as error:
        raise _DecodeFailed(f"{type(error).__name__}: {str(error).strip()[:300]}") from error
    return VideoFrames([kept[i] for i in indices], indices, fps, total, duration, *size, "decord")


def _read_opencv(path: Path, num_frames: int, check, size: tuple[int, int]) -> VideoFrames:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise _DecodeFailed("OpenCV could not open the file")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    check(total, fps)
    indices = sample_indices(total, num_frames)
    frames, decoded = _opencv_decode(path, indices)
    if len(frames) < len(set(indices)):
        # The container promised more frames than the stream holds: sample the ones that exist.
        if decoded == 0:
            raise _DecodeFailed("OpenCV decoded no frame")
        total, indices = decoded, sample_indices(decoded, num_frames)
        frames, _ = _opencv_decode(path, indices)
        if len(frames) < len(set(indices)):
            raise _DecodeFailed(f"OpenCV decoded {len(frames)} of the {len(set(indices))} frames it counted")
    return VideoFrames([frames[i] for i in indices], indices, fps, total, total / fps, *size, "opencv")


def _opencv_decode(path: Path, indices: list[int]) -> tuple[dict[int, Image.Image], int]:
    """Kept frames (:func:`_kept`) at `indices` and the number of frames read, stopping after the
    last one wanted.

    Reads sequentially, because OpenCV's seeking lands on the wrong frame with many codecs; the
    frames in between are only grabbed, not converted.
    """
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    wanted, frames, position = set(indices), {}, 0
    try:
        while position <= max(indices) and capture.grab():
            if position in wanted:
                ok, bgr = capture.retrieve()
                if not ok:
                    break
                frames[position] = _kept(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            position += 1
    finally:
        capture.release()
    return frames, position


def write_clip(path, frames, fps: float = 4) -> Path:
    """Write `frames` (PIL images or uint8 arrays: RGB, RGBA or grey) as a video at `path`.

    The codec follows the suffix (.webm VP8, .mp4 mp4v, .avi MJPG; see the module docstring). All
    frames must share one size; the 4:2:0 codecs drop the last row/column of an odd side.
    """
    path = Path(path)
    codec = CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"write_clip writes {', '.join(CODECS)} files, not {path.name!r}")
    rgb = [np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else
                      Image.fromarray(np.asarray(frame)).convert("RGB")) for frame in frames]
    if not rgb:
        raise ValueError("write_clip needs at least one frame")
    height, width = rgb[0].shape[:2]
    if any(frame.shape[:2] != (height, width) for frame in rgb):
        # OpenCV would silently drop the frames of another size.
        raise ValueError("all frames of a clip must have the same size")
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open a {codec} writer for {path.name}. If decord was imported "
                           "before cv2 in this process, its bundled libvpx breaks OpenCV's WebM encoder: "
                           "import cv2 first, or write .mp4/.avi.")
    try:
        for frame in rgb:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
