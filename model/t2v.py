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
    positions order the causal mask (a query sees keys at positions <= its own).
    Returns (H, Q, K) probabilities.
    """
    n_heads, n_kv = queries.shape[0], keys.shape[0]
    keys = keys.repeat_interleave(n_heads // n_kv, dim=0)
    logits = torch.einsum("hqd,hkd->hqk", queries.float(), keys.float()) * scaling
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
