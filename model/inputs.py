"""Checked loading of user inputs: every rejection is an :class:`InputError` whose message can be
shown to a person as it is (the UI, the API and the CLI all go through here).

Images: the file must be a picture PIL can decode completely; its pixel count is checked from
the header *before* decoding (decompression bombs never allocate); any mode (grey, palette,
CMYK, 16-bit, with alpha) becomes 8-bit RGB, alpha composited on white.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE_PX = 14  # one ViT patch
MAX_QUESTION_CHARS = 1000
MAX_QUESTION_TOKENS = 256


class InputError(ValueError):
    """Bad user input; the message is written for the user."""


def check_upload(path: str | os.PathLike, kind: str, max_bytes: int, error: type[InputError] = InputError) -> Path:
    """The uploaded file's path once it exists, is not empty and is at most ``max_bytes`` --
    checked from the file system, before anything opens the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind.capitalize()} file not found: {path.name}")
    size = path.stat().st_size
    if size == 0:
        raise error(f"The {kind} file is empty (0 bytes).")
    if size > max_bytes:
        raise error(f"The {kind} file is too large ({size / 2**20:.1f} MB; at most {max_bytes / 2**20:.0f} MB).")
    return path


def load_image(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
               min_side: int = MIN_IMAGE_SIDE_PX) -> Image.Image:
    path = check_upload(path, "image", max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(f"The image is too large ({width}×{height} = {width * height / 1e6:.1f} MP; "
                                     f"at most {max_pixels / 1e6:.0f} MP).")
                if min(width, height) < min_side:
                    raise InputError(f"The image is too small ({width}×{height}); each side needs at least "
                                     f"{min_side} pixels.")
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"The image is too large (more than {max_pixels / 1e6:.0f} MP).") from None
    except UnidentifiedImageError:
        raise InputError("This file is not an image this app can read (use PNG, JPEG, WebP, BMP, GIF or TIFF).") from None
    except (OSError, SyntaxError, ValueError) as error:
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
                   max_tokens: int = MAX_QUESTION_TOKENS) -> str:
    """Whitespace-normalised question, or an InputError saying what is wrong with it."""
    text = " ".join((question or "").split())
    if not text:
        raise InputError("Type a question about the image.")
    if len(text) > max_chars:
        raise InputError(f"The question is too long ({len(text)} characters; at most {max_chars}).")
    if tokenizer is not None:
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens > max_tokens:
            raise InputError(f"The question is too long ({n_tokens} tokens; at most {max_tokens}).")
    return text
