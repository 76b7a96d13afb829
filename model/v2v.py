"""Stage A of DUET-VLM (V2V) and VisionZip's merge: pure functions over one frame's tokens.

Inputs are plain tensors of one image/frame (no model): the hidden states ``hidden`` (1 + P, d)
that the vision feature layer outputs, CLS first; that layer's keys averaged over heads ``keys``
(1 + P, dk), the "metric"; and ``scores`` (P,), the CLS row of that layer's attention over the
patches, summed over heads. Outputs are a :class:`Merge`: the reduced tokens plus the record of
which patches each token stands for and which were discarded, all the visualisation needs.

Both methods, as their official code runs them (``dominant`` counts the CLS token, as
``visionzip(model, dominant=...)`` passes ``dominant_num=dominant-1`` to the tower):

* CLS + the ``dominant - 1`` best-scoring patches stay unchanged, CLS first, patches in raster
  order (the boolean-mask ``masked_select`` keeps index order).
* The other M patches form a *pool*. DUET (AMD-AGI/DUET-VLM ``visionzip/clip_encoder_cw.py``
  l.72-77): the top ``min(max(1, cluster_width * contextual), M)`` of them by score, in score
  order; ``cluster_width`` is a pool multiplier, not a spatial window, and every patch outside the
  pool is discarded. VisionZip (dvlab-research/VisionZip ``visionzip/clip_encoder.py``): all M,
  in index order; nothing is discarded.
* Anchors sit at pool ranks 0, step, 2*step, ... (first ``contextual``), step = max(1, pool //
  contextual) (``clip_encoder_cw.py`` l.79-87); every other pool member joins the anchor whose
  metric is most cosine-similar (l.96-102, argmax over anchors, no spatial limit).
* A contextual token is the anchor's hidden state plus the mean of its members' (l.103-110: a
  sum, the anchor alone when nobody joined); contextual tokens follow the dominant ones in anchor
  order (l.144).

Choices where the code is silent or degenerate (also in the record): score ties go to the lower
patch index (``torch.topk`` leaves them unspecified); ``contextual = 0`` gives no contextual token
(the official fallback would still build one from the best pool member).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Merge:
    tokens: torch.Tensor  # (n, d): [CLS, dominant patches (raster)] then contextual tokens (anchor order)
    token_patches: list[list[int]]  # patches each output token stands for ([] for CLS), same order
    dominant: list[int]  # dominant patch ids, raster order (CLS not included)
    clusters: list[dict]  # {"centroid": anchor patch, "members": sorted patches incl. the anchor}
    discarded: list[int]  # patches that no output token stands for
    cls_kept: bool = True  # the first token is the CLS token
    slots: list[int] | None = None  # per output token: the input token whose place it takes (``slot_merge``)

    def record(self, scores: torch.Tensor) -> dict:
        return {
            "dominant": self.dominant,
            "cls_kept": self.cls_kept,
            "clusters": self.clusters,
            "discarded": self.discarded,
            "scores": scores.tolist(),
        }


def cls_attention(query_cls: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention the CLS row pays every patch, summed over heads (``clip_encoder_cw.py`` l.52-53).

    query_cls: (H, hd) the CLS query per head; keys: (H, 1 + P, hd) with CLS first.
    Returns (P,): the softmax runs over all 1 + P keys, then the CLS column is dropped.
    """
    logits = torch.einsum("hd,hkd->hk", query_cls.float(), keys.float()) * scaling
    return logits.softmax(dim=-1)[:, 1:].sum(dim=0)


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; ties go to the lower index so results are deterministic."""
    return torch.sort(scores.float(), descending=True, stable=True).indices


def pool_size(n_rest: int, contextual: int, cluster_width: int) -> int:
    """How many non-dominant patches DUET's pool holds (``clip_encoder_cw.py`` l.76)."""
    return min(max(1, cluster_width * contextual), n_rest)


def anchor_ranks(pool: int, contextual: int) -> list[int]:
    """Pool ranks of the anchors: every (pool // contextual)-th, the first ``contextual`` of them."""
    if contextual <= 0 or pool <= 0:
        return []
    step = max(1, pool // contextual)
    return list(range(0, pool, step))[:contextual]


@dataclass
class _Groups:
    """The decisions both token orders share, over P tokens without CLS."""

    dominant: torch.Tensor  # dominant token ids, ascending
    anchors: torch.Tensor  # anchor ids, in pool order
    members: list[list[int]]  # per anchor: the anchor, then its joiners in pool order
    contextual: torch.Tensor  # (len(anchors), d) anchor + mean of its joiners
    discarded: list[int]


def _group(tokens, keys, scores, n_dominant: int, contextual: int, pool_of) -> _Groups:
    """Dominant tokens, the pool, its anchors and who joins them, for ``tokens`` (P, d) with the
    metric ``keys`` (P, dk) and ``scores`` (P,); ``pool_of(rest)`` orders and cuts the
    non-dominant ids (raster order in)."""
    n_tokens = scores.shape[0]
    if contextual < 0:
        raise ValueError(f"contextual must be >= 0, got {contextual}")
    top = rank(scores)[:n_dominant].sort().values
    is_rest = torch.ones(n_tokens, dtype=torch.bool, device=scores.device)
    is_rest[top] = False
    rest = torch.nonzero(is_rest).flatten()  # raster order
    pool = pool_of(rest)
    at = anchor_ranks(len(pool), contextual)
    is_anchor = torch.zeros(len(pool), dtype=torch.bool, device=scores.device)
    is_anchor[at] = True
    anchors, joiners = pool[is_anchor], pool[~is_anchor]  # both in pool order
    members = [[a] for a in anchors.tolist()]
    contextual_tokens = tokens[anchors].clone()
    if len(joiners) and len(anchors):
        metric = F.normalize(keys.float(), dim=-1)
        choice = (metric[joiners] @ metric[anchors].T).argmax(dim=1)
        sums = torch.zeros_like(contextual_tokens).index_add_(0, choice, tokens[joiners])
        counts = torch.bincount(choice, minlength=len(anchors)).clamp(min=1).to(sums.dtype)
        contextual_tokens = contextual_tokens + sums / counts[:, None]
        for patch, anchor in zip(joiners.tolist(), choice.tolist()):
            members[anchor].append(patch)
    in_pool = torch.zeros(n_tokens, dtype=torch.bool, device=scores.device)
    in_pool[pool] = True
    discarded = torch.nonzero(is_rest & ~in_pool).flatten().tolist()
    return _Groups(top, anchors, members, contextual_tokens, discarded)


def _merge(hidden, keys, scores, dominant: int, contextual: int, pool_of) -> Merge:
    """LLaVA's order: [CLS, dominant patches (raster)] then the contextual tokens (anchor order)."""
    n_patches = scores.shape[0]
    if not 1 <= dominant <= n_patches + 1:
        raise ValueError(f"dominant counts the CLS token and must lie in 1..{n_patches + 1}, got {dominant}")
    patches = hidden[1:]
    g = _group(patches, keys[1:], scores, dominant - 1, contextual, pool_of)
    dominant_ids = g.dominant.tolist()
    tokens = torch.cat([hidden[:1], patches[g.dominant], g.contextual])
    return Merge(
        tokens=tokens,
        token_patches=[[]] + [[p] for p in dominant_ids] + [sorted(m) for m in g.members],
        dominant=dominant_ids,
        clusters=[{"centroid": m[0], "members": sorted(m)} for m in g.members],
        discarded=g.discarded,
    )


def duet_merge(hidden: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, dominant: int, contextual: int,
               cluster_width: int = 4) -> Merge:
    """DUET V2V (module docstring): CLS + ``dominant - 1`` patches kept, ``contextual`` tokens
    merged from the ``cluster_width * contextual`` best remaining patches, the rest discarded."""
    if cluster_width < 0:
        raise ValueError(f"cluster_width must be >= 0, got {cluster_width}")

    def best_of(rest):
        return rest[rank(scores[rest])][: pool_size(len(rest), contextual, cluster_width)]

    return _merge(hidden, keys, scores, dominant, contextual, best_of)


def visionzip_merge(hidden: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, dominant: int,
                    contextual: int) -> Merge:
    """VisionZip (Yang et al., CVPR 2025): CLS + ``dominant - 1`` patches kept, every remaining
    patch merged into ``contextual`` targets evenly spaced along them in index order."""
    return _merge(hidden, keys, scores, dominant, contextual, lambda rest: rest)


def hired_select(hidden: torch.Tensor, scores: torch.Tensor, kept: int) -> Merge:
    """HiRED (hasanar1f/HiRED ``modeling_llava.py`` ``HiRED_token_selection``, l.340-353): the
    ``kept`` best patches by the CLS attention summed over heads, in raster order; CLS and every
    other patch are dropped before the projector."""
    n_patches = scores.shape[0]
    if not 1 <= kept <= n_patches:
        raise ValueError(f"HiRED keeps 1..{n_patches} patches, got {kept}")
    top = rank(scores)[:kept].sort().values
    is_dropped = torch.ones(n_patches, dtype=torch.bool, device=scores.device)
    is_dropped[top] = False
    chosen = top.tolist()
    return Merge(tokens=hidden[1:][top], token_patches=[[p] for p in chosen], dominant=chosen, clusters=[],
                 discarded=torch.nonzero(is_dropped).flatten().tolist(), cls_kept=False)


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                       max_probs: int = 2**24) -> torch.Tensor:
    """Attention each token *receives* (DUET's score where there is no CLS token,
    ``qwen2_5_vl/modeling_qwen2_5vl_duet.py`` l.360-366 and l.625-632): softmax(q kᵀ · scaling)
    over every key, mean over heads, summed over the query rows.

    queries, keys: (H, N, hd) after RoPE. Returns (N,). The authors build the whole H x N x N map;
    here query rows run in chunks so at most ``max_probs`` probabilities exist at once (a
    2880-token image at 7B's 16 heads would need 8.5 GB for it in fp32)."""
    n_heads, n_tokens, _ = queries.shape
    chunk = max(1, max_probs // (n_heads * n_tokens))
    received = torch.zeros(n_tokens, dtype=torch.float32, device=keys.device)
    k = keys.float()
    for start in range(0, n_tokens, chunk):
        logits = torch.einsum("hqd,hkd->hqk", queries[:, start:start + chunk].float(), k) * scaling
        received += logits.softmax(dim=-1).mean(dim=0).sum(dim=0)
    return received


def group_mean(values: torch.Tensor, group: int, dim: int = 0) -> torch.Tensor:
    """The mean of every ``group`` consecutive entries along ``dim`` (Qwen2.5-VL's 2 x 2 PatchMerger
    groups are 4 consecutive tokens, ``modeling_qwen2_5vl_duet.py`` l.628 and l.631)."""
    shape = values.shape
    return values.reshape(*shape[:dim], shape[dim] // group, group, *shape[dim + 1:]).mean(dim=dim + 1)


def slot_merge(tokens: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, dominant: int, contextual: int,
               cluster_width: int | None = 4) -> Merge:
    """DUET V2V (``cluster_width`` set) or VisionZip (``None``) as DUET's Qwen2.5-VL code runs them
    (``modeling_qwen2_5vl_duet.py`` l.2373-2499): no CLS, so ``dominant`` counts tokens; the
    dominant tokens, the pool (DUET: the ``cluster_width * contextual`` best of the rest, in score
    order; VisionZip: all of the rest, in index order), the anchors, their joiners and the
    contextual token (anchor + mean of its joiners) as in the LLaVA rule (module docstring).

    The order differs: each output token takes its own place in the sequence, a contextual token
    its anchor's (l.2469-2472, l.2496-2499: the kept positions of a boolean mask), so the tokens
    come in index order of [dominant and anchors] and ``slots`` names each one's place, whose
    position id it keeps. ``contextual = 0`` keeps only the dominant tokens (HiRED)."""
    n_tokens = scores.shape[0]
    if not 0 <= dominant <= n_tokens:
        raise ValueError(f"dominant must lie in 0..{n_tokens}, got {dominant}")
    if cluster_width is not None and cluster_width < 0:
        raise ValueError(f"cluster_width must be >= 0, got {cluster_width}")

    def pool_of(rest):
        if cluster_width is None:
            return rest
        return rest[rank(scores[rest])][: pool_size(len(rest), contextual, cluster_width)]

    g = _group(tokens, keys, scores, dominant, contextual, pool_of if contextual else (lambda rest: rest[:0]))
    slots = torch.cat([g.dominant, g.anchors])
    order = torch.sort(slots).indices
    out = torch.cat([tokens[g.dominant], g.contextual])[order]
    token_patches = [[p] for p in g.dominant.tolist()] + [sorted(m) for m in g.members]
    return Merge(
        tokens=out,
        token_patches=[token_patches[i] for i in order.tolist()],
        dominant=g.dominant.tolist(),
        clusters=[{"centroid": m[0], "members": sorted(m)} for m in g.members],
        discarded=g.discarded,
        cls_kept=False,
        slots=slots[order].tolist(),
    )
