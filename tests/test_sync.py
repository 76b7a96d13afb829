"""No value goes back to the host between a prefill's first and last decoder layer (issue 39):
every op the loop dispatches is watched, and any op that must read a device value on the host
(``.item()``, ``int()``/``bool()`` of a tensor, ``nonzero``, boolean-mask indexing, ``tolist``,
``numpy``) inside the loop fails the test. On CPU nothing waits, but these are exactly the ops
that make a GPU prefill wait for each layer's kernels before queuing the next."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import decoder
from model.batch import answer_batch
from model.budget import ReductionConfig
from tests.conftest import QUESTION

METHODS = ("full", "duet", "visionzip", "fastv", "pyramiddrop", "hired", "fitprune")
SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
           "aten.unique", "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim"}


class SyncWatch(TorchDispatchMode):
    """Records the host-reading ops dispatched while ``inside`` is set."""

    def __init__(self):
        super().__init__()
        self.inside, self.found = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside:
            name = func.overloadpacket._qualified_op_name.replace("::", ".")
            bool_index = name == "aten.index" and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or []))
            if name in SYNCING or bool_index:
                self.found.append(name + (" (boolean mask)" if bool_index else ""))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def watch(monkeypatch):
    """A ``SyncWatch`` armed from the loop's first ``on_layer`` call (before layer 0) to its last
    (after the last layer). Reading a scalar (``item``, ``int()``, ``bool()``, ``float()``, a tensor
    as an index) skips the dispatcher under inference mode, and ``tolist``/``numpy`` never reach it,
    so those methods are watched on ``torch.Tensor`` itself."""
    mode = SyncWatch()
    real_run = decoder.run

    def marked(lm, *args, on_layer=None, **kwargs):
        def marker(index, h, rows):
            mode.inside = False
            if on_layer:
                on_layer(index, h, rows)
            mode.inside = index < len(lm.layers)

        try:
            return real_run(lm, *args, on_layer=marker, **kwargs)
        finally:
            mode.inside = False

    monkeypatch.setattr(decoder, "run", marked)
    for method in ("tolist", "numpy", "item", "__int__", "__bool__", "__float__", "__index__"):
        real = getattr(torch.Tensor, method)

        def reading(self, *a, _real=real, _name=method, **k):
            if mode.inside:
                mode.found.append(f"Tensor.{_name}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, reading)
    with mode:
        yield mode


@pytest.mark.parametrize("method", METHODS)
def test_a_prefill_reads_nothing_back_inside_the_loop(engine, image, watch, method):
    budget = engine.n_patches if method == "full" else 64
    trace = engine.answer(image, QUESTION, ReductionConfig(method, budget), max_new_tokens=2)
    assert trace["t2v"] or method in ("full", "visionzip", "hired")
    assert watch.found == [], f"{method}: host reads inside the decoder loop: {sorted(set(watch.found))}"


@pytest.mark.parametrize("method", ["duet", "pyramiddrop", "fitprune"])
def test_a_padded_batch_prefill_reads_nothing_back_inside_the_loop(engine, image, watch, method):
    items = [([image], QUESTION), ([image], "what shape is the red object in the middle of the picture ?")]
    answers = answer_batch(engine, items, ReductionConfig(method, 64), max_new_tokens=2)
    assert len(answers) == 2
    assert watch.found == [], f"{method}: host reads inside the decoder loop: {sorted(set(watch.found))}"


def test_the_watch_sees_a_host_read_inside_the_loop(engine, image, watch, monkeypatch):
    """The negative control: one ``int()`` of a device value in the loop is caught."""
    real = decoder.run_layer

    def reading(lm, index, h, *args, **kwargs):
        if index == 3:
            int(h[0, 0, 0] > 0)
        return real(lm, index, h, *args, **kwargs)

    monkeypatch.setattr(decoder, "run_layer", reading)
    engine.answer(image, QUESTION, ReductionConfig("duet", 64), max_new_tokens=1)
    assert watch.found == ["Tensor.__int__"]
