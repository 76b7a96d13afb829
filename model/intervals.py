"""95 % intervals of accuracies, for the tables that report them (the lab's EVAL.md runs, the
trace browser's dataset view)."""

from __future__ import annotations

import math


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy of ``correct`` / ``n``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return centre - half, centre + half


def score_interval(scores: list[float], z: float = 1.96) -> tuple[float, float]:
    """The 95 % interval of the mean of per-document scores in [0, 1]: Wilson's when every score is
    0 or 1 (exact match), else the normal interval of the mean, clipped to [0, 1] (a task whose
    metric gives partial credit, such as ANLS)."""
    if all(s in (0, 1) for s in scores):
        return wilson(int(sum(scores)), len(scores), z)
    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.5
    half = z * sd / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half)
