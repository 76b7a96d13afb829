"""``python -m model eval``: accuracy retention of every method x budget on the synthetic VQA (SPEC §7).

For each of the first ``--n`` samples of a split, every configuration answers greedily through
the engine; accuracy is exact match, retention = accuracy / full-token accuracy. **Query recall**
is the fraction of the queried objects' patches (mask covering >= 50 % of the patch; the single
best-covered patch for objects smaller than that) still represented by a surviving visual token
after the last stage layer that keeps any (for the DUET presets: the first stage layer; for
methods without LLM stages: the tokens entering the LLM). A merged token represents all of its
member patches. ``random`` is the recall a random choice of as many patches would get on
average (represented patches / all patches), the floor a query-blind method sits at.

``--frames F`` (F > 1) evaluates clips instead: each sample becomes ``model.clips.moving_clip``
with F frames in which one object slides across the scene (the queried one, or the first object
for a "no" existence question), for the question kinds whose answer motion cannot change
(colour, shape, count, existence). Budgets are per frame, as in the app, so a budget of 271 is
53 % fewer visual tokens and 58 is 90 % fewer. Query recall is not computed for clips.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ..batch import answer_batch, tower_states
from ..budget import QUERIES, ReductionConfig
from ..intervals import wilson
from . import scenes
from .clips import VIDEO_KINDS, moving_clip
from .scenes import query_patches


def represented_patches(trace: dict) -> set[int]:
    """Patches still represented after the last stage that keeps any token (single frame)."""
    groups = trace["frames"][0]["token_patches"]
    survivors = range(len(groups))
    for stage in trace["t2v"]:
        if stage["kept"]:
            survivors = stage["kept"]
    return {p for t in survivors for p in groups[t]}


def items(split: str, n: int, seed: int, frames: int, start: int = 0):
    """(sample, frames) for the first ``n`` usable samples of the split from index ``start`` on:
    every sample as one image, or (frames > 1) the samples of VIDEO_KINDS as moving clips."""
    index, found = start, 0
    while found < n:
        sample = scenes.sample(seed, split, index)
        index += 1
        if frames == 1:
            yield sample, [sample.image]
        elif sample.kind in VIDEO_KINDS:
            yield sample, moving_clip(sample, frames)
        else:
            continue
        found += 1


def answers(engine, chunk, configs: list[ReductionConfig], max_new_tokens: int, batch_size: int) -> dict:
    """Per configuration, the records (trace fields) of the chunk's (sample, frames) pairs, from
    one tower pass that serves every configuration: ``engine.answer`` one by one at batch size 1,
    else ``batch.answer_batch``."""
    questions = [(images, sample.question) for sample, images in chunk]
    prompts = [engine.prepare(images, question) for images, question in questions]
    hidden = tower_states(engine, prompts)
    if batch_size == 1:
        return {cfg: [engine.answer(images, question, cfg, max_new_tokens=max_new_tokens, hidden=states)
                      for (images, question), states in zip(questions, hidden)] for cfg in configs}
    return {cfg: answer_batch(engine, questions, cfg, max_new_tokens=max_new_tokens, hidden=hidden) for cfg in configs}


def evaluate(engine, split: str, n: int, configs: list[ReductionConfig], seed: int = 0,
             max_new_tokens: int = 3, progress=None, frames: int = 1, start: int = 0, batch_size: int = 1) -> dict:
    rows = {c: {"correct": [], "recall": [], "random": [], "tokens": [], "kinds": {}, "objects": {}} for c in configs}
    pairs = list(items(split, n, seed, frames, start))
    for first in range(0, n, batch_size):
        chunk = pairs[first:first + batch_size]
        records = answers(engine, chunk, configs, max_new_tokens, batch_size)
        for k, (sample, _) in enumerate(chunk):
            query = query_patches(sample) if sample.query and frames == 1 else set()
            for cfg in configs:
                trace, row = records[cfg][k], rows[cfg]
                correct = trace["answer"] == sample.answer
                row["correct"].append(correct)
                row["kinds"].setdefault(sample.kind, []).append(correct)
                row["objects"].setdefault(len(sample.objects), []).append(correct)
                row["tokens"].append(trace["avg_visual_tokens"])
                if query:
                    kept = represented_patches(trace)
                    row["recall"].append(len(query & kept) / len(query))
                    row["random"].append(len(kept) / engine.n_patches)
            if progress and (first + k + 1) % progress == 0:
                print(f"  {first + k + 1}/{n} samples", flush=True)
    full = next((row for c, row in rows.items() if c.method == "full"), None)
    full_acc = statistics.mean(full["correct"]) if full else None
    table = []
    for cfg, row in rows.items():
        acc = statistics.mean(row["correct"])
        table.append({
            "method": cfg.method, "budget": cfg.budget, "overrides": overrides(cfg), "n": len(row["correct"]),
            "avg_visual_tokens": round(statistics.mean(row["tokens"]), 1),
            "accuracy": acc, "accuracy_95": wilson(sum(row["correct"]), len(row["correct"])),
            "retention": acc / full_acc if full_acc else None,
            "query_recall": statistics.mean(row["recall"]) if row["recall"] else None,
            "random_recall": statistics.mean(row["random"]) if row["random"] else None,
            "by_kind": {k: statistics.mean(v) for k, v in sorted(row["kinds"].items())},
            "by_objects": {n: statistics.mean(v) for n, v in sorted(row["objects"].items())},
        })
    return {"model": engine.name, "split": split, "start": start, "n": n, "seed": seed, "frames": frames,
            "batch_size": batch_size, "rows": table}


def overrides(cfg: ReductionConfig) -> str:
    """The knobs a configuration sets beyond method and budget, e.g. "stage_layers=(6, 9)"."""
    default = ReductionConfig(cfg.method, cfg.budget)
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in ("k1", "k2", "cluster_width", "stage_layers", "stage_ratios",
                                                        "fastv_k", "salient_words", "positions", "query")
                     if getattr(cfg, k) != getattr(default, k))


def label(row: dict) -> str:
    return row["method"] + (f" ({row['overrides']})" if row["overrides"] else "")


def markdown(result: dict) -> str:
    kinds = sorted({k for r in result["rows"] for k in r["by_kind"]})
    head = ["method", "budget", "avg tokens", "accuracy [95 % interval]", "retention", "query recall",
            "random-keep recall", *kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [
            label(r),
            "—" if r["method"] == "full" else str(r["budget"]), f"{r['avg_visual_tokens']:.1f}",
            f"{100 * r['accuracy']:.1f} % [{100 * r['accuracy_95'][0]:.1f}, {100 * r['accuracy_95'][1]:.1f}]",
            "—" if r["retention"] is None else f"{100 * r['retention']:.1f} %",
            "—" if r["query_recall"] is None else f"{r['query_recall']:.3f}",
            "—" if r["random_recall"] is None else f"{r['random_recall']:.3f}",
            *[f"{100 * r['by_kind'].get(k, float('nan')):.0f} %" for k in kinds],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_objects(result: dict) -> str:
    """Accuracy by the number of objects in the scene: where a model that cannot tell the asked
    object from the others loses its answers (one object needs no binding). Accepts results read
    back from JSON, whose keys are strings."""
    rows = [(r, {int(n): acc for n, acc in r["by_objects"].items()}) for r in result["rows"]]
    counts = sorted({n for _, by in rows for n in by})
    head = ["method", "budget", *(f"{n} object{'s' if n > 1 else ''}" for n in counts)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, by in rows:
        cells = [label(r), "—" if r["method"] == "full" else str(r["budget"]),
                 *[f"{100 * by[n]:.0f} %" if n in by else "—" for n in counts]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--split", default="test", choices=list(scenes.SPLITS))
    parser.add_argument("--methods", default="full,duet,visionzip,fastv,pyramiddrop,hired,fitprune")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0,
                        help="first sample index: a validation slice the trainer does not score (it reads the "
                             "first --eval-samples) stays free of checkpoint selection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=1, help="> 1: evaluate moving clips of this many frames")
    parser.add_argument("--positions", choices=("contiguous", "original"), default=None,
                        help="position ids after a reduction (default: each method's own, see budget.DEFAULT_POSITIONS)")
    parser.add_argument("--query", choices=QUERIES, default=None,
                        help="rows that rank visual tokens inside the LLM (default: each method's own)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="questions per batched prefill and decoding loop (model/batch.py); 1: one by one")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from transformers.utils import logging

    from ..engine import DuetLlava

    logging.disable_progress_bar()
    engine = DuetLlava.load(args.model, device=args.device)
    methods = args.methods.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = [ReductionConfig("full", engine.n_patches)] if "full" in methods else []
    configs += [ReductionConfig(m, b, positions=args.positions, query=args.query)
                for m in methods if m != "full" for b in budgets]
    started = time.time()
    result = evaluate(engine, args.split, args.n, configs, seed=args.seed, progress=max(1, args.n // 10),
                      frames=args.frames, start=args.start, batch_size=args.batch_size)
    result["wall_s"] = round(time.time() - started, 1)
    print(markdown(result))
    print()
    print(markdown_objects(result))
    what = f"{args.frames}-frame clips" if args.frames > 1 else "samples"
    print(f"\n{args.n} {args.split} {what} x {len(configs)} configurations in {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
