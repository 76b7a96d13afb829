"""Checked loading of user inputs: every rejection is an :class:`InputError` whose message can be
shown to a person as it is (the UI, the API and the CLI all go through here).

Images: the file must be a picture in one of :data:`IMAGE_FORMATS` that PIL can decode
completely. Its geometry is read from the header and checked *before* anything is decoded
(:func:`check_geometry`: each side, the aspect ratio, the pixel count), so decompression bombs
never allocate. Why the aspect ratio and not only the pixel count: the image processor scales
the *shorter* side to 336 px, so the longer side grows with the aspect ratio -- a 1.5 KB PNG of
100000×14 px became 336×2.4 M px and took the server to 8.6 GB. The picture is then scaled down
so that its shorter side is :data:`KEPT_SHORT_SIDE_PX` (JPEGs are even decoded at a reduced
scale), which is what the model and the figures use anyway, so a kept frame is at most
336 × 2688 px (2.7 MB) whatever was uploaded. Any mode (grey, palette, CMYK, 16-bit, with alpha)
becomes 8-bit RGB, alpha composited on white.

What a decoder may allocate is bounded by the file's size too, by construction
(:func:`check_structure`, before PIL reads any tag): a TIFF directory -- a TIFF's own, or the EXIF
block of a JPEG, PNG or WebP -- may not declare more bytes of tag data than the file holds
(PIL reads every tag's data once per tag, so 250 tags pointing at one 5 MB blob cost 2.4 GB), and
a JPEG may hold at most :data:`MAX_JPEG_SCANS` scans (each progressive scan is another pass over
every coefficient: one scan repeated 3000 times in a 310 KB file held the decoder for a minute).

Questions (:func:`check_question`, which ``DuetLlava.prepare`` runs, so the app, the CLI, the
Python API and batched answers all check them the same way) reach the chat template as they were
typed, newlines and inner spaces kept; only the ends are trimmed, since the template writes its own
separators around the question. They are refused (not silently edited) when they hold the
tokenizer's special tokens (``<image>``, ``</s>``, ...) or the chat template's role markers
(``USER:``, ``ASSISTANT:``): those would change the prompt's structure, and whoever typed the
question should see that what they typed is what the model reads. A benchmark task's text (the
lmms-eval plugin, ``task=True``) is the task author's, not a visitor's: it passes unchanged, special
tokens and role markers included, exactly as stock lmms-eval sends it to ``llava_hf`` (whose
tokenizer reads ``</s>`` as the token), so that scores stay comparable.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
MAX_SIDE_PX = 10_000
MAX_ASPECT_RATIO = 8  # longer side / shorter side; bounds what the processor's resize allocates
MIN_IMAGE_SIDE_PX = 14  # one ViT patch
KEPT_SHORT_SIDE_PX = 336  # the LLaVA-1.5 processor's shortest edge and the figures' view size
# Decoders PIL may use on a visitor's file; the others (EPS runs Ghostscript, ...) are never tried.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG opens MPO (phone photos) too
MAX_JPEG_SCANS = 64  # libjpeg's progressive JPEGs have about 10; mozjpeg's rarely more than 20
MAX_TIFF_DIRECTORIES = 64  # directories (pages, EXIF sub-directories) followed in one file
TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
TIFF_SUB_DIRECTORIES = (0x8769, 0x8825, 0xA005, 0x014A)  # EXIF, GPS, interoperability, SubIFDs
MAX_QUESTION_CHARS = 1000
MAX_QUESTION_TOKENS = 256
ROLE_MARKER = re.compile(r"\b(USER|ASSISTANT|SYSTEM)\s*:", re.IGNORECASE)


class InputError(ValueError):
    """Bad user input; the message is written for the user."""


def check_size(n_bytes: int, kind: str, max_bytes: int, error: type[InputError] = InputError) -> int:
    """``n_bytes`` if a file of that size may be read: every route (upload, ``data:`` URL, CLI)
    checks its size here before anything reads the content."""
    if n_bytes == 0:
        raise error(f"The {kind} file is empty (0 bytes).")
    if n_bytes > max_bytes:
        raise error(f"The {kind} file is too large ({n_bytes / 2**20:.1f} MB; at most {max_bytes / 2**20:.0f} MB).")
    return n_bytes


def check_upload(path: str | os.PathLike, kind: str, max_bytes: int, error: type[InputError] = InputError) -> Path:
    """The uploaded file's path once it exists, is not empty and is at most ``max_bytes`` --
    checked from the file system, before anything opens the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind.capitalize()} file not found: {path.name} (uploads are deleted after a while: "
                    "upload it again).")
    check_size(path.stat().st_size, kind, max_bytes, error)
    return path


def check_geometry(width: int, height: int, kind: str, max_pixels: int, *, max_side: int = MAX_SIDE_PX,
                   max_aspect: float = MAX_ASPECT_RATIO, min_side: int = MIN_IMAGE_SIDE_PX,
                   error: type[InputError] = InputError) -> None:
    """Refuse a picture or video frame by its size alone, before any pixel is decoded or resized
    (images and video frames both come through here)."""
    short, long = sorted((width, height))
    if short < min_side:
        raise error(f"The {kind} is too small ({width}×{height}); each side needs at least {min_side} pixels.")
    if long > max_aspect * short:
        raise error(f"The {kind} is too long and thin ({width}×{height}); the longer side may be at most "
                    f"{max_aspect:g} times the shorter.")
    if long > max_side:
        raise error(f"The {kind} is too large ({width}×{height}); each side may be at most {max_side} pixels.")
    if width * height > max_pixels:
        raise error(f"The {kind} is too large ({width}×{height} = {width * height / 1e6:.1f} MP; "
                    f"at most {max_pixels / 1e6:.3g} MP).")


def kept_size(size: tuple[int, int], short_side: int = KEPT_SHORT_SIDE_PX) -> tuple[int, int]:
    """``size`` scaled down so that its shorter side is ``short_side`` (never scaled up)."""
    width, height = size
    scale = short_side / min(width, height)
    return size if scale >= 1 else (max(1, round(width * scale)), max(1, round(height * scale)))


def shrink(image: Image.Image, short_side: int = KEPT_SHORT_SIDE_PX) -> Image.Image:
    """``image`` at :func:`kept_size`, so that what a result keeps does not grow with the upload.
    16-bit greys are resized as 32-bit integers: PIL's resize cannot reduce them as they are."""
    size = kept_size(image.size, short_side)
    if size == image.size:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.resize(size, Image.BICUBIC, reducing_gap=3.0)


def tiff_declared_bytes(data: bytes) -> int:
    """Bytes of tag data the TIFF structure in ``data`` (a file, or an EXIF block from its TIFF
    header on) declares over every directory it links to: for each tag, its count times its
    type's size. An InputError if the structure cannot be walked."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        raise InputError("The image's TIFF metadata has no valid header: the file is damaged.")
    order = "<" if data[:2] == b"II" else ">"
    pending, seen, total = [int.from_bytes(data[4:8], "little" if order == "<" else "big")], set(), 0
    while pending:
        offset = pending.pop()
        if offset == 0 or offset in seen:
            continue
        if len(seen) == MAX_TIFF_DIRECTORIES or offset + 2 > len(data):
            raise InputError("The image's TIFF metadata links more directories than a picture needs, or past its "
                             "end: the file is damaged or crafted.")
        seen.add(offset)
        (n,) = struct.unpack_from(order + "H", data, offset)
        if offset + 2 + 12 * n + 4 > len(data):
            raise InputError("The image's TIFF metadata runs past the end of the file: the file is damaged.")
        for k in range(n):
            tag, kind, count, value = struct.unpack_from(order + "HHII", data, offset + 2 + 12 * k)
            total += count * TIFF_TYPE_BYTES.get(kind, 1)
            if tag in TIFF_SUB_DIRECTORIES and kind in (4, 13) and count == 1:
                pending.append(value)
        pending.append(struct.unpack_from(order + "I", data, offset + 2 + 12 * n)[0])
    return total


def jpeg_segments(data: bytes) -> tuple[int, list[bytes]]:
    """(how many scans (SOS segments) a JPEG holds, its EXIF blocks from their TIFF header on):
    markers are walked segment by segment, and each scan's entropy-coded data is skipped to the
    next marker, so this is linear in the file."""
    pos, scans, exif = 2, 0, []
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise InputError("The JPEG file is damaged (a segment does not start where the previous one ends).")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            exif.append(data[pos + 10:end])
        pos = end
        if marker != 0xDA:
            continue
        scans += 1
        while True:  # entropy-coded data ends at the first 0xFF not followed by 0x00 or a restart marker
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= len(data):
                return scans, exif
            if data[pos + 1] == 0x00 or 0xD0 <= data[pos + 1] <= 0xD7:
                pos += 2
                continue
            break
    return scans, exif


def chunk_exif(data: bytes) -> list[bytes]:
    """The EXIF blocks of a PNG (eXIf chunks) or a WebP (EXIF chunks), found by walking its chunks."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos, size_at, kind_at, header, pad, wanted, order = 8, 0, 4, 8, 4, b"eXIf", "big"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        pos, size_at, kind_at, header, pad, wanted, order = 12, 4, 0, 8, 0, b"EXIF", "little"
    else:
        return []
    found = []
    while pos + header <= len(data):
        size = int.from_bytes(data[pos + size_at:pos + size_at + 4], order)
        if data[pos + kind_at:pos + kind_at + 4] == wanted:
            block = data[pos + header:pos + header + size]
            found.append(block[6:] if block.startswith(b"Exif\0\0") else block)
        pos += header + size + pad + (size % 2 if order == "little" else 0)
    return found


def check_structure(data: bytes, error: type[InputError] = InputError) -> None:
    """Refuse a file whose metadata or scans would make the decoder allocate or work far beyond its
    size (module docstring). Every structure is walked from the raw bytes, before PIL parses any:
    PIL reads a TIFF's directory and a JPEG's EXIF as it opens the file."""
    try:
        _check_structure(data)
    except InputError as refused:
        raise error(str(refused)) from None


def _check_structure(data: bytes) -> None:
    scans, blocks = jpeg_segments(data) if data[:3] == b"\xff\xd8\xff" else (0, chunk_exif(data))
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        blocks = [data]
    declared = sum(tiff_declared_bytes(block) for block in blocks)
    if declared > len(data):
        raise InputError(f"The image's metadata declares {declared / 2**20:.1f} MB of data in a "
                         f"{len(data) / 2**20:.1f} MB file: the file is crafted or damaged and is not decoded.")
    if scans > MAX_JPEG_SCANS:
        raise InputError(f"The JPEG holds {scans} scans (at most {MAX_JPEG_SCANS}): re-save it as an ordinary "
                         "JPEG or PNG.")


def load_image(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
               min_side: int = MIN_IMAGE_SIDE_PX, short_side: int = KEPT_SHORT_SIDE_PX) -> Image.Image:
    """The picture at ``path`` as 8-bit RGB, its shorter side at most ``short_side``; any problem
    is an InputError. No process-wide state (such as warning filters) is touched, so concurrent
    calls cannot disturb each other."""
    path = check_upload(path, "image", max_bytes)
    data = path.read_bytes()
    try:
        check_structure(data)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            check_geometry(*image.size, "image", max_pixels, min_side=min_side)
            image.draft(None, kept_size(image.size, short_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(shrink(image, short_side))
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"The image is too large (more than {max_pixels / 1e6:.0f} MP).") from None
    except UnidentifiedImageError:
        raise InputError("This file is not an image this app can read (use PNG, JPEG, WebP, BMP, GIF or TIFF).") from None
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        raise InputError(f"The image file is damaged or truncated and could not be decoded ({error}).") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16/32-bit greys are rescaled, alpha goes on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_question(question: str | None, tokenizer=None, max_chars: int = MAX_QUESTION_CHARS,
                   max_tokens: int = MAX_QUESTION_TOKENS, task: bool = False) -> str:
    """The question as the chat template receives it (its ends trimmed, everything inside kept),
    or an InputError saying what is wrong with it. ``task``: a benchmark task's text, returned
    unchanged once it is known to be non-empty text (module docstring)."""
    if question is not None and not isinstance(question, str):
        raise InputError(f"The question must be text, not {type(question).__name__}.")
    text = (question or "").strip()
    if not text:
        raise InputError("Type a question about the image.")
    check_encodable(text, "The question")
    if task:
        return question
    if len(text) > max_chars:
        raise InputError(f"The question is too long ({len(text)} characters; at most {max_chars}).")
    marker = ROLE_MARKER.search(text)
    if marker:
        raise InputError(f"Remove “{marker.group(0)}” from the question: the app writes the conversation's "
                         "USER/ASSISTANT turns itself.")
    if tokenizer is not None:
        reserved = sorted(token for token in reserved_tokens(tokenizer) if token in text)
        if reserved:
            raise InputError(f"Remove {reserved[0]} from the question: the app places the image (and the "
                             "prompt's other special tokens) itself.")
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens > max_tokens:
            raise InputError(f"The question is too long ({n_tokens} tokens; at most {max_tokens}).")
    return text


def check_encodable(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (U+D800..U+DFFF, which JSON's
    ``\\ud800`` escapes can carry) reached the tokenizer, whose error named Rust types."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"{what} holds a character that is not text (U+{ord(text[error.start]):04X}, "
                         f"at position {error.start + 1}): retype it.") from None


def reserved_tokens(tokenizer) -> set[str]:
    """Tokens a question may not contain as text (the tokenizer would read them as the token):
    the special ones (``<s>``, ``</s>``, ``<unk>``, ...) and those added for the prompt's
    structure (``<image>``, ``<video>``)."""
    return set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())


def shown(value, limit: int = 40) -> str:
    """``value`` as a refusal may quote it: short, and never Python's own words (the repr of an int
    of over 4300 digits is itself an error)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else "a number too large to be one"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + f"… ({len(value)} characters)"
    return f"a {type(value).__name__}"


def whole_number(value, label: str, low: int, high: int) -> int:
    """``value`` (a number from a form or an API call) as an int in low..high, or an InputError
    that names the setting: NaN, infinities, fractions, numbers too large for a float, text and
    None are all refused here."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise InputError(f"{label} must be a whole number from {low} to {high} (got {shown(value)}).")
    return int(number)


def number_list(text, label: str, kind: type, max_chars: int = 200) -> tuple | None:
    """A comma-separated list of numbers from a form (``kind`` int or float), None when empty, or
    an InputError in words: what the setting takes and what it got."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    what = "whole numbers" if kind is int else "numbers"
    if not isinstance(text, str) or len(text) > max_chars:
        raise InputError(f"{label} must be {what} separated by commas, at most {max_chars} characters "
                         f"(got {shown(text)}).")
    values = []
    for part in text.replace(" ", "").split(","):
        try:
            number = float(part)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise InputError(f"{label} must be {what} separated by commas (got {shown(part)} in {shown(text)}).")
        values.append(kind(number))
    return tuple(values)
