"""Shared fixtures: tiny random LLaVA checkpoints saved to disk and loaded back through the
engine's own loader, so every test exercises the real loading path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import TinyLlavaSpec, build_random_checkpoint
from model.engine import DuetLlava


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """LLaVA-1.5 geometry (336 px, 576 patches, 32 decoder layers), tiny widths."""
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaSpec(), seed=0)


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    torch.manual_seed(0)
    return DuetLlava.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def image():
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 255, (300, 400, 3), dtype=np.uint8)
    pixels[100:200, 50:150] = (220, 30, 30)
    return Image.fromarray(pixels)


QUESTION = "what color is the red circle ?"
