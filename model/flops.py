"""Analytic prefill FLOPs (SPEC §6): the physical limit a token reduction can buy.

A transformer layer over n tokens with hidden d and MLP width f costs about
2*n*(4*d^2 + m*d*f) + 4*n^2*d multiply-adds*2, where m = 3 for a gated (Llama) MLP and 2 for
CLIP's plain MLP. Scoring costs of V2V/T2V are not included (they are measured instead).
"""

from __future__ import annotations


def layer_flops(n_tokens: int, hidden: int, mlp: int, mlp_mats: int = 3) -> float:
    return 2.0 * n_tokens * (4 * hidden**2 + mlp_mats * hidden * mlp) + 4.0 * n_tokens**2 * hidden


def llm_flops(tokens_per_layer: list[int], hidden: int, mlp: int) -> float:
    return sum(layer_flops(n, hidden, mlp) for n in tokens_per_layer)


def vision_flops(n_frames: int, n_tokens: int, n_layers: int, hidden: int, mlp: int) -> float:
    return n_frames * n_layers * layer_flops(n_tokens, hidden, mlp, mlp_mats=2)
