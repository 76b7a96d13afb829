"""Stage A of DUET-VLM (V2V) and VisionZip's merge: pure functions over one frame's patches.

Inputs are plain tensors of one image/frame (no model): patch hidden states ``hidden`` (P, d) at
the vision feature layer, that layer's keys averaged over heads ``keys`` (P, dk) and the CLS
attention ``scores`` (P,). Outputs are a :class:`Merge`: the reduced tokens plus the record of
which patches each token stands for, which is all the visualisation needs.

DUET's "local neighbourhood averaging" (paper §3.1; the official code's ``cluster_width``) is read
as: the k2 highest-scoring non-dominant patches are centroids; every other non-dominant patch
joins the centroid whose key is most cosine-similar among the centroids within ``cluster_width``
patches of it on the grid (Chebyshev distance), or the most similar centroid overall when none is
that close; each cluster becomes the mean of its members' hidden states, centroid included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Merge:
    tokens: torch.Tensor  # (k1 + k2, d), ordered by representative patch (raster order)
    token_patches: list[list[int]]  # patches each output token stands for, same order
    dominant: list[int]
    clusters: list[dict]  # {"centroid": patch, "members": [patches]} (members include centroid)

    def record(self, scores: torch.Tensor) -> dict:
        return {
            "dominant": self.dominant,
            "clusters": self.clusters,
            "scores": scores.tolist(),
        }


def cls_attention(query_cls: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention the CLS row pays every patch, mean over heads.

    query_cls: (H, hd) the CLS query per head; keys: (H, 1 + P, hd) with CLS first.
    Returns (P,) -- the CLS column itself is dropped after the softmax, as in VisionZip.
    """
    logits = torch.einsum("hd,hkd->hk", query_cls.float(), keys.float()) * scaling
    return logits.softmax(dim=-1)[:, 1:].mean(dim=0)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; ties go to the lower index so results are deterministic."""
    return torch.sort(scores.float(), descending=True, stable=True).indices


def _assemble(hidden, representatives, members_of, dominant) -> Merge:
    order = sorted(representatives)
    groups = [members_of[r] for r in order]
    index = torch.tensor([p for g in groups for p in g], device=hidden.device)
    owner = torch.repeat_interleave(
        torch.arange(len(groups), device=hidden.device),
        torch.tensor([len(g) for g in groups], device=hidden.device),
    )
    summed = torch.zeros(len(groups), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    summed.index_add_(0, owner, hidden[index])
    sizes = torch.tensor([len(g) for g in groups], dtype=hidden.dtype, device=hidden.device)
    clusters = [{"centroid": r, "members": members_of[r]} for r in order if r not in dominant]
    return Merge(summed / sizes[:, None], groups, sorted(dominant), clusters)


def _split_dominant(scores: torch.Tensor, k1: int, k2: int):
    n_patches = scores.shape[0]
    if not 0 <= k1 + k2 <= n_patches:
        raise ValueError(f"k1 + k2 = {k1 + k2} exceeds the {n_patches} patches")
    ranked = _rank(scores)
    dominant = ranked[:k1]
    is_rest = torch.ones(n_patches, dtype=torch.bool, device=scores.device)
    is_rest[dominant] = False
    rest = torch.nonzero(is_rest).flatten()  # raster order
    return dominant.tolist(), rest


def duet_merge(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    scores: torch.Tensor,
    grid: tuple[int, int],
    k1: int,
    k2: int,
    cluster_width: int = 4,
) -> Merge:
    """DUET V2V: k1 dominant patches kept + k2 local clusters merged (see module docstring).

    With k2 = 0 the non-dominant patches are discarded (pure dominant selection).
    """
    dominant, rest = _split_dominant(scores, k1, k2)
    members_of = {p: [p] for p in dominant}
    if k2 > 0 and len(rest) > 0:
        by_score = rest[_rank(scores[rest])]
        centroids, others = by_score[:k2], by_score[k2:].sort().values
        for c in centroids.tolist():
            members_of[c] = [c]
        if len(others) > 0:
            unit = F.normalize(keys.float(), dim=-1)
            similarity = unit[others] @ unit[centroids].T  # (n_others, k2)
            cols = grid[1]
            distance = torch.maximum(
                (others[:, None] // cols - centroids[None, :] // cols).abs(),
                (others[:, None] % cols - centroids[None, :] % cols).abs(),
            )
            near = distance <= cluster_width
            local = similarity.masked_fill(~near, float("-inf"))
            choice = torch.where(near.any(dim=1), local.argmax(dim=1), similarity.argmax(dim=1))
            for patch, c in zip(others.tolist(), centroids[choice].tolist()):
                members_of[c].append(patch)
        for c in centroids.tolist():
            members_of[c].sort()
    return _assemble(hidden, members_of.keys(), members_of, set(dominant))


def visionzip_merge(hidden: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, k1: int, k2: int) -> Merge:
    """VisionZip: k1 dominant patches by CLS attention; the remaining patches are merged into k2
    contextual tokens whose targets are spaced uniformly along the remaining (raster-ordered)
    patches; every other patch joins its most key-similar target, and each group is averaged
    (Yang et al., "VisionZip", CVPR 2025, §3.2; dvlab-research/VisionZip)."""
    dominant, rest = _split_dominant(scores, k1, k2)
    members_of = {p: [p] for p in dominant}
    if k2 > 0 and len(rest) > 0:
        step = max(1, len(rest) // k2)
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, len(rest), step, device=rest.device)[:k2]] = True
        targets, others = rest[is_target], rest[~is_target]
        for t in targets.tolist():
            members_of[t] = [t]
        if len(others) > 0:
            unit = F.normalize(keys.float(), dim=-1)
            choice = (unit[others] @ unit[targets].T).argmax(dim=1)
            for patch, t in zip(others.tolist(), targets[choice].tolist()):
                members_of[t].append(patch)
    return _assemble(hidden, members_of.keys(), members_of, set(dominant))
