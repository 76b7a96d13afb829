"""Turn a method + visual-token budget into a concrete reduction plan.

A *budget* is the average number of visual tokens per LLM layer (SPEC §1), so one-shot methods
(VisionZip), layer-wise schedules (PyramidDrop, FastV) and DUET's two stages are compared on one
scale. A plan says how many tokens leave the vision encoder per frame (``k1`` dominant tokens,
the CLS token counted, + ``k2`` contextual ones) and, for
the LLM, at which layers how many visual tokens survive (``stages``). Every knob can be overridden
through :class:`ReductionConfig`; anything left ``None`` is derived here.

Depth scaling: LLaVA-1.5-7B has 32 decoder layers; other depths scale every preset layer by
L/32 (DUET 16/24 -> L/2, 3L/4; PyramidDrop 8/16/24 -> L/4, L/2, 3L/4; FastV K=2 -> round(L/16)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .v2v import anchor_ranks, pool_size

METHODS = ("full", "duet", "visionzip", "fastv", "pyramiddrop", "hired", "fitprune")
PRESET_BUDGETS = (192, 128, 64)
PRESET_PATCHES = 576

# DUET-VLM LLaVA-1.5 presets for 576 patches: (dominant tokens counting CLS, contextual tokens).
# 192: scripts/llava/v1_5/pdrop_eval/*.sh (--dominant 300 --contextual 7); 128: the README's usage
# example (170, 35). 64 is not published: ours keeps the 128 preset's contextual share (35 / 205)
# of n = 102, the V2V output whose T2V average is 63.75.
DUET_PRESETS = {192: (300, 7), 128: (170, 35), 64: (85, 17)}
DUET_PUBLISHED = frozenset({192, 128})
DUET_STAGE_RATIOS = (0.5, 0.0)
# Video-LLaVA (scripts/videollava/v1_5/eval/run_qa_*.sh): 160 + 32 tokens per frame, the same
# stages, ranked by the last instruction token.
VIDEO_LLAVA_DUET = dict(k1=160, k2=32, query="last")
# VisionZip's published dominant (counting CLS) + contextual splits.
VISIONZIP_PRESETS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
QUERIES = ("salient", "text", "last", "all")  # "fitprune" (self x cross, FitPrune's own) is no option
POSITIONS = ("contiguous", "original")
# Each method's official position ids after a drop: FastV keeps the survivors' ids
# (keep_indexs as position_ids); DUET and PyramidDrop renumber (arange(0, cur_len)).
DEFAULT_POSITIONS = {"fastv": "original", "fitprune": "original"}
DEFAULT_QUERY = {"duet": "salient", "pyramiddrop": "last", "fastv": "last", "fitprune": "fitprune"}


@dataclass(frozen=True)
class ReductionConfig:
    """What the user asked for. ``None`` fields are solved from the budget."""

    method: str = "duet"
    budget: int = 192
    k1: int | None = None
    k2: int | None = None
    cluster_width: int = 4
    stage_layers: tuple[int, ...] | None = None
    stage_ratios: tuple[float, ...] | None = None
    fastv_k: int | None = None
    salient_words: tuple[str, ...] | None = None
    positions: str | None = None  # position ids after a reduction; None: the method's own (DEFAULT_POSITIONS)
    query: str | None = None  # T2V query rows; None: the method's own (DEFAULT_QUERY)
    # FitPrune: visual tokens deleted after each LLM layer; None: the analytic schedule (plan())
    fitprune_deletions: tuple[int, ...] | None = None
    # Qwen2.5-VL: V2V's dominant / contextual tokens as shares of each image's tokens (the authors'
    # ``dominant_ratio`` / ``contextual_ratio``, run_inference.py's 0.65 / 0.05); k1 / k2 win.
    dominant_share: float | None = None
    contextual_share: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 1 <= int(self.budget) <= 100_000:
            raise ValueError(f"budget must be a positive number of visual tokens, got {self.budget}")
        for name in ("k1", "k2"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.positions not in (None, *POSITIONS):
            raise ValueError(f"positions must be 'contiguous' or 'original', got {self.positions!r}")
        if self.query not in (None, *QUERIES):
            raise ValueError(f"query must be one of {', '.join(QUERIES)}, got {self.query!r}")
        if self.cluster_width < 0:
            raise ValueError(f"cluster_width must be >= 0, got {self.cluster_width}")
        if self.stage_ratios is not None and any(not 0.0 <= r <= 1.0 for r in self.stage_ratios):
            raise ValueError(f"stage ratios must lie in [0, 1], got {self.stage_ratios}")
        if (self.stage_layers is None) != (self.stage_ratios is None) or (
            self.stage_layers is not None and len(self.stage_layers) != len(self.stage_ratios)
        ):
            raise ValueError("stage_layers and stage_ratios must be given together, one ratio per layer")
        shares = [v for v in (self.dominant_share, self.contextual_share) if v is not None]
        if any(not 0.0 <= v < 1.0 for v in shares) or sum(shares) > 1.0:
            raise ValueError(f"the dominant and contextual shares must lie in [0, 1) and sum to at most 1, got {shares}")


@dataclass(frozen=True)
class Stage:
    """From ``layer`` on (before it runs), only the best-ranked visual tokens survive, ranked
    jointly over all frames (a relevant frame can keep more than a background one).

    How many: ``int(ratio * n)`` of the n visual tokens that entered the LLM when ``ratio`` is set
    (DUET and PyramidDrop: ``keep_length = int(image_tokens * ratio)``), else ``keep`` per frame
    (FastV's fixed count). ``keep`` is always the single-frame count. ``score_layer`` is the layer
    whose own q/k rank the tokens (FastV ranks at K-1 and drops at K); ``query`` says which rows
    score: ``salient`` text tokens + the last one (DUET inference), ``text`` = every row after the
    image (DUET's code when the checkpoint's config lacks ``use_salient_tokens``), ``last`` = the
    last instruction token (PyramidDrop, FastV, Video-LLaVA DUET) or ``all`` rows; ``fitprune``
    ranks by FitPrune's self x cross attention (``t2v.fitprune_scores``).
    """

    layer: int
    keep: int
    query: str
    score_layer: int
    ratio: float | None = None
    causal: bool = True  # the ranking softmax is causal (LLaVA's code); False: every key (DUET's Qwen2.5-VL code)

    def keep_of(self, n_visual: int, n_frames: int = 1) -> int:
        """Visual tokens that survive this stage when ``n_visual`` entered the LLM over ``n_frames``."""
        if self.ratio is not None:
            return int(self.ratio * n_visual)
        return self.keep * n_frames


@dataclass(frozen=True)
class Plan:
    method: str
    budget: int
    n_layers: int
    n_patches: int
    k1: int | None = None  # dominant tokens per frame, CLS counted (None: no vision-side reduction)
    k2: int = 0  # contextual (merged) tokens requested per frame
    cluster_width: int = 4
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    feasible: bool = True  # False when the budget is below what the method can reach
    positions: str = "contiguous"  # position ids after a reduction (see ReductionConfig)
    schedule: str | None = None  # FitPrune: "fitted" (fitprune.json) or "analytic" (fitprune_schedule)
    cls_token: bool = True  # k1 counts a CLS token (LLaVA); False: no CLS, k1 counts tokens (Qwen2.5-VL)

    @property
    def tokens_per_frame(self) -> int:
        """Tokens V2V hands the LLM per frame: k1 + the anchors the pool can hold."""
        if self.k1 is None:
            return self.n_patches
        if self.method == "hired":
            return self.k1
        rest = self.n_patches - self.k1 + self.cls_token
        pool = rest if self.method == "visionzip" else pool_size(rest, self.k2, self.cluster_width)
        return self.k1 + len(anchor_ranks(pool, self.k2))

    def counts_per_layer(self, n_frames: int = 1) -> list[int]:
        """Visual tokens each LLM layer sees under this plan."""
        return layer_counts(self.tokens_per_frame * n_frames, self.stages, self.n_layers, n_frames)


def layer_counts(n_visual: int, stages, n_layers: int, n_frames: int = 1) -> list[int]:
    counts, current = [], n_visual
    by_layer = {s.layer: s.keep_of(n_visual, n_frames) for s in stages}
    for layer in range(n_layers):
        if layer in by_layer:
            current = min(current, by_layer[layer])
        counts.append(current)
    return counts


def average(counts: list[int]) -> float:
    return sum(counts) / len(counts)


def _ratio_stages(n: int, layers, ratios, query: str) -> tuple[Stage, ...]:
    return tuple(Stage(l, int(r * n), query, l, r) for l, r in zip(layers, ratios))


def _scaled(layer_of_32: int, n_layers: int) -> int:
    return max(1, min(n_layers - 1, round(layer_of_32 * n_layers / 32)))


def plan(cfg: ReductionConfig, n_layers: int, n_patches: int = PRESET_PATCHES) -> Plan:
    """Solve ``cfg`` into a :class:`Plan` for a model with ``n_layers`` decoder layers."""
    if cfg.dominant_share is not None or cfg.contextual_share is not None:
        raise ValueError("shares of each image's tokens are for Qwen2.5-VL, whose images each have their own "
                         "grid; here every image has the same patches: give k1 / k2 or a budget")
    if cfg.stage_layers is not None and (
        list(cfg.stage_layers) != sorted(set(cfg.stage_layers)) or not all(1 <= l < n_layers for l in cfg.stage_layers)
    ):
        raise ValueError(f"stage layers must be increasing and within 1..{n_layers - 1}, got {list(cfg.stage_layers)}")
    positions = cfg.positions or DEFAULT_POSITIONS.get(cfg.method, "contiguous")
    base = Plan(cfg.method, int(cfg.budget), n_layers, n_patches, cluster_width=cfg.cluster_width,
                positions=positions)
    solver = {"full": lambda c, b: b, "duet": _plan_duet, "visionzip": _plan_visionzip,
              "fastv": _plan_fastv, "pyramiddrop": _plan_pyramiddrop, "hired": _plan_hired,
              "fitprune": _plan_fitprune}[cfg.method]
    solved = solver(cfg, base)
    if cfg.query is not None:
        solved = replace(solved, stages=tuple(replace(s, query=cfg.query) for s in solved.stages))
    return solved


def _split(n: int, budget: int, presets: dict[int, tuple[int, int]], n_patches: int) -> tuple[int, int]:
    """Split n tokens into (dominant, contextual) in the proportion of the preset nearest to
    ``budget``; n = every patch needs no merging."""
    if n >= n_patches:
        return n, 0
    k1p, k2p = presets[min(presets, key=lambda b: abs(b - budget))]
    k2 = min(n - 1, round(n * k2p / (k1p + k2p))) if n > 1 else 0
    return n - k2, k2


def _explicit_split(cfg: ReductionConfig, n_patches: int) -> tuple[int, int]:
    k1 = cfg.k1 if cfg.k1 is not None else 1
    k2 = cfg.k2 if cfg.k2 is not None else 0
    if not 1 <= k1 or k1 + k2 > n_patches:
        raise ValueError(f"k1 (dominant, counting CLS) must be >= 1 and k1 + k2 must lie in 1..{n_patches}, "
                         f"got {k1} + {k2}")
    return k1, k2


def _plan_duet(cfg: ReductionConfig, base: Plan) -> Plan:
    """DUET: V2V to n = k1 + k2 tokens (CLS included), then T2V stages keeping int(ratio * n)
    (SPEC §2; ``modeling_llama_pdrop.py`` l.1329-1330).

    n is solved so the per-layer average meets the budget; n = every patch skips V2V (the
    tokens enter as the checkpoint feeds them, without CLS). When even that stays
    below the budget, the stage ratios are moved linearly towards 1 (t in [0, 1]) until it is
    met; a budget >= the patch count therefore means no reduction at all.
    """
    L, P, b = base.n_layers, base.n_patches, base.budget
    layers = cfg.stage_layers if cfg.stage_layers is not None else (_scaled(16, L), _scaled(24, L))
    ratios = cfg.stage_ratios if cfg.stage_ratios is not None else DUET_STAGE_RATIOS

    def avg(n, rs):
        return average(layer_counts(n, _ratio_stages(n, layers, rs, "salient"), L))

    if cfg.k1 is not None or cfg.k2 is not None:
        k1, k2 = _explicit_split(cfg, P)
    elif P == PRESET_PATCHES and b in DUET_PRESETS and cfg.stage_ratios is None:
        k1, k2 = DUET_PRESETS[b]
    else:
        n = min(range(1, P + 1), key=lambda m: (abs(avg(m, ratios) - b), m))
        k1, k2 = (None, 0) if n == P else _split(n, b, DUET_PRESETS, P)  # every patch: nothing to merge
    solved = replace(base, k1=k1, k2=k2)
    n = solved.tokens_per_frame
    if n == P and avg(P, ratios) < b and cfg.stage_ratios is None:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            t = (lo + hi) / 2
            lo, hi = (t, hi) if avg(P, [r + t * (1 - r) for r in ratios]) < b else (lo, t)
        ratios = [r + hi * (1 - r) for r in ratios]
    stages = tuple(s for s in _ratio_stages(n, layers, ratios, "salient") if s.keep < n)
    feasible = abs(avg(n, ratios) - b) <= max(2.0, 0.02 * b) or cfg.k1 is not None
    return replace(solved, stages=stages, feasible=feasible)


def _plan_visionzip(cfg: ReductionConfig, base: Plan) -> Plan:
    """VisionZip (Yang et al., CVPR 2025; github.com/dvlab-research/VisionZip): k1 dominant
    tokens (CLS counted) by CLS attention + k2 contextual tokens merged by key similarity, all
    before the LLM, so every layer sees k1 + k2 = budget tokens. Splits 162+30 / 108+20 / 54+10."""
    P, b = base.n_patches, min(base.budget, base.n_patches)
    if cfg.k1 is not None or cfg.k2 is not None:
        k1, k2 = _explicit_split(cfg, P)
    elif P == PRESET_PATCHES and b in VISIONZIP_PRESETS:
        k1, k2 = VISIONZIP_PRESETS[b]
    else:
        k1, k2 = _split(b, b, VISIONZIP_PRESETS, P)
    return replace(base, k1=k1, k2=k2)


def _plan_fastv(cfg: ReductionConfig, base: Plan) -> Plan:
    """FastV (Chen et al., ECCV 2024; pkunlp-icler/FastV, ``modeling_llama.py`` of its llava-hf
    transformers): after layer K keep the top-n visual tokens by the attention the last token pays
    them at layer K-1 (mean over heads), survivors keeping their position ids. n solves
    (K*P + (L-K)*n) / L = budget."""
    L, P, b = base.n_layers, base.n_patches, base.budget
    k = cfg.fastv_k if cfg.fastv_k is not None else max(1, round(2 * L / 32))
    if not 1 <= k < L:
        raise ValueError(f"FastV K must lie in 1..{L - 1}, got {k}")
    if b >= P:
        return base
    exact = (b * L - k * P) / (L - k)
    n = max(1, min(P, round(exact)))
    return replace(base, stages=(Stage(k, n, DEFAULT_QUERY["fastv"], k - 1),), feasible=exact >= 0.5)


def _plan_pyramiddrop(cfg: ReductionConfig, base: Plan) -> Plan:
    """PyramidDrop (Xing et al., CVPR 2025; github.com/Cooperx521/PyramidDrop): at stage layers
    8/16/24 (of 32) keep int(lambda^i * P) tokens ranked by the last instruction token's
    attention at that layer, positions renumbered, lambda solved so the per-layer average meets
    the budget.

    With 576 patches the first 8 full layers alone average 144 tokens, so budgets below that are
    unreachable with 8/16/24. Our rule: keep the equal spacing s (stages s, 2s, 3s) but shrink s
    until the full-token first segment uses at most 3/4 of the budget.
    """
    L, P, b = base.n_layers, base.n_patches, base.budget
    query = DEFAULT_QUERY["pyramiddrop"]
    if b >= P:
        return base
    if cfg.stage_layers is not None:
        return replace(base, stages=_ratio_stages(P, tuple(cfg.stage_layers), cfg.stage_ratios, query))
    spacing = max(1, L // 4)
    while spacing > 1 and spacing * P / L > 0.75 * b:
        spacing -= 1
    layers = tuple(spacing * i for i in (1, 2, 3) if spacing * i < L)

    def avg(lam):
        return average(layer_counts(P, _ratio_stages(P, layers, [lam**i for i in (1, 2, 3)], query), L))

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < b else (lo, mid)
    lam = hi if abs(avg(hi) - b) < abs(avg(lo) - b) else lo
    stages = _ratio_stages(P, layers, [lam**i for i in (1, 2, 3)], query)
    return replace(base, stages=stages, feasible=abs(avg(lam) - b) <= max(2.0, 0.02 * b))


def _plan_hired(cfg: ReductionConfig, base: Plan) -> Plan:
    """HiRED (Arif et al., AAAI 2025; hasanar1f/HiRED, ``modeling_llava.py``
    ``HiRED_token_selection``): the top int(P * budget / P) patches by the CLS attention of the
    tower's feature layer, summed over heads, in raster order, dropped before the projector (no
    CLS token, nothing inside the LLM). ``k1`` overrides the count (here: patches, CLS not
    counted)."""
    kept = cfg.k1 if cfg.k1 is not None else min(base.budget, base.n_patches)
    if not 1 <= kept <= base.n_patches:
        raise ValueError(f"HiRED keeps 1..{base.n_patches} patches, got {kept}")
    return replace(base, k1=kept)


def fitprune_schedule(n_visual: int, n_layers: int, budget: float) -> tuple[int, ...]:
    """The analytic stand-in for a fitted FitPrune schedule (used when no ``fitprune.json`` was
    fitted for the model): after every layer the surviving visual tokens shrink by one factor,
    n_{l+1} = floor(n_l * lam), lam solved so the per-layer average meets ``budget``. Fitted
    schedules (FitPrune's ``statistical_analysis.py``) delete most in the early layers too; this
    one only has their shape, not their data."""
    def counts(lam):
        out = [n_visual]
        for _ in range(n_layers - 1):
            out.append(int(out[-1] * lam))
        return out

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(counts(mid)) < budget else (lo, mid)
    best = min((lo, hi), key=lambda lam: abs(average(counts(lam)) - budget))
    kept = counts(best)
    return tuple(a - b for a, b in zip(kept, kept[1:])) + (0,)


def _plan_fitprune(cfg: ReductionConfig, base: Plan) -> Plan:
    """FitPrune (Ye et al., AAAI 2025; ywh187/FitPrune ``LLaVA_1.5/llava/model/language_model/
    modeling_llama.py`` l.392-405): after layer l's attention, ``deletions[l]`` visual tokens with
    the lowest self x cross attention (head-max maps) leave; they served as keys at layer l and
    stay in its cache. Here that is a stage before layer l + 1 scored at layer l (the MLP of layer
    l still runs on the deleted rows: the survivors' outputs are identical). Deletions come from
    ``cfg.fitprune_deletions`` (a fitted schedule) or ``fitprune_schedule``."""
    L, P = base.n_layers, base.n_patches
    if base.budget >= P:
        return base
    deletions = cfg.fitprune_deletions
    source = "fitted"
    if deletions is None:
        deletions, source = fitprune_schedule(P, L, base.budget), "analytic"
    if len(deletions) != L or any(d < 0 for d in deletions) or sum(deletions) > P:
        raise ValueError(f"a FitPrune schedule has one deletion count >= 0 per layer ({L}) and deletes at most {P}")
    stages, alive = [], P
    for layer, deleted in enumerate(deletions[:-1]):
        if deleted:
            alive -= deleted
            stages.append(Stage(layer + 1, alive, DEFAULT_QUERY["fitprune"], layer))
    solved = replace(base, stages=tuple(stages), schedule=source)
    feasible = abs(average(solved.counts_per_layer()) - base.budget) <= max(2.0, 0.02 * base.budget)
    return replace(solved, feasible=feasible)
