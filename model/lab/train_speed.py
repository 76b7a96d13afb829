"""``python -m model train-speed``: how much a training step costs with DUET against full tokens
(DUET-VLM's other claim: ~31 % less training time). Forward + backward + AdamW on one batch of
synthetic scenes, through the trainer's own forward (``trainer.answer_forward``); the warm-up step
is not counted; median and spread (min-max) of ``--reps`` steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..bench import median_spread, machine
from ..engine import DuetLlava
from . import scenes
from .batches import encode
from .trainer import StageConfig, answer_forward


def train_step_times(engine: DuetLlava, budgets: list[int], batch_size: int, reps: int) -> list[dict]:
    """Forward + backward + AdamW step with full tokens vs DUET at each budget (SPEC §2 Training).
    The steps really update the in-memory weights (lr 1e-5); nothing is saved."""
    batch = encode(engine.processor, [scenes.sample(0, "train", i) for i in range(batch_size)])
    model = engine.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []
    for budget in [engine.n_patches, *budgets]:
        cfg = StageConfig("speed", 1, reduction="full" if budget == engine.n_patches else "duet", budget=budget)
        times = []
        for rep in range(reps + 1):
            started = time.perf_counter()
            loss, *_ = answer_forward(engine, batch, cfg)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if rep:
                times.append((time.perf_counter() - started) * 1e3)
        rows.append({"method": cfg.reduction, "budget": budget, "step_ms": median_spread(times)})
    model.eval()
    return rows


def train_markdown(rows: list[dict], batch_size: int) -> str:
    full = rows[0]["step_ms"][0]
    lines = [f"Training step (forward + backward + AdamW), batch {batch_size}:", "",
             "| method | budget | step ms | vs full |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget'] if r['method'] != 'full' else '—'} | "
                     f"{r['step_ms'][0]:.0f} ({r['step_ms'][1]:.0f}-{r['step_ms'][2]:.0f}) | "
                     f"{100 * (r['step_ms'][0] / full - 1):+.0f} % |")
    return "\n".join(lines)


def speed_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model train-speed", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder that knows the scene vocabulary (default: the shipped model)")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = DuetLlava.load(args.model, device="cpu")
    rows = train_step_times(engine, [int(b) for b in args.budgets.split(",")], args.batch, args.reps)
    print(train_markdown(rows, args.batch))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": machine(), "threads": args.threads}, indent=1))
    return 0
