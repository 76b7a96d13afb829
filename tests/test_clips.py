import numpy as np

from model.lab import scenes
from model.lab.clips import moving_clip


def test_the_queried_object_moves_and_nothing_else_does():
    sample = next(s for s in (scenes.sample(0, "test", i) for i in range(100)) if s.kind == "colour")
    frames = [np.asarray(f).astype(int) for f in moving_clip(sample, n_frames=4, step_px=(10, 0))]
    obj = sample.objects[sample.query[0]]
    assert np.array_equal(frames[0], np.asarray(sample.image))
    ys, xs = np.nonzero(obj.mask)
    shifted = frames[2][ys, np.clip(xs + 20, 0, 335)]
    assert np.abs(shifted - np.asarray(sample.image)[ys, xs]).max() == 0 or xs.max() + 20 > 335
    others = np.zeros_like(obj.mask)
    for o in sample.objects:
        if o is not obj:
            others |= o.mask
    untouched = others & ~np.any([np.roll(obj.mask, 10 * t, axis=1) for t in range(4)], axis=0)
    assert all(np.array_equal(f[untouched], frames[0][untouched]) for f in frames)
