"""``python -m model bench``: measured prefill/decode speed of every method against the analytic limit.

Everything runs in one process on one prompt: the vision tower once (its output is identical for
every method), then per method x budget the V2V merge, the LLM prefill (T2V scoring included and
timed inside it; the timer synchronises CUDA around scoring only), greedy decode steps on the pruned KV cache, and a prefill with trace
recording off. One warm-up run per configuration is discarded; the table reports the median of
``--reps`` runs and the spread (min-max). Speed-ups are full-prefill median / method median, next
to the analytic LLM FLOPs ratio (SPEC §6) of the same run.

``--shape 7b`` builds a LLaVA-1.5-7B-shaped random model in memory (CLIP-L/14-336 tower, Llama
hidden 4096 / 32 heads / MLP 11008) with the decoder depth cut to ``--llm-layers`` so it fits CPU
memory and time; stage layers scale with depth (budget.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from .budget import ReductionConfig
from .checkpoint import TinyLlavaSpec, build_processor
from .device import Timer
from .engine import DuetLlava

QUESTION = "what color is the star ?"
EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "scene-shapes.png"


def llava_7b_shaped(llm_layers: int, device: str = "auto") -> DuetLlava:
    """Random weights, real LLaVA-1.5-7B widths: what matters for speed is the shape. Built on the
    device in the engine's dtype for it (bf16 on CUDA), so a GPU run needs no host copy."""
    from transformers import LlavaForConditionalGeneration

    from .device import pick_device, pick_dtype

    spec = TinyLlavaSpec(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
                         text_hidden=4096, text_layers=llm_layers, text_heads=32, text_kv_heads=32,
                         text_mlp=11008)
    processor = build_processor(spec.words, spec.image_size, spec.patch_size)
    tok = processor.tokenizer
    config = spec.config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    torch.manual_seed(0)
    dev = pick_device(device)
    with torch.device(dev):
        model = LlavaForConditionalGeneration(config).to(pick_dtype(dev)).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return DuetLlava(model, processor, f"llava-1.5-7b-shaped-{llm_layers}L")


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@torch.inference_mode()
def bench_config(engine: DuetLlava, prompt, hidden, cfg: ReductionConfig, reps: int, decode_steps: int) -> dict:
    p = engine.plan(cfg)
    runs = []
    for rep in range(reps + 1):  # rep 0 warms up
        timer = Timer(engine.device)
        visual = engine.reduce(hidden, p, timer)
        embeds, rows, salient = engine.llm_inputs(prompt, visual)
        scored = Timer(engine.device)
        started = timer.start()
        result = engine.prefill(embeds, rows, salient, p, timer=scored)
        timer.stop("prefill", started)
        started = timer.start()
        engine.prefill(embeds, rows, salient, p, record=False)
        timer.stop("prefill_no_record", started)
        token = int(result.logits.argmax())
        started = timer.start()
        for step in range(decode_steps):
            token = int(engine.step(token, [n + step for n in result.next_positions], result.cache).argmax())
        timer.stop("decode", started)
        if rep:
            runs.append({**timer.ms, "t2v": scored.ms.get("t2v", 0.0), "kv": _kv_bytes(result.cache),
                         "counts": result.counts, "totals": result.tokens_per_layer})
    lm = engine.lm.config
    from .flops import llm_flops

    first = runs[0]
    return {
        "method": cfg.method,
        "budget": cfg.budget,
        "avg_visual_tokens": sum(first["counts"]) / len(first["counts"]),
        "prefill_ms": _median_spread([r["prefill"] for r in runs]),
        "prefill_no_record_ms": _median_spread([r["prefill_no_record"] for r in runs]),
        "v2v_ms": _median_spread([r.get("v2v", 0.0) for r in runs]),
        "t2v_ms": _median_spread([r["t2v"] for r in runs]),
        "decode_ms_per_token": _median_spread([r["decode"] / decode_steps for r in runs]),
        "kv_bytes": first["kv"],
        "llm_flops": llm_flops(first["totals"], lm.hidden_size, lm.intermediate_size),
    }


def run_bench(engine: DuetLlava, methods, budgets, reps: int, decode_steps: int) -> dict:
    with Image.open(EXAMPLE) as image:
        prompt = engine.prepare([image.convert("RGB")], QUESTION)
    with torch.inference_mode():
        engine.vision_states(prompt.pixel_values)  # warm-up
        vision_ms = []
        for _ in range(reps):
            started = time.perf_counter()
            hidden = engine.vision_states(prompt.pixel_values)
            vision_ms.append((time.perf_counter() - started) * 1e3)
    rows = [bench_config(engine, prompt, hidden, ReductionConfig("full", engine.n_patches), reps, decode_steps)]
    for method in (m for m in methods if m != "full"):  # the baseline above runs once, whatever --methods says
        for budget in budgets:
            rows.append(bench_config(engine, prompt, hidden, ReductionConfig(method, budget), reps, decode_steps))
            print(f"  {method:<12} {budget:>4}: prefill {rows[-1]['prefill_ms'][0]:.1f} ms", flush=True)
    return {
        "model": engine.name, "device": str(engine.device), "dtype": str(engine.dtype),
        "llm_layers": engine.n_layers, "vision_ms": _median_spread(vision_ms), "rows": rows,
        "machine": machine(), "reps": reps, "decode_steps": decode_steps,
    }


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def markdown(result: dict) -> str:
    rows = result["rows"]
    full = rows[0]
    m = result["machine"]
    lines = [
        f"**{result['model']}** · {result['llm_layers']} LLM layers · {result['device']} {result['dtype']} · "
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads) · median of {result['reps']} "
        f"(min-max) · vision tower {result['vision_ms'][0]:.1f} ms",
        "",
        "| method | budget | avg tokens | prefill ms | speed-up | analytic | measured/analytic | V2V ms | T2V ms | "
        "scoring % of prefill | record-off ms | decode ms/tok | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = full["prefill_ms"][0] / r["prefill_ms"][0]
        analytic = full["llm_flops"] / r["llm_flops"]
        overhead = 100 * (r["v2v_ms"][0] + r["t2v_ms"][0]) / r["prefill_ms"][0]
        lines.append(
            f"| {r['method']} | {r['budget'] if r['method'] != 'full' else '—'} | {r['avg_visual_tokens']:.1f} | "
            f"{r['prefill_ms'][0]:.1f} ({r['prefill_ms'][1]:.1f}-{r['prefill_ms'][2]:.1f}) | {speedup:.2f}x | "
            f"{analytic:.2f}x | {speedup / analytic:.2f} | {r['v2v_ms'][0]:.2f} | {r['t2v_ms'][0]:.2f} | "
            f"{overhead:.1f} | {r['prefill_no_record_ms'][0]:.1f} | {r['decode_ms_per_token'][0]:.2f} | "
            f"{r['kv_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the shipped model)")
    parser.add_argument("--shape", choices=["7b"], help="benchmark a random LLaVA-1.5-7B-shaped model instead")
    parser.add_argument("--llm-layers", type=int, default=8, help="decoder depth of --shape 7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="duet,visionzip,fastv,pyramiddrop,hired,fitprune")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="1 rep, 2 decode steps, budget 64 only")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.decode_steps, args.budgets = 1, 2, "64"
    from transformers.utils import logging

    logging.disable_progress_bar()
    engine = (llava_7b_shaped(args.llm_layers, args.device) if args.shape
              else DuetLlava.load(args.model, device=args.device))
    result = run_bench(engine, args.methods.split(","), [int(b) for b in args.budgets.split(",")],
                       args.reps, args.decode_steps)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
