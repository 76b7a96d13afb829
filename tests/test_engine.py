"""The engine against stock transformers on a tiny random checkpoint loaded from disk."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from model.budget import METHODS, ReductionConfig, plan
from model.device import Timer
from model.engine import DuetLlava

from .conftest import QUESTION


def prefill_logits(engine: DuetLlava, image, cfg: ReductionConfig) -> torch.Tensor:
    p = plan(cfg, engine.n_layers, engine.n_patches)
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        visual = engine.encode(prompt, p, Timer(engine.device))
        embeds, rows, salient = engine.llm_inputs(prompt, visual)
        return engine.prefill(embeds, rows, salient, p).logits


@pytest.fixture(scope="module")
def stock(engine, image):
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        logits = engine.model(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values).logits[0, -1]
        generated = engine.model.generate(
            input_ids=prompt.input_ids, pixel_values=prompt.pixel_values, attention_mask=torch.ones_like(prompt.input_ids),
            max_new_tokens=8, do_sample=False,
        )[0, prompt.input_ids.shape[1]:]
    return logits, [t for t in generated.tolist() if t not in engine.eos_ids]


def test_loader_uses_sdpa_fp32_cpu_and_pil_processor(engine):
    assert engine.model.config._attn_implementation == "sdpa"
    assert engine.model.config.vision_config._attn_implementation == "sdpa"
    assert engine.dtype == torch.float32 and engine.device.type == "cpu"
    assert type(engine.processor.image_processor).__name__ == "LlavaImageProcessorPil"


@pytest.mark.parametrize("cfg", [ReductionConfig("full"), ReductionConfig("duet", 576)])
def test_no_reduction_matches_stock_logits(engine, image, stock, cfg):
    delta = (prefill_logits(engine, image, cfg) - stock[0]).abs().max().item()
    assert delta < 1e-4


@pytest.mark.parametrize("cfg", [ReductionConfig("full"), ReductionConfig("duet", 576)])
def test_no_reduction_generates_what_stock_generate_does(engine, image, stock, cfg):
    trace = engine.answer(image, QUESTION, cfg, max_new_tokens=8)
    assert trace["generated_ids"] == stock[1]
    assert trace["visual_tokens_per_layer"] == [576] * engine.n_layers


@pytest.mark.parametrize("method", ["duet", "fastv", "pyramiddrop", "visionzip", "hired", "fitprune"])
@pytest.mark.parametrize("budget", [192, 64])
def test_cached_generation_equals_uncached_recomputation(engine, image, method, budget):
    cfg = ReductionConfig(method, budget)
    cached = engine.answer(image, QUESTION, cfg, max_new_tokens=10)
    recomputed = engine.answer(image, QUESTION, cfg, max_new_tokens=10, use_cache=False)
    assert len(cached["generated_ids"]) > 1
    assert cached["generated_ids"] == recomputed["generated_ids"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_trace_average_tokens_per_layer_meets_budget(engine, image, method, budget):
    trace = engine.answer(image, QUESTION, ReductionConfig(method, budget), max_new_tokens=1)
    counts = trace["visual_tokens_per_layer"]
    assert len(counts) == engine.n_layers
    assert trace["avg_visual_tokens"] == pytest.approx(sum(counts) / len(counts), abs=0.01)
    target = 576 if method == "full" else budget
    assert abs(trace["avg_visual_tokens"] - target) <= 2


def test_t2v_keeps_int_half_of_the_v2v_tokens_then_none(engine, image):
    trace = engine.answer(image, QUESTION, ReductionConfig("duet", 128), max_new_tokens=1)
    n = trace["plan"]["k1"] + trace["plan"]["k2"]
    first, second = trace["t2v"]
    assert (first["layer"], first["n_in"], len(first["kept"]), n) == (16, 205, 102, 205)
    assert trace["avg_visual_tokens"] == 128.0
    assert first["kept"] == sorted(first["kept"]) and set(first["kept"]) <= set(range(n))
    assert (second["n_in"], second["kept"]) == (len(first["kept"]), [])
    kept_by_score = sorted(range(n), key=lambda i: -first["scores"][i])[: len(first["kept"])]
    assert sorted(kept_by_score) == first["kept"]


def test_salient_tokens_cover_question_words_and_last_token(engine, image):
    trace = engine.answer(image, QUESTION, ReductionConfig("duet", 64), max_new_tokens=1)
    tokens = [s["token"] for s in trace["salient"]]
    assert tokens == ["what", "color", "red", "circle", "?", ":"]  # "is", "the" are NLTK stopwords; ":" is last
    assert trace["salient_rule"] == "builtin"
    n_text = 11 + trace["plan"]["k1"] + trace["plan"]["k2"]  # prompt tokens after V2V
    assert trace["salient"][-1]["position"] == n_text - 1


def test_v2v_record_says_where_every_patch_went(engine, image):
    trace = engine.answer(image, QUESTION, ReductionConfig("duet", 192), max_new_tokens=1)
    (frame,) = trace["frames"]
    assert frame["n_tokens"] == len(frame["token_patches"]) == 307
    assert frame["cls_kept"] and frame["token_patches"][0] == []
    assert len(frame["dominant"]) == 299 and len(frame["clusters"]) == 7
    merged = [p for c in frame["clusters"] for p in c["members"]]
    assert len(merged) == 28 and len(frame["discarded"]) == 576 - 299 - 28
    assert sorted(frame["dominant"] + merged + frame["discarded"]) == list(range(576))
    assert sorted(p for group in frame["token_patches"] for p in group) == sorted(frame["dominant"] + merged)
    assert len(frame["scores"]) == 576


@pytest.mark.parametrize("method,budget,expected", [
    ("duet", 192, [0] * 16 + [307 - 153] * 8 + [307] * 8),  # renumbered: each layer continues from its length
    ("pyramiddrop", 192, None),
    ("fastv", 192, None),  # original ids: every layer continues from the full prompt's end
])
def test_decoding_positions_follow_each_layers_renumbered_length(engine, image, method, budget, expected):
    p = plan(ReductionConfig(method, budget), engine.n_layers, engine.n_patches)
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        visual = engine.encode(prompt, p, Timer(engine.device))
        embeds, rows, salient = engine.llm_inputs(prompt, visual)
        result = engine.prefill(embeds, rows, salient, p, positions=engine.positions(prompt, visual, p.positions))
    if method == "fastv":
        assert result.next_positions == [prompt.input_ids.shape[1]] * engine.n_layers
        return
    assert result.next_positions == result.tokens_per_layer  # contiguous ids: next = length at that layer
    if expected is not None:
        assert [embeds.shape[1] - n for n in result.next_positions] == expected


def test_trace_is_deterministic(engine, image):
    cfg = ReductionConfig("duet", 64)
    a, b = (engine.answer(image, QUESTION, cfg, max_new_tokens=3) for _ in range(2))
    for key in ("frames", "t2v", "generated_ids", "visual_tokens_per_layer"):
        assert a[key] == b[key]


def test_flops_shrink_with_the_budget(engine, image):
    f = {b: engine.answer(image, QUESTION, ReductionConfig("duet", b), max_new_tokens=1)["flops"] for b in (192, 64)}
    assert f[64]["llm"] < f[192]["llm"] < f[192]["llm_full"]


def test_batches_are_rejected_with_a_clear_error(engine):
    p = plan(ReductionConfig("full"), engine.n_layers)
    embeds = torch.zeros(2, 5, engine.lm.config.hidden_size)
    with pytest.raises(ValueError, match="batch size 1"):
        engine.prefill(embeds, torch.tensor([1]), [4], p)


def test_empty_question_is_rejected(engine, image):
    with pytest.raises(ValueError, match="Type a question"):
        engine.answer(image, "   ", ReductionConfig("duet", 64))


# ------------------------------------------------------------- scores equal eager attention
@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()


def test_v2v_scores_equal_eager_cls_attention(engine, eager, image):
    trace = engine.answer(image, QUESTION, ReductionConfig("duet", 64), max_new_tokens=1)
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        out = eager.model.vision_tower(prompt.pixel_values, output_attentions=True)
    attention = out.attentions[engine.feature_index - 1][0]  # the layer producing the features
    expected = attention[:, 0, 1:].sum(0)  # summed over heads, as clip_encoder_cw.py does
    assert torch.allclose(torch.tensor(trace["frames"][0]["scores"]), expected, atol=1e-5)


@pytest.mark.parametrize("method,rows", [("duet", "salient"), ("duet", "text"), ("fastv", "last"), ("fastv", "all"),
                                         ("pyramiddrop", "last")])
def test_llm_scores_equal_eager_attention(engine, eager, image, method, rows):
    cfg = ReductionConfig(method, 128, query=rows)
    p = plan(cfg, engine.n_layers)
    trace = engine.answer(image, QUESTION, cfg, max_new_tokens=1)
    stage = trace["t2v"][0]
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        visual = engine.encode(prompt, p, Timer(engine.device))
        embeds, visual_rows, salient = engine.llm_inputs(prompt, visual)
        out = eager.model.language_model(inputs_embeds=embeds, output_attentions=True)
    attention = out.attentions[stage["score_layer"]][0]  # (heads, T, T); no drop happened before
    query = {"salient": torch.tensor(salient), "all": torch.arange(embeds.shape[1]),
             "text": torch.arange(int(visual_rows.max()) + 1, embeds.shape[1]),
             "last": torch.tensor([embeds.shape[1] - 1])}[rows]
    assert stage["query"] == rows and stage["query_rows"] == len(query)
    expected = attention[:, query][:, :, visual_rows].mean((0, 1))
    assert torch.allclose(torch.tensor(stage["scores"]), expected, atol=1e-5)


def test_frames_enter_as_a_multi_image_prompt_with_joint_t2v(engine, image):
    frames = [image, image.rotate(90), image.transpose(0), image.rotate(180)]
    trace = engine.answer(frames, QUESTION, ReductionConfig("duet", 64), max_new_tokens=2)
    assert len(trace["frames"]) == 4
    assert [f["token_offset"] for f in trace["frames"]] == [0, 102, 204, 306]
    per_frame = trace["visual_tokens_per_frame_layer"]
    assert len(per_frame) == 4 and all(len(row) == engine.n_layers for row in per_frame)
    assert [sum(col) for col in zip(*per_frame)] == trace["visual_tokens_per_layer"]
    first = trace["t2v"][0]
    assert first["n_in"] == 4 * 102 and len(first["kept"]) == 204  # ranked jointly across frames
    assert trace["avg_visual_tokens"] == pytest.approx(4 * 63.75, abs=0.01)


def test_precomputed_tower_states_give_the_same_trace(engine, image):
    cfg = ReductionConfig("duet", 64)
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        hidden = engine.vision_states(prompt.pixel_values)
    reused = engine.answer(image, QUESTION, cfg, max_new_tokens=4, hidden=hidden)
    fresh = engine.answer(image, QUESTION, cfg, max_new_tokens=4)
    for key in ("generated_ids", "frames", "t2v", "visual_tokens_per_layer"):
        assert reused[key] == fresh[key], key


@pytest.mark.parametrize("method", ["duet", "visionzip"])
def test_original_positions_keep_the_full_prompt_layout_and_cache_faithfully(engine, image, method):
    cfg = ReductionConfig(method, 64, positions="original")
    p = plan(cfg, engine.n_layers, engine.n_patches)
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        visual = engine.encode(prompt, p, Timer(engine.device))
    original = engine.positions(prompt, visual, "original")
    n_text = prompt.input_ids.shape[1] - engine.n_patches
    assert len(original) == n_text + len(visual.features)
    assert original[-1] == prompt.input_ids.shape[1] - 1  # the question ends where it does unreduced
    assert engine.positions(prompt, visual)[-1] == len(original) - 1
    cached = engine.answer(image, QUESTION, cfg, max_new_tokens=8)
    assert cached["generated_ids"] == engine.answer(image, QUESTION, cfg, max_new_tokens=8, use_cache=False)["generated_ids"]


def test_original_positions_change_nothing_without_reduction(engine, image):
    a = engine.answer(image, QUESTION, ReductionConfig("full"), max_new_tokens=6)
    b = engine.answer(image, QUESTION, ReductionConfig("full", positions="original"), max_new_tokens=6)
    assert a["generated_ids"] == b["generated_ids"]


def test_fitprune_scores_equal_eager_head_max_attention(engine, eager, image):
    cfg = ReductionConfig("fitprune", 128)
    p = plan(cfg, engine.n_layers)
    stage = engine.answer(image, QUESTION, cfg, max_new_tokens=1)["t2v"][0]
    prompt = engine.prepare([image], QUESTION)
    with torch.inference_mode():
        visual = engine.encode(prompt, p, Timer(engine.device))
        embeds, visual_rows, _ = engine.llm_inputs(prompt, visual)
        out = eager.model.language_model(inputs_embeds=embeds, output_attentions=True)
    head_max = out.attentions[stage["score_layer"]][0].max(dim=0).values  # no drop happened before
    n, text = len(visual_rows), torch.arange(int(visual_rows.max()) + 1, embeds.shape[1])
    expected_self = head_max[visual_rows][:, visual_rows].sum(0) / n
    expected_cross = head_max[text][:, visual_rows].sum(0)
    assert torch.allclose(torch.tensor(stage["self"]), expected_self, atol=1e-5)
    assert torch.allclose(torch.tensor(stage["cross"]), expected_cross, atol=1e-5)


def test_hired_keeps_the_top_patches_without_cls_and_nothing_inside_the_llm(engine, image):
    trace = engine.answer(image, QUESTION, ReductionConfig("hired", 64), max_new_tokens=1)
    (frame,) = trace["frames"]
    assert not frame["cls_kept"] and frame["n_tokens"] == 64 and trace["t2v"] == []
    ranked = sorted(range(576), key=lambda p: -frame["scores"][p])
    assert frame["dominant"] == sorted(ranked[:64]) and len(frame["discarded"]) == 512
    assert trace["visual_tokens_per_layer"] == [64] * engine.n_layers
