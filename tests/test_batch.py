"""Batched generation (model/batch.py): each sequence of a batch decides and answers as it would
alone; left padding is invisible to the real rows; batched eval answers as batch 1 does."""

from __future__ import annotations

import pytest
import torch

from model import batch, decoder
from model.budget import ReductionConfig
from model.device import Timer
from model.engine import DuetLlava
from model.lab.eval import answers, items

from .conftest import QUESTION

METHODS = [ReductionConfig("full", 576), ReductionConfig("duet", 64), ReductionConfig("visionzip", 128),
           ReductionConfig("pyramiddrop", 128), ReductionConfig("fastv", 64), ReductionConfig("hired", 192),
           ReductionConfig("fitprune", 128)]


def sequences(engine, questions):
    p = engine.plan(ReductionConfig("full", engine.n_patches))
    return p, [batch.sequence(engine, engine.prepare(frames, question), p, Timer(engine.device))
               for frames, question in questions]


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: f"{c.method}-{c.budget}")
def test_an_unpadded_batch_decides_and_answers_as_each_sequence_alone(engine, image, cfg):
    """Same question, four images: no padding, so every decision and token is batch 1's."""
    questions = [([image.rotate(angle)], QUESTION) for angle in (0, 90, 180, 270)]
    alone = [engine.answer(frames, question, cfg, max_new_tokens=4) for frames, question in questions]
    together = batch.answer_batch(engine, questions, cfg, max_new_tokens=4)
    for one, many in zip(alone, together):
        assert many["generated_ids"] == one["generated_ids"]
        assert [s["kept"] for s in many["t2v"]] == [s["kept"] for s in one["t2v"]]
        assert [f["token_patches"] for f in many["frames"]] == [f["token_patches"] for f in one["frames"]]
        assert many["visual_tokens_per_layer"] == one["visual_tokens_per_layer"]
    if cfg.method in ("duet", "pyramiddrop"):  # each sequence its own choice, not the first one's
        assert len({tuple(r["t2v"][0]["kept"]) for r in together}) == 4


LLM_SIDE = [ReductionConfig("full", 576), ReductionConfig("pyramiddrop", 64), ReductionConfig("fastv", 64),
            ReductionConfig("fitprune", 128), ReductionConfig("pyramiddrop", 64, query="salient")]


@pytest.mark.parametrize("cfg", LLM_SIDE, ids=lambda c: f"{c.method}-{c.budget}-{c.query or 'own'}")
def test_pad_rows_are_invisible_to_the_real_rows(engine, image, cfg):
    """Prompts of different lengths, left-padded: the real rows' outputs and every ranking's
    choices do not change when the pad rows hold other values (the ranking scores each sequence
    on its real rows alone: as keys at position 0, pads would join every query's softmax), and
    equal each sequence's own prefill up to float rounding."""
    _, found = sequences(engine, [([image], QUESTION), ([image.rotate(90)], "is there a circle ?"),
                                  ([image.rotate(180)], "how many red circles are there in the picture ?")])
    p = engine.plan(cfg)
    with torch.inference_mode():
        h, rows = batch.left_padded(engine, found)
        assert rows.pads.tolist() == [max(s.embeds.shape[1] for s in found) - s.embeds.shape[1] for s in found]
        assert rows.pads.min() == 0 and rows.pads.max() > 0
        mask = lambda n: batch.pad_mask(rows.pads, n, n, h.dtype)  # noqa: E731
        out = decoder.run(engine.lm, h, rows, p, engine.apply_rope, mask=mask, record=True)
        garbage = h.clone()
        for b, pad in enumerate(rows.pads.tolist()):
            garbage[b, :pad] = torch.randn(pad, h.shape[-1]) * 100
        again = decoder.run(engine.lm, garbage, rows, p, engine.apply_rope, mask=mask)
        assert again.kept == out.kept
        for b, (s, pad) in enumerate(zip(found, rows.pads.tolist())):
            assert torch.equal(again.hidden[b, pad:], out.hidden[b, pad:])
            alone = decoder.Rows.build(torch.isin(torch.arange(s.embeds.shape[1]), s.visual_rows)[None],
                                       s.positions[None], {k: v[b:b + 1, pad:] for k, v in rows.queries.items()})
            single = decoder.run(engine.lm, s.embeds, alone, p, engine.apply_rope, record=True)
            assert {layer: kept[b] for layer, kept in out.kept.items()} == {k: v[0] for k, v in single.kept.items()}
            assert torch.allclose(out.hidden[b, pad:], single.hidden[0], rtol=1e-4, atol=1e-4)
            if b == 0 and out.stages and out.stages[0]["scores"] is not None:  # sequence 0's scores, recorded
                assert torch.allclose(torch.tensor(out.stages[0]["scores"]), torch.tensor(single.stages[0]["scores"]),
                                      rtol=1e-5, atol=1e-9)


def test_pad_mask_is_causal_and_hides_each_sequences_pads():
    mask = batch.pad_mask(torch.tensor([0, 2]), 4, 4, torch.float32)
    allowed = (mask == 0)[:, 0]
    assert torch.equal(allowed[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert allowed[1].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    step = (batch.pad_mask(torch.tensor([0, 2]), 1, 6, torch.float32) == 0)[:, 0, 0]
    assert step.tolist() == [[True] * 6, [False, False, True, True, True, True]]


def test_mixed_frame_counts_run_in_groups_and_match_batch_1(engine, image):
    questions = [([image], QUESTION), ([image, image.rotate(90)], QUESTION), ([image.rotate(180)], "is it red ?")]
    cfg = ReductionConfig("duet", 64)
    together = batch.answer_batch(engine, questions, cfg, max_new_tokens=3)
    for (frames, question), many in zip(questions, together):
        one = engine.answer(frames, question, cfg, max_new_tokens=3)
        assert len(many["frames"]) == len(frames)
        assert many["visual_tokens_per_layer"] == one["visual_tokens_per_layer"]
        assert many["generated_ids"] == one["generated_ids"]


def test_batched_eval_answers_as_batch_1_on_the_shipped_model():
    """The shipped model on 24 test questions of different lengths, every method: the batched
    prefill (left padding, batch 8) gives every answer batch 1 gives."""
    engine = DuetLlava.load(device="cpu")
    pairs = list(items("test", 24, 0, 1))
    assert len({len(s.question.split()) for s, _ in pairs}) > 1
    configs = [ReductionConfig(c.method, c.budget) for c in METHODS]
    one = {cfg: [] for cfg in configs}
    many = {cfg: [] for cfg in configs}
    for first in range(0, len(pairs), 8):
        chunk = pairs[first:first + 8]
        for size, found in ((1, one), (8, many)):
            for cfg, records in answers(engine, chunk, configs, 3, size).items():
                found[cfg] += [r["answer"] for r in records]
    for cfg in configs:
        assert many[cfg] == one[cfg], cfg.method
    assert len({a for cfg in configs for a in one[cfg]}) > 2


def test_padded_batches_decide_and_answer_as_batch_1_on_the_llama2_standin(llama2_engine, image):
    """The README's batching guarantee, on the real Llama-2 tokenizer and 32 layers: three prompts
    of different lengths, left-padded, under every method: every kept token and every answer
    token is batch 1's (fp32 on the CPU)."""
    questions = [([image], "What is the colour of the circle?"), ([image.rotate(90)], "Is there a circle?"),
                 ([image.rotate(180)], "How many red circles are there in the picture?\nAnswer the question "
                                       "using a single word or phrase.")]
    for cfg in METHODS:
        together = batch.answer_batch(llama2_engine, questions, cfg, max_new_tokens=4)
        for (frames, question), many in zip(questions, together):
            one = llama2_engine.answer(frames, question, cfg, max_new_tokens=4)
            assert [s["kept"] for s in many["t2v"]] == [s["kept"] for s in one["t2v"]], cfg.method
            assert many["generated_ids"] == one["generated_ids"], cfg.method
