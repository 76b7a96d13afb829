"""Fit FitPrune's per-layer deletion schedules for one checkpoint (ywh187/FitPrune,
``LLaVA_1.5/llava/eval/statistical_analysis.py``), the offline half of the method.

1. ``reference_weights``: on every calibration sample, a full-token prefill records per layer the
   head-max attention mass that the rows after the image pay the visual tokens (per such row,
   ``W_cross``) and that the visual rows pay them (per visual token, ``W_self``) (l.283-318).
2. ``fit``: for one alpha, each sample runs through the layers (``simulate``, the engine's
   ``decoder.run``), deleting after a layer's attention the visual tokens in both the longest
   low-cross and the longest low-self prefix that keep at least (1 - alpha) of the layer's
   reference mass (``deletion_set``, l.206-241), keeping the survivors' position ids. The stop
   rule (l.132-143) is then replayed on the samples' counts (``stop_rule``): before a layer, the
   visual FLOPs spent so far plus the forecast for keeping every current count to the last layer
   are averaged over samples; once that is at most the target, fitting stops.
3. ``fit_schedule``: bisection on alpha in [0, 1] until the interval is at most 0.01 (l.334-343);
   a schedule is the per-layer deletions summed over samples, floor-divided by their number.

FLOPs count visual tokens only, as the official code does (QKV and QK^T/AV with the count before
a layer's deletions, the output projection and MLP with the count after them), with the loaded
model's widths instead of the hard-coded 4096 / 11008 of LLaVA-1.5-7B. The FLOP target of an
average budget b is the cut that b tokens in every layer would give, 1 - cost(b) / cost(P)
(0.6717 / 0.7817 / 0.8911 for 192 / 128 / 64 on the 7B widths).

Where the official code is silent or slips, our choices: the image starts where the prompt puts
it (the official hard-codes 35); a prefix that never falls below its threshold deletes all but
one token (the official reuses the previous sample's count); the kept schedule is the one whose
FLOPs come closest to the target among the bisection's fits (the official keeps the last fit,
which can lie on either side of the target); and its last deleting layer is then set to the
fewest deletions that bring its FLOPs to the target (``settle_last_stage``): a fit meets the
target on average over samples, but the floor-averaged schedule applied to every sample spends
more (fewer deletions, and the n^2 attention term of an average is not the average of n^2 terms),
2.5-3 % above the target on a tiny model in our tests.

``python -m model fit-fitprune --model M --budgets 192,128,64 --n N [--data FOLDER]`` writes the
schedules to ``M/fitprune.json`` (``schedules.py``). Calibration questions: ``--data FOLDER`` with
a ``questions.jsonl`` of ``{"image": FILE, "question": TEXT}`` lines, else the synthetic
validation split (the shipped model's).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import decoder
from .budget import Plan, ReductionConfig, Stage, plan
from .device import Timer
from .engine import DuetLlava
from .schedules import SCHEDULE_FILE, write_schedules

ALPHA_TOLERANCE = 0.01


@dataclass
class Sample:
    """One calibration prompt as it enters the LLM."""

    h: torch.Tensor  # (1, T, d)
    rows: decoder.Rows  # visual rows, original position ids, "text" = the rows after the image


@dataclass(frozen=True)
class Widths:
    hidden: int
    mlp: int

    def before(self, n: int) -> float:
        """Visual FLOPs of a layer up to its attention output (QKV, QK^T, AV), n tokens in."""
        return 3 * n * self.hidden**2 + 2 * n * n * self.hidden

    def after(self, n: int) -> float:
        """The rest of the layer (output projection, MLP) on the n tokens that survive it."""
        return n * self.hidden**2 + 3 * self.hidden * self.mlp * n

    def layer(self, n: int) -> float:
        return self.before(n) + self.after(n)

    def target_cut(self, budget: float, n_patches: int) -> float:
        """The FLOP cut that ``budget`` visual tokens in every layer give."""
        return 1.0 - self.layer(budget) / self.layer(n_patches)

    def schedule_flops(self, n_patches: int, deletions: list[int]) -> float:
        total, alive = 0.0, n_patches
        for deleted in deletions:
            total += self.before(alive)
            alive -= deleted
            total += self.after(alive)
        return total


def settle_last_stage(deletions: list[int], widths: Widths, n_patches: int, target: float) -> list[int]:
    """``deletions`` with its last non-zero entry set to the fewest deletions (at most all but one
    of the tokens left there) that bring the schedule's FLOPs to ``target`` or below."""
    last = max((i for i, d in enumerate(deletions) if d), default=None)
    if last is None:
        return deletions
    alive = n_patches - sum(deletions[:last])
    settled = list(deletions)
    for count in range(alive):
        settled[last] = count
        if widths.schedule_flops(n_patches, settled) <= target:
            break
    return settled


def deletion_set(cross: torch.Tensor, self_weight: torch.Tensor, cross_total: float, self_total: float,
                 alpha: float) -> torch.Tensor:
    """Visual tokens (indices) that FitPrune deletes: those in both the longest prefix of the
    low-cross order and the longest prefix of the low-self order whose removal leaves at least
    (1 - alpha) of the reference totals (``statistical_analysis.py`` l.212-240)."""
    def prefix(weights: torch.Tensor, reference: float) -> torch.Tensor:
        order = torch.argsort(weights)
        left = weights.sum() - torch.cumsum(weights[order], 0)  # left[k]: after deleting order[:k + 1]
        keeps_enough = left >= reference * (1 - alpha)
        count = int(keeps_enough.sum()) if bool(keeps_enough.all()) else int(torch.argmin(keeps_enough.int()))
        return order[: min(count, len(order) - 1)]

    chosen = torch.cat([prefix(cross, cross_total), prefix(self_weight, self_total)])
    values, counts = chosen.unique(return_counts=True)
    return values[counts > 1]


def simulate(engine: DuetLlava, s: Sample, decide) -> list[int]:
    """The sample through ``decoder.run``, every layer deleting ``decide(layer, cross, self_weight)``
    (indices among the alive visual tokens; cross per visual token normalised per text row, self
    per visual token, both head-max) after its attention, keeping the survivors' position ids.

    Returns the visual tokens entering each layer, then those left after the last layer's
    deletions. Layer l's deletions are a stage before layer l + 1 scored at layer l, as the engine
    runs FitPrune; the last layer's stage has nothing to drop from, only its count matters."""
    L = engine.n_layers
    stages = tuple(Stage(layer + 1, 0, "fitprune", layer) for layer in range(L))
    p = Plan("fitprune", engine.n_patches, L, engine.n_patches, stages=stages, positions="original")
    counts = []

    def choose(stage_layer: int, ranking: decoder.Ranking) -> list[torch.Tensor]:
        cross, self_weight = ranking.parts["cross"] / ranking.query_rows, ranking.parts["self"]
        keep = torch.ones(len(cross), dtype=torch.bool, device=cross.device)
        keep[decide(stage_layer - 1, cross, self_weight)] = False
        counts.append(int(keep.sum()))
        return [torch.nonzero(keep).flatten()]

    out = decoder.run(engine.lm, s.h, s.rows, p, engine.apply_rope, mask=engine.attention_mask, choose=choose)
    return out.counts + counts[-1:]


def prepare(engine: DuetLlava, items) -> list[Sample]:
    full = plan(ReductionConfig("full", engine.n_patches), engine.n_layers, engine.n_patches)
    samples = []
    for frames, question in items:
        prompt = engine.prepare(frames, question)
        visual = engine.encode(prompt, full, Timer(engine.device))
        embeds, visual_rows, _ = engine.llm_inputs(prompt, visual)
        index = torch.arange(embeds.shape[1], device=engine.device)
        is_visual = torch.isin(index, visual_rows)
        rows = decoder.Rows.build(is_visual[None], index[None], {"text": (index > int(visual_rows.max()))[None]})
        samples.append(Sample(embeds, rows))
    return samples


def reference_weights(engine: DuetLlava, samples: list[Sample]) -> list[list[tuple[float, float]]]:
    """Per sample, per layer: (W_cross, W_self) of the full-token prefill."""
    weights = []
    for s in samples:
        per_layer = []

        def record(layer: int, cross: torch.Tensor, self_weight: torch.Tensor) -> torch.Tensor:
            per_layer.append((float(cross.sum()), float(self_weight.sum())))
            return torch.zeros(0, dtype=torch.long)

        simulate(engine, s, record)
        weights.append(per_layer)
    return weights


def stop_rule(counts: list[list[int]], widths: Widths, target: float) -> tuple[bool, list[int]]:
    """(whether the FLOP target was reached, deletions per layer) of the official loop, replayed on
    each sample's visual counts (``simulate``): before a layer, the visual FLOPs spent so far plus
    the forecast for keeping every count to the last layer, averaged over samples, at most the
    target stops the fit. The samples' deletions do not depend on each other, so running each one
    through every layer and replaying the rule decides as the official layer-by-layer loop does."""
    n_layers, n = len(counts[0]) - 1, len(counts)
    deleted, spent = [0] * n_layers, 0.0
    for index in range(n_layers):
        spent += sum(widths.before(c[index]) for c in counts)
        forecast = sum(widths.after(c[index]) + (n_layers - 1 - index) * widths.layer(c[index]) for c in counts)
        if (spent + forecast) / n <= target:
            return True, [d // n for d in deleted]
        for c in counts:
            deleted[index] += c[index] - c[index + 1]
            spent += widths.after(c[index + 1])
    return False, [d // n for d in deleted]


def fit(engine: DuetLlava, samples: list[Sample], weights, alpha: float, target: float,
        widths: Widths) -> tuple[bool, list[int]]:
    """(whether the FLOP target was reached, deletions per layer) for one alpha."""
    counts = [simulate(engine, s, lambda layer, cross, self_weight, k=k: deletion_set(
        cross, self_weight, *weights[k][layer], alpha)) for k, s in enumerate(samples)]
    return stop_rule(counts, widths, target)


def fit_schedule(engine: DuetLlava, items, budget: int, log=print) -> dict:
    """Bisection on alpha for one average budget (module docstring); the chosen fit and its numbers."""
    widths = Widths(engine.lm.config.hidden_size, engine.lm.config.intermediate_size)
    P, L = engine.n_patches, engine.n_layers
    cut = widths.target_cut(budget, P)
    target = L * widths.layer(P) * (1 - cut)
    with torch.inference_mode():
        base = prepare(engine, items)
        weights = reference_weights(engine, base)
        lo, hi, fits = 0.0, 1.0, []
        while hi - lo > ALPHA_TOLERANCE + 1e-9:
            alpha = (lo + hi) / 2
            reached, deletions = fit(engine, base, weights, alpha, target, widths)
            flops = widths.schedule_flops(P, deletions)
            fits.append((abs(flops / target - 1), alpha, deletions, flops))
            log(f"  budget {budget}: alpha {alpha:.4f} reached={reached} flops/target {flops / target:.4f}")
            lo, hi = (lo, alpha) if reached else (alpha, hi)
    error, alpha, deletions, flops = min(fits)
    deletions = settle_last_stage(deletions, widths, P, target)
    flops = widths.schedule_flops(P, deletions)
    counts = plan(ReductionConfig("fitprune", budget, fitprune_deletions=tuple(deletions)), L, P).counts_per_layer()
    return {"deletions": deletions, "alpha": round(alpha, 6), "flop_cut_target": round(cut, 6),
            "flop_cut": round(1 - flops / (L * widths.layer(P)), 6), "avg_visual_tokens": round(sum(counts) / L, 2),
            "n_samples": len(items)}


def calibration_items(data: Path, n: int):
    """(frames, question) pairs from ``data/questions.jsonl`` ({image, question} lines)."""
    from PIL import Image

    lines = (data / "questions.jsonl").read_text().splitlines()[:n]
    return [([Image.open(data / row["image"]).convert("RGB")], row["question"]) for row in map(json.loads, lines)]


def fit_main(argv: list[str] | None = None, default_items=None) -> int:
    """``default_items(n)``: calibration pairs when no ``--data`` is given (the CLI passes the
    synthetic validation split)."""
    parser = argparse.ArgumentParser(prog="python -m model fit-fitprune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--n", type=int, default=64, help="calibration questions")
    parser.add_argument("--data", type=Path, help="folder with questions.jsonl ({image, question} lines) and images")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    engine = DuetLlava.load(args.model, device=args.device)
    folder = Path(args.model) if args.model else Path(__file__).resolve().parent.parent / "assets" / "duet-llava-tiny"
    if args.data is None and default_items is None:
        raise SystemExit("--data is required")
    items = calibration_items(args.data, args.n) if args.data is not None else default_items(args.n)
    fits = {}
    for budget in (int(b) for b in args.budgets.split(",")):
        started = time.time()
        fits[budget] = fit_schedule(engine, items, budget)
        print(f"budget {budget}: {json.dumps(fits[budget])} ({time.time() - started:.0f} s)")
    write_schedules(folder / SCHEDULE_FILE, fits)
    print(f"wrote {folder / SCHEDULE_FILE}")
    return 0
