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
    (dict(stage_layers="16,24", stage_ratios="a,b"), "Invalid settings"),
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
