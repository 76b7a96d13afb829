"""The Qwen2.5-VL adapter on a tiny random checkpoint loaded from disk, against stock transformers
and against transcriptions of DUET-VLM's own Qwen code (``qwen2_5_vl/modeling_qwen2_5vl_duet.py``)
on fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import decoder
from model.backbones.qwen2_5_vl import AUTHORS_CONTEXTUAL, AUTHORS_DOMINANT, authors_counts, plan_qwen
from model.budget import ReductionConfig, average, layer_counts, plan
from model.device import Timer
from model.v2v import group_mean, received_attention, slot_merge

from .test_sync import watch  # noqa: F401  (the fixture: host reads inside the decoder loop)

QUESTION = "what color is the blue square ?"


def stock_generate(engine, prompt, n):
    ids = prompt.input_ids
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, pixel_values=prompt.pixel_values,
                                    image_grid_thw=prompt.image_grid_thw, attention_mask=torch.ones_like(ids),
                                    mm_token_type_ids=(ids == engine.image_token_id).int(),
                                    max_new_tokens=n, do_sample=False)
    return [t for t in out[0, ids.shape[1]:].tolist() if t not in engine.eos_ids]


def test_loads_through_the_same_loader_with_sdpa_and_a_pil_processor(qwen_engine, wide_image):
    assert qwen_engine.backbone.kind == "qwen2_5_vl" and qwen_engine.n_layers == 28
    assert qwen_engine.model.config.text_config._attn_implementation == "sdpa"
    assert type(qwen_engine.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    prompt = qwen_engine.prepare([wide_image], QUESTION)
    assert prompt.slots == [150] and prompt.grids == [[10, 15]]
    assert prompt.rope_positions.shape == (3, prompt.input_ids.shape[1])


def test_full_generates_what_stock_generate_does(qwen_engine, wide_image):
    prompt = qwen_engine.prepare([wide_image], QUESTION)
    expected = stock_generate(qwen_engine, prompt, 8)
    trace = qwen_engine.answer(wide_image, QUESTION, ReductionConfig("full"), max_new_tokens=8)
    assert len(set(expected)) > 1 and trace["generated_ids"] == expected
    assert trace["visual_tokens_per_layer"] == [150] * 28 and trace["grid"] == [10, 15]


@pytest.mark.parametrize("cfg", [ReductionConfig("duet", 64), ReductionConfig("duet", k1=60, k2=10),
                                 ReductionConfig("visionzip", 64), ReductionConfig("fastv", 64),
                                 ReductionConfig("pyramiddrop", 64), ReductionConfig("hired", 64),
                                 ReductionConfig("fitprune", 64),
                                 ReductionConfig("duet", 64, positions="contiguous")])
def test_cached_generation_equals_uncached_recomputation(qwen_engine, wide_image, cfg):
    cached = qwen_engine.answer(wide_image, QUESTION, cfg, max_new_tokens=8)
    recomputed = qwen_engine.answer(wide_image, QUESTION, cfg, max_new_tokens=8, use_cache=False)
    assert len(cached["generated_ids"]) > 1
    assert cached["generated_ids"] == recomputed["generated_ids"]


def test_duet_counts_stages_and_original_positions(qwen_engine, wide_image):
    trace = qwen_engine.answer(wide_image, QUESTION, ReductionConfig("duet", k1=60, k2=10), max_new_tokens=2)
    frame = trace["frames"][0]
    n = 60 + 10
    assert len(frame["dominant"]) == 60 and len(frame["clusters"]) == 10 and frame["n_tokens"] == n
    pool = sum(len(c["members"]) for c in frame["clusters"])
    assert pool == 40 and len(frame["discarded"]) == 150 - 60 - 40
    assert [(s["layer"], s["n_in"], len(s["kept"])) for s in trace["t2v"]] == [(14, n, 35), (21, 35, 17)]
    assert trace["positions"] == "original" and all(s["query"] == "text" for s in trace["t2v"])
    # every kept token sits where its own (or its anchor's) merged token sat, with that slot's 3-D id
    prompt = qwen_engine.prepare([wide_image], QUESTION)
    visual = qwen_engine.encode(prompt, qwen_engine.plan(ReductionConfig("duet", k1=60, k2=10), prompt),
                                Timer(qwen_engine.device))
    positions = qwen_engine.positions(prompt, visual, "original")
    first = int((prompt.input_ids[0] == qwen_engine.image_token_id).nonzero()[0])
    slots = torch.tensor(visual.frames[0]["slots"])
    assert slots.tolist() == sorted(frame["dominant"] + [c["centroid"] for c in frame["clusters"]])
    assert torch.equal(positions[:, first:first + n], prompt.rope_positions[:, first + slots])
    assert torch.equal(positions[:, :first], prompt.rope_positions[:, :first])
    assert torch.equal(positions[:, first + n:], prompt.rope_positions[:, first + 150:])


@pytest.mark.parametrize("method", ["duet", "fastv", "fitprune"])
def test_a_prefill_reads_nothing_back_inside_the_loop(qwen_engine, wide_image, watch, method):  # noqa: F811
    trace = qwen_engine.answer(wide_image, QUESTION, ReductionConfig(method, 64), max_new_tokens=2)
    assert trace["t2v"] and watch.found == [], sorted(set(watch.found))


def test_authors_preset_counts_are_capped_per_image():
    assert authors_counts(150, AUTHORS_DOMINANT, AUTHORS_CONTEXTUAL) == (149, 1)
    assert authors_counts(1000, AUTHORS_DOMINANT, AUTHORS_CONTEXTUAL) == (540, 100)


def test_shares_of_the_image_set_counts_and_a_budget_every_method_matches():
    """run_inference.py's ratios: int(0.65 N) dominant and max(int(0.05 N), 1) contextual tokens;
    the plan's budget is what they reach on this image, and other methods take DUET's."""
    shares = dict(dominant_share=0.65, contextual_share=0.05)
    for n_tokens in (150, 1116):
        duet = plan_qwen(ReductionConfig("duet", 999, **shares), 28, n_tokens)
        assert (duet.k1, duet.k2) == (int(0.65 * n_tokens), max(int(0.05 * n_tokens), 1))
        n = duet.tokens_per_frame
        assert duet.budget == round(average(layer_counts(n, duet.stages, 28))) < n
        for method in ("fastv", "pyramiddrop", "fitprune", "hired"):
            assert plan_qwen(ReductionConfig(method, 999, **shares), 28, n_tokens).budget == duet.budget
    assert plan_qwen(ReductionConfig("duet", k1=30, dominant_share=0.65), 28, 150).k1 == 30  # a count wins
    counted = plan_qwen(ReductionConfig("duet", 999, k1=540, k2=100), 28, 150)  # capped: 149 + 1
    assert counted.budget == round(average(layer_counts(150, counted.stages, 28)))
    with pytest.raises(ValueError, match="Qwen2.5-VL"):
        plan(ReductionConfig("duet", 64, dominant_share=0.65), 32)
    with pytest.raises(ValueError, match="sum to at most 1"):
        ReductionConfig("duet", dominant_share=0.9, contextual_share=0.2)


# ------------------------------------------------------------- transcriptions of the authors' code
def authors_score(q, k, window_index):
    """``Qwen2_5_VLVisionSdpaAttention`` l.360-366 + the tower's end, l.625-632 (H, N, hd inputs)."""
    logits = F.softmax(torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5), dim=-1)
    reverse = torch.argsort(window_index)
    attn_mean = logits.mean(dim=0).sum(dim=0)
    attn_mean = attn_mean.view(attn_mean.shape[0] // 4, -1).mean(dim=-1)[reverse]
    attn_key = k.view(k.shape[0], k.shape[1] // 4, 4, k.shape[-1]).mean(dim=2)
    return attn_mean, attn_key[:, reverse, :].mean(dim=0).unsqueeze(0)


def test_received_attention_pooled_and_unwindowed_equals_the_authors_dense_map():
    torch.manual_seed(0)
    heads, n, hd = 3, 40, 8
    q, k = torch.randn(heads, n, hd), torch.randn(heads, n, hd)
    window_index = torch.randperm(n // 4)
    expected, expected_keys = authors_score(q, k, window_index)
    reverse = torch.argsort(window_index)
    ours = group_mean(received_attention(q, k, hd ** -0.5, max_probs=heads * n * 3), 4)[reverse]  # 3 rows a chunk
    keys = group_mean(k, 4, dim=1)[:, reverse].mean(dim=0)
    assert torch.allclose(ours, expected, atol=1e-5) and torch.allclose(keys, expected_keys[0], atol=1e-6)


def authors_v2v(attn_logits, attn_key, embeds, dominant_num, contextual_num, cluster_width, ori):
    """``Qwen2_5_VLForConditionalGeneration.forward`` l.2394-2499 on one image filling the sequence."""
    topk_indices = torch.topk(attn_logits, dominant_num).indices
    mask = torch.zeros_like(attn_logits, dtype=torch.bool)
    mask[topk_indices] = True
    contextual_mask = ~mask
    metric = attn_key[:, contextual_mask]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    B, M, D = metric.shape
    expand = lambda idx, dim: idx.unsqueeze(-1).expand(-1, -1, dim)  # noqa: E731
    if ori:
        step = max(1, M // contextual_num)
        target = torch.arange(0, M, step)[:contextual_num].unsqueeze(0)
        merge = torch.arange(M)[~torch.isin(torch.arange(M), target[0])].unsqueeze(0)
    else:
        pre = min(max(1, cluster_width * contextual_num), M)
        pre_idx = attn_logits[contextual_mask].topk(pre).indices.unsqueeze(0)
        step = max(1, pre // max(1, contextual_num))
        anchor_pos = torch.arange(0, pre, step)[:contextual_num].unsqueeze(0)
        target = pre_idx.gather(1, anchor_pos)
        keep = torch.ones(pre, dtype=torch.bool)
        keep[anchor_pos[0]] = False
        merge = pre_idx[:, keep]
    target_tokens = torch.gather(metric, 1, expand(target, D))
    to_merge = torch.gather(metric, 1, expand(merge, D))
    similarity = torch.bmm(to_merge, target_tokens.transpose(1, 2))
    one_hot = torch.zeros(1, to_merge.shape[1], target.shape[1])
    one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    select = torch.zeros_like(attn_logits, dtype=torch.bool)
    select[topk_indices] = True
    false_pos = (~select).nonzero(as_tuple=True)[0]
    select[false_pos[target]] = True
    filtered = embeds[None][:, contextual_mask]
    target_hidden = torch.gather(filtered, 1, expand(target, filtered.shape[2]))
    aggregated = torch.bmm(one_hot.transpose(1, 2), torch.gather(filtered, 1, expand(merge, filtered.shape[2]))) / counts
    out = embeds.clone()
    out[false_pos[target][0]] = (target_hidden + aggregated)[0]
    return out[select], torch.nonzero(select).flatten()


@pytest.mark.parametrize("ori", [False, True])
def test_slot_merge_equals_the_authors_v2v(ori):
    torch.manual_seed(1)
    n, d = 48, 6
    scores, keys, embeds = torch.rand(n), torch.randn(n, 5), torch.randn(n, d)
    expected, kept = authors_v2v(scores, keys[None], embeds, 20, 5, 4, ori)
    m = slot_merge(embeds, keys, scores, 20, 5, None if ori else 4)
    assert m.slots == kept.tolist()
    assert torch.allclose(m.tokens, expected, atol=1e-6)
    assert len(m.discarded) == (0 if ori else n - 20 - 20)


def test_t2v_ranks_as_pdrop_rank_drop(qwen_engine, wide_image, monkeypatch):
    """The stage at layer 14 scores and keeps what ``pdrop_rank_drop`` (l.1651-1780: layer 14's
    q/k after M-RoPE, every row after the image, no causal mask) does on the same layer input."""
    seen = {}
    real = decoder.run

    def capture(lm, h, rows, *args, on_layer=None, **kwargs):
        def at(index, hidden, r):
            if index == 14:
                seen["h"], seen["rows"] = hidden.clone(), r
        return real(lm, h, rows, *args, on_layer=at, **kwargs)

    monkeypatch.setattr(decoder, "run", capture)
    trace = qwen_engine.answer(wide_image, QUESTION, ReductionConfig("duet", k1=60, k2=10), max_new_tokens=1)
    lm, h, rows = qwen_engine.lm, seen["h"], seen["rows"]
    layer = lm.layers[14]
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    T = x.shape[1]
    q = attn.q_proj(x).view(1, T, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(h, rows.pos)
    q, k = qwen_engine.apply_rope(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_heads // k.shape[1], dim=1)
    visual = rows.visual[0].nonzero().flatten()
    start, n_img = int(visual[0]), len(visual)
    w = F.softmax(torch.matmul(q[0][:, start + n_img:], k[0].transpose(-1, -2)) / math.sqrt(attn.head_dim), dim=-1)
    image_attention = w.mean(dim=0).mean(dim=0)[start:start + n_img]
    kept = image_attention.topk(int(n_img * 0.5)).indices.sort().values
    stage = trace["t2v"][0]
    assert stage["layer"] == 14 and torch.allclose(torch.tensor(stage["scores"]), image_attention, atol=1e-5)
    assert stage["kept"] == kept.tolist()


def test_cli_answer_json_runs_the_authors_preset_on_a_non_square_image(tiny_qwen, tmp_path, capsys):
    """``python -m model answer --method duet --json`` without a budget: the scripts' 540 + 100
    tokens, stages 14 and 21 at 50 % and 25 % of them, survivors at their original 3-D ids."""
    import json

    import numpy as np
    from PIL import Image

    from model.cli import main

    path = tmp_path / "wide.png"
    Image.fromarray(np.random.RandomState(2).randint(0, 255, (868, 1008, 3), dtype=np.uint8)).save(path)
    assert main(["answer", "--model", str(tiny_qwen), "--image", str(path), "--question", QUESTION,
                 "--method", "duet", "--max-new-tokens", "3", "--json"]) == 0
    trace = json.loads(capsys.readouterr().out)
    frame = trace["frames"][0]
    assert trace["grid"] == [31, 36] and frame["n_tokens"] == 640 and not frame["cls_kept"]
    assert len(frame["dominant"]) == 540 and len(frame["clusters"]) == 100
    assert len(frame["discarded"]) == 31 * 36 - 540 - 400
    assert [(s["layer"], s["n_in"], len(s["kept"])) for s in trace["t2v"]] == [(14, 640, 320), (21, 320, 160)]
    assert trace["positions"] == "original" and trace["visual_tokens_per_layer"][20:22] == [320, 160]
    assert main(["answer", "--model", str(tiny_qwen), "--image", str(path), "--question", QUESTION,
                 "--method", "duet", "--dominant-share", "0.65", "--contextual-share", "0.05",
                 "--max-new-tokens", "1", "--json"]) == 0
    shared = json.loads(capsys.readouterr().out)["frames"][0]
    assert len(shared["dominant"]) == int(0.65 * 1116) and len(shared["clusters"]) == int(0.05 * 1116)
    assert main(["answer", "--model", str(tiny_qwen), "--video", str(path), "--question", QUESTION]) == 2
