"""Short synthetic clips from the scene generator: one queried object slides across the scene.

Used for the app's example clips (and the start of video training data). The object's pixels
are cut out, the hole is filled with pixels drawn at random from a ring around it (the
background it sat on, so noise and textures stay noisy), and the object is pasted ``step_px`` further along in every frame, clamped so it stays
fully inside the image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from . import scenes

VIDEO_KINDS = ("colour", "shape", "count", "exist")  # answers that stay true while an object moves


def moving_clip(sample: scenes.Sample, n_frames: int = 6, step_px: tuple[int, int] = (28, 0),
                index: int | None = None) -> list[Image.Image]:
    """``n_frames`` frames in which object ``index`` slides (default: the first queried one, or the
    first object when the question queries none, as a "no" existence question)."""
    if index is None:
        index = sample.query[0] if sample.query else 0
    obj = sample.objects[index]
    scene = np.asarray(sample.image).copy()
    ring = ndimage.binary_dilation(obj.mask, iterations=6) & ~ndimage.binary_dilation(obj.mask, iterations=2)
    background = scene.copy()
    around = scene[ring]
    rng = np.random.default_rng(0)
    background[obj.mask] = around[rng.integers(0, len(around), int(obj.mask.sum()))]
    ys, xs = np.nonzero(obj.mask)
    height, width = obj.mask.shape
    frames = []
    for t in range(n_frames):
        dx = int(np.clip(t * step_px[0], -xs.min(), width - 1 - xs.max()))
        dy = int(np.clip(t * step_px[1], -ys.min(), height - 1 - ys.max()))
        frame = background.copy()
        frame[ys + dy, xs + dx] = scene[ys, xs]
        frames.append(Image.fromarray(frame))
    return frames
