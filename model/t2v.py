"""Stage B of DUET-VLM (T2V) and the LLM-side scoring shared with FastV and PyramidDrop.

Pure functions: which tokens a question's salient words cover (the words themselves come from
``salient.salient_spans``), how much attention a set of query rows pays each visual token
(computed from one layer's q/k, so the model keeps running on SDPA), and which tokens survive.
"""

from __future__ import annotations

import torch


def tokens_overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Indices of tokens whose character offsets overlap any span."""
    return [
        i for i, (a, b) in enumerate(offsets)
        if b > a and any(a < end and start < b for start, end in spans)
    ]


def attention_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Causal softmax attention of a few query rows over all keys, per head.

    queries: (H, Q, hd) after RoPE; keys: (Hkv, K, hd) after RoPE (GQA heads are shared);
    positions order the causal mask (a query sees keys at positions <= its own); ``None``
    positions: no mask, every query sees every key (DUET's Qwen2.5-VL ranking,
    ``modeling_qwen2_5vl_duet.py`` l.1732-1733).
    Returns (H, Q, K) probabilities.
    """
    n_heads, n_kv = queries.shape[0], keys.shape[0]
    keys = keys.repeat_interleave(n_heads // n_kv, dim=0)
    logits = torch.einsum("hqd,hkd->hqk", queries.float(), keys.float()) * scaling
    if query_positions is None:
        return logits.softmax(dim=-1)
    causal = key_positions[None, :] <= query_positions[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` best scores, returned in their original (ascending) order.
    Ties go to the earlier token, so the choice is deterministic."""
    n_keep = max(0, min(n_keep, scores.shape[0]))
    ranked = torch.sort(scores.float(), descending=True, stable=True).indices
    return ranked[:n_keep].sort().values


def fitprune_parts(head_max: torch.Tensor, visual_rows: torch.Tensor, text_rows: torch.Tensor):
    """FitPrune's two attention weights of each visual token (ywh187/FitPrune ``modeling_llama.py``
    l.393-398) from one layer's attention map ``head_max`` (T, T), the maximum over heads:
    self = the mass visual rows pay it, divided by the number of visual tokens; cross = the mass
    the rows after the image (question and answer prompt) pay it. It ranks by self x cross."""
    on_visual = head_max[:, visual_rows]
    self_weight = on_visual[visual_rows].sum(dim=0) / len(visual_rows)
    cross_weight = on_visual[text_rows].sum(dim=0)
    return self_weight, cross_weight


def layer_probs(layer, h: torch.Tensor, rope, pos: torch.Tensor | None, query_rows: torch.Tensor,
                apply_rope) -> torch.Tensor:
    """(H, Q, T) causal softmax attention of ``query_rows`` over every row of one sequence at a
    stock decoder ``layer``, from its own q/k: ``h`` (T, d) is the layer's input, ``rope`` the
    (cos, sin) of the sequence (1, T, hd), ``apply_rope`` the decoder family's RoPE helper;
    ``pos`` (T,) orders the causal mask (``None``: no mask)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    hd = attn.head_dim
    cos, sin = rope
    q = attn.q_proj(x[query_rows]).view(1, len(query_rows), -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[0], -1, hd).transpose(1, 2)
    q = apply_rope(q, q, cos[:, query_rows], sin[:, query_rows])[0]
    k = apply_rope(k, k, cos, sin)[1]
    return attention_probs(q[0], k[0], None if pos is None else pos[query_rows], pos, attn.scaling)


def layer_scores(layer, h, rope, pos, query_rows, visual_rows, apply_rope) -> torch.Tensor:
    """What T2V, FastV and PyramidDrop rank by: the attention ``query_rows`` pay each of
    ``visual_rows`` at ``layer``, mean over heads and query rows."""
    return layer_probs(layer, h, rope, pos, query_rows, apply_rope)[..., visual_rows].mean(dim=(0, 1))


def fitprune_scores(layer, h, rope, pos, visual_rows, text_rows, apply_rope) -> tuple[torch.Tensor, dict]:
    """FitPrune's ranking at ``layer`` (``fitprune_parts`` on the head-max map of every row):
    (self x cross per visual row, {"self": ..., "cross": ...})."""
    every_row = torch.arange(h.shape[0], device=h.device)
    head_max = layer_probs(layer, h, rope, pos, every_row, apply_rope).amax(dim=0)
    self_weight, cross_weight = fitprune_parts(head_max, visual_rows, text_rows)
    return cross_weight * self_weight, {"self": self_weight, "cross": cross_weight}
