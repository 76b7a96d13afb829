"""Bad input: every case is a readable message, and the server keeps serving afterwards."""

from __future__ import annotations

import io
import struct
from pathlib import Path
import zlib

import numpy as np
import pytest
from PIL import Image

from duet_viz.ui import App
from model.inputs import InputError, check_question, load_image

from .test_app import EXAMPLE, QUESTION


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with almost no data (never decoded)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name,make,message", [
    ("text.png", lambda: b"this is not an image, just text\n" * 20, "not an image"),
    ("zero.png", lambda: b"", "empty"),
    ("truncated.png", lambda: png_bytes(Image.new("RGB", (200, 200), (9, 80, 200)).effect_spread(5))[:400],
     "damaged or truncated"),
    ("truncated.jpg", lambda: _jpeg(Image.effect_noise((300, 300), 60).convert("RGB"))[:1500], "damaged or truncated"),
    ("bomb.png", lambda: bomb_png(30_000, 30_000), "too large"),
    ("big.png", lambda: bomb_png(7_000, 7_000), "too large"),
    ("one.png", lambda: png_bytes(Image.new("RGB", (1, 1))), "too small"),
    ("thin.png", lambda: png_bytes(Image.new("RGB", (13, 400))), "too small"),
    ("html.jpg", lambda: b"<html><body>hello</body></html>", "not an image"),
])
def test_bad_image_files_get_a_readable_message(tmp_path, name, make, message):
    with pytest.raises(InputError, match=message):
        load_image(write(tmp_path / name, make()))


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_missing_file_and_byte_limit(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")
    path = write(tmp_path / "ok.png", png_bytes(Image.new("RGB", (64, 64))))
    with pytest.raises(InputError, match="too large"):
        load_image(path, max_bytes=10)


@pytest.mark.parametrize("make", [
    lambda: Image.new("L", (40, 30), 128),
    lambda: Image.new("CMYK", (40, 30), (0, 255, 0, 0)),
    lambda: Image.new("RGBA", (40, 30), (255, 0, 0, 0)),
    lambda: Image.new("LA", (40, 30), (10, 255)),
    lambda: Image.fromarray(np.linspace(0, 65535, 40 * 30, dtype=np.uint16).reshape(30, 40)),
    lambda: Image.new("P", (40, 30)),
    lambda: Image.fromarray(np.linspace(-1, 1, 40 * 30, dtype=np.float32).reshape(30, 40)),
    lambda: Image.new("1", (40, 30), 1),
])
def test_every_image_mode_becomes_8bit_rgb(tmp_path, make):
    image = make()
    path = tmp_path / "in.tiff"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)


def test_alpha_is_composited_on_white_and_16bit_keeps_contrast(tmp_path):
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((5, 5)) == (255, 255, 255)
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 32, dtype=np.uint16), (20, 1)))
    ramp.save(tmp_path / "ramp.png")
    row = np.asarray(load_image(tmp_path / "ramp.png"))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 200, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 60)


@pytest.mark.parametrize("question,message", [
    ("", "Type a question"), ("   \n\t ", "Type a question"), ("why " * 400, "too long"),
    ("what \ud800 is it", r"holds a character that is not text \(U\+D800, at position 6\)"),
])
def test_bad_questions(question, message):
    with pytest.raises(InputError, match=message):
        check_question(question)


def test_question_token_limit(engine):
    with pytest.raises(InputError, match="tokens"):
        check_question("? " * 300, engine.tokenizer)
    assert check_question("  what   color ?\nAnswer in a word. ", engine.tokenizer) == "what   color ?\nAnswer in a word."


# ------------------------------------------------------------------ through the served app
def run_args(image, **overrides):
    from gradio_client import handle_file

    args = dict(image=handle_file(str(image)), question=QUESTION, method="duet", budget="64", custom=96,
                compare=[], k1=None, k2=None, cluster_width=4, stage_layers="", stage_ratios="", salient="",
                max_new_tokens=2, layer=0, video=None, num_frames=8)
    args.update(overrides)
    return list(args.values())


@pytest.mark.parametrize("overrides,message", [
    (dict(method="nope"), "not in the list of choices"),
    (dict(compare=["full", "bogus"]), "not in the list of choices"),
    (dict(budget="0"), "not in the list of choices"),
    (dict(budget="custom", custom=0), "less than minimum value 1"),
    (dict(budget="custom", custom=5000), "greater than maximum value 576"),
    (dict(k1=500, k2=200), "k1 \\+ k2 must lie in 1..576"),
    (dict(k1=-3), "less than minimum value 0"),
    (dict(stage_layers="16,99", stage_ratios="0.5,0"), "stage layers must be increasing"),
    (dict(stage_layers="16", stage_ratios="1.5"), "ratios must lie in"),
    (dict(stage_layers="16,24", stage_ratios="a,b"), "Keep ratios must be numbers separated by commas"),
    (dict(stage_layers="16,x"), "Stage layers must be whole numbers separated by commas"),
    (dict(stage_layers="16.5,24"), "Stage layers must be whole numbers"),
    (dict(k1=10**400), "k1 must be a whole number from 0 to 576 \\(got a number too large to be one\\)"),
    (dict(k1=1.5), "must be a whole number \\(got 1.5\\)"),
    (dict(salient="x " * 1000), "at most 200 characters"),  # longer fields stop at the guard (test_guard)
    (dict(compare=["full"] * 300), "takes a list of methods"),
    (dict(stage_layers="16,24", stage_ratios="0.5"), "given together"),
    (dict(cluster_width=-2), "less than minimum value 0"),
    (dict(question="   "), "Type a question"),
    (dict(question="x" * 1500), "too long"),
    (dict(max_new_tokens=1000), "greater than maximum value 64"),
])
def test_api_rejects_bad_requests_and_keeps_serving(client, overrides, message):
    with pytest.raises(Exception, match=message):
        client.predict(*run_args(EXAMPLE, **overrides), api_name="/run")
    assert client.predict(*run_args(EXAMPLE), api_name="/run")[4]["data"][0][0] == "duet"


def test_api_rejects_non_image_upload(client, tmp_path):
    bad = write(tmp_path / "notes.png", b"hello, I am text")
    with pytest.raises(Exception, match="not an image"):
        client.predict(*run_args(bad), api_name="/run")


def test_overlay_before_any_run_is_a_message(served):
    from gradio_client import Client

    with pytest.raises(Exception, match="press Run"):
        Client(served, verbose=False).predict(None, 3, 0, api_name="/overlay")  # fresh session: no result


def test_result_cache_is_bounded_and_cleans_its_files(engine):
    app = App(engine, max_results=2, session_share=1.0)  # the global bound alone (shares: test_hostile)
    keys = []
    for n_tokens in range(1, 5):  # distinct requests: a repeated one would reuse its result
        outputs = app.run(str(EXAMPLE), QUESTION, "duet", "64", 96, ["full"], None, None, 4, "", "", "", n_tokens, 0)
        keys.append(outputs[0])
        app.overlay(keys[-1], "duet", 3)
    assert list(app.results) == keys[-2:]
    files = sorted(p.name for p in Path(app.workdir.name).iterdir())
    assert all(any(k in name for k in keys[-2:]) for name in files) and len(files) == 4
    with pytest.raises(Exception, match="press Run"):
        app.recall(keys[0])


def tiff_directory(entries: list[tuple[int, int, int, int]], start: int) -> bytes:
    """A little-endian TIFF directory at offset ``start`` (no next directory)."""
    return struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"


def amplifying_tiff(tags: int, blob: int) -> bytes:
    """A valid 64 x 64 grey TIFF whose directory also holds ``tags`` private tags that all point at
    one ``blob``-byte block: PIL reads the block once per tag when it opens the file."""
    n = 8 + tags
    pixels_at = 8 + 2 + 12 * n + 4
    blob_at = pixels_at + 64 * 64
    entries = [(256, 3, 1, 64), (257, 3, 1, 64), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, pixels_at), (278, 3, 1, 64), (279, 4, 1, 64 * 64)]
    entries += [(40000 + k, 7, blob, blob_at) for k in range(tags)]
    return b"II*\0" + struct.pack("<I", 8) + tiff_directory(entries, 8) + bytes(range(64)) * 64 + b"\x07" * blob


def amplifying_exif(tags: int, blob: int) -> bytes:
    """An EXIF block (TIFF header on) whose directory points ``tags`` tags at one ``blob``-byte block."""
    blob_at = 8 + 2 + 12 * tags + 4
    return b"II*\0" + struct.pack("<I", 8) + tiff_directory([(40000 + k, 7, blob, blob_at) for k in range(tags)], 8) \
        + b"\x07" * blob


def peak_bytes(call) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    except InputError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_tiff_whose_tags_all_point_at_one_blob_is_refused_before_pil_reads_them(tmp_path):
    path = write(tmp_path / "amp.tif", amplifying_tiff(tags=120, blob=400_000))
    with pytest.raises(InputError, match="declares 45.8 MB of data in a 0.4 MB file"):
        load_image(path)
    assert peak_bytes(lambda: load_image(path)) < 4 * path.stat().st_size
    plain = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(plain, format="TIFF")
    assert load_image(write(tmp_path / "ok.tif", plain.getvalue())).size == (64, 64)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_an_exif_block_that_declares_more_than_the_file_holds_is_refused(tmp_path, fmt):
    image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    buffer = io.BytesIO()
    prefix = b"Exif\0\0" if fmt == "JPEG" else b""  # a JPEG's APP1 names its EXIF so
    image.save(buffer, format=fmt, exif=prefix + amplifying_exif(tags=120, blob=30_000))
    path = write(tmp_path / f"amp.{fmt.lower()}", buffer.getvalue())
    with pytest.raises(InputError, match="metadata declares"):
        load_image(path)
    assert peak_bytes(lambda: load_image(path)) < 4 * path.stat().st_size + 2**20


def test_an_ordinary_exif_orientation_is_still_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise: shown upright it is taller than wide
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 80, 3), 120, np.uint8)).save(buffer, format="JPEG", exif=exif.tobytes())
    assert load_image(write(tmp_path / "rotated.jpg", buffer.getvalue())).size == (40, 80)


def progressive_jpeg(repeat_last_scan: int = 0) -> bytes:
    """A progressive JPEG, its last scan repeated ``repeat_last_scan`` more times."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * repeat_last_scan + data[-2:]


def test_jpeg_scans_are_counted_and_a_jpeg_of_many_repeated_scans_is_refused(tmp_path):
    from model.inputs import MAX_JPEG_SCANS, jpeg_segments

    ordinary = progressive_jpeg()
    scans, exif = jpeg_segments(ordinary)
    assert 2 < scans < 20 and exif == [] and jpeg_segments(b"\xff\xd8\xff\xd9") == (0, [])
    baseline = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(baseline, format="JPEG")
    assert jpeg_segments(baseline.getvalue())[0] == 1
    assert load_image(write(tmp_path / "ok.jpg", ordinary)).size == (96, 96)
    crafted = progressive_jpeg(repeat_last_scan=MAX_JPEG_SCANS)
    assert jpeg_segments(crafted)[0] == scans + MAX_JPEG_SCANS
    with pytest.raises(InputError, match=f"holds {scans + MAX_JPEG_SCANS} scans"):
        load_image(write(tmp_path / "many.jpg", crafted))


def test_a_large_16_bit_grey_png_decodes(tmp_path):
    values = (np.arange(2400 * 2100, dtype=np.uint32).reshape(2400, 2100) % 65536).astype(np.uint16)
    path = write(tmp_path / "grey16.png", png_bytes(Image.fromarray(values)))
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (336, 384)
