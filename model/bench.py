"""``python -m model bench``: measured prefill/decode speed of every method against the analytic limit.

One process, one prompt: the vision tower runs once (its output is the same for every method);
each configuration (method x budget) then runs its V2V merge, the LLM prefill as the app runs it
(trace recorded; T2V scoring timed inside, the timer synchronising CUDA around scoring only) and
greedy decode steps on its pruned KV cache. A warm-up round runs every configuration once, then
``--reps`` rounds run each once more, in an order rotated from round to round, so whatever else
the machine does drifts over all of them alike. A speed-up is full / method prefill time of the
same round; the table gives the median and the spread over rounds, next to the analytic LLM FLOPs
ratio (SPEC §6), and how busy the other processes kept the machine (``LoadMeter``).
``--compare A B`` measures two configurations and prints A's time over B's per round;
``--layers`` adds the time of every decoder layer in one prefill (``decoder.run``'s ``on_layer``).

``--limit`` adds the yardstick a method's prefill is held to on this machine: the full model's own
decoder layers timed at a ladder of row counts (1 to the full prompt), each rung all layers on that
many rows with a fresh KV cache as ``decoder.run_layer`` runs them, in the same interleaved rounds
as the configurations. A method's *predicted* prefill is the sum over layers of the layer time at
the rows that layer saw in its run (linear between rungs), plus the final norm and LM head on the
last row that every prefill ends with (timed in the same rounds); measured / (predicted + its own T2V
scoring) says how much the loop's machinery (gathers, RoPE, cache surgery, trace bookkeeping) adds
on top of what the layers and the method's own ranking must cost.

``--shape 7b`` builds a LLaVA-1.5-7B-shaped random model in memory (CLIP-L/14-336 tower, Llama
hidden 4096 / 32 heads / MLP 11008) with the decoder depth cut to ``--llm-layers`` so it fits CPU
memory and time; stage layers scale with depth (budget.py).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import DynamicCache

from . import batch, decoder
from .budget import ReductionConfig
from .checkpoint import TinyLlavaSpec, build_processor
from .device import Timer
from .engine import DuetLlava

QUESTION = "what color is the star ?"
EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "scene-shapes.png"
LLAVA_7B_VOCAB = 32064  # llava-hf/llava-1.5-7b-hf text_config.vocab_size: Llama-2's 32000 + <image> + padding


def llava_7b_shaped(llm_layers: int, device: str = "auto", dtype: torch.dtype | None = None) -> DuetLlava:
    """Random weights, real LLaVA-1.5-7B widths: what matters for speed is the shape. Built on the
    device in ``dtype`` (default: the engine's for it, bf16 on CUDA), so a GPU run needs no host copy.
    The vocabulary is llava-1.5-7b-hf's 32064 rows, so the LM head every prefill ends with costs
    what it costs there; the small tokenizer's ids all fall inside it."""
    from transformers import LlavaForConditionalGeneration

    from .backbones.llava import Llava
    from .device import pick_device, pick_dtype

    spec = TinyLlavaSpec(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
                         text_hidden=4096, text_layers=llm_layers, text_heads=32, text_kv_heads=32,
                         text_mlp=11008)
    processor = build_processor(spec.words, spec.image_size, spec.patch_size)
    tok = processor.tokenizer
    config = spec.config(LLAVA_7B_VOCAB, tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    torch.manual_seed(0)
    dev = pick_device(device)
    with torch.device(dev):
        model = LlavaForConditionalGeneration(config).to(dtype or pick_dtype(dev)).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return DuetLlava(Llava(model, processor), f"llava-1.5-7b-shaped-{llm_layers}L")


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def _busy_jiffies() -> int | None:
    """CPU time (all cores, clock ticks) spent outside idle since boot, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values) - values[3] - values[4]  # minus idle and iowait


class LoadMeter:
    """How busy the rest of the machine was while we measured: CPU time of every process but this
    one, per second of wall time, in cores (0: the other cores were idle)."""

    def __init__(self):
        self.busy, self.own, self.wall = _busy_jiffies(), os.times(), time.perf_counter()

    def cores(self) -> float | None:
        busy, own, wall = _busy_jiffies(), os.times(), time.perf_counter()
        if busy is None or self.busy is None:
            return None
        ours = (own.user + own.system) - (self.own.user + self.own.system)
        return max(0.0, ((busy - self.busy) / os.sysconf("SC_CLK_TCK") - ours) / (wall - self.wall))


class Config:
    """One method x budget at one batch size, its inputs prepared once (the tower's output is the
    same for all). A batch is ``batch`` copies of the prompt, each reduced on its own, through one
    prefill of the decoder loop (``model/batch.py``'s path)."""

    def __init__(self, engine: DuetLlava, prompt, hidden, cfg: ReductionConfig, batch: int = 1):
        self.engine, self.prompt, self.hidden, self.cfg, self.batch = engine, prompt, hidden, cfg, batch
        self.plan = engine.plan(cfg)
        self.name = ("full" if cfg.method == "full" else f"{cfg.method}-{cfg.budget}") + (f"@b{batch}" if batch > 1 else "")
        self.runs: list[dict] = []

    def run(self, decode_steps: int, on_layer=None, score: bool = True) -> dict:
        """V2V (timed), the prefill with trace recording as the app runs it (T2V scoring timed
        inside when ``score``: on CUDA that timer synchronises, so the benchmark times scoring in a
        run of its own there), then greedy decode steps on the pruned cache."""
        engine, timer, scored = self.engine, Timer(self.engine.device), Timer(self.engine.device)
        if self.batch == 1:
            visual = engine.reduce(self.hidden, self.plan, timer)
            embeds, rows, salient = engine.llm_inputs(self.prompt, visual)
            started = timer.start()
            result = engine.prefill(embeds, rows, salient, self.plan, timer=scored if score else None,
                                    on_layer=on_layer)
            timer.stop("prefill", started)
            cache, counts, totals = result.cache, result.counts, result.tokens_per_layer
            token, started = int(result.logits.argmax()), timer.start()
            for step in range(decode_steps):
                token = int(engine.step(token, [n + step for n in result.next_positions], cache).argmax())
        else:
            group = [batch.sequence(engine, self.prompt, self.plan, timer, self.hidden) for _ in range(self.batch)]
            h, rows = batch.left_padded(engine, group)
            started = timer.start()
            out = decoder.run(engine.lm, h, rows, self.plan, engine.apply_rope, n_frames=group[0].n_frames,
                              cache=DynamicCache(config=engine.lm.config), mask=engine.attention_mask,
                              timer=scored if score else None, on_layer=on_layer)
            tokens = engine.lm_head(engine.lm.norm(out.hidden[:, -1])).argmax(-1)
            timer.stop("prefill", started)
            cache, counts, totals, started = out.cache, out.counts, out.totals, timer.start()
            for step in range(decode_steps):
                positions = [[n + step for n in layer] for layer in out.next_positions]
                tokens = batch.step(engine, tokens, positions, cache, rows.pads).argmax(-1)
        timer.stop("decode", started)
        return {**timer.ms, "t2v": scored.ms.get("t2v", 0.0), "kv": _kv_bytes(cache), "counts": counts,
                "totals": totals}

    def scoring_ms(self) -> float:
        """T2V scoring and selection time of one prefill, timed in a run of its own."""
        return self.run(0)["t2v"]

    def layer_ms(self) -> list[float]:
        """Wall time of each decoder layer in one prefill (a stage layer's ranking and drop
        included), from timestamps ``decoder.run`` hands its ``on_layer`` callback."""
        stamps = []

        def stamp(index, h, rows):
            if h.is_cuda:
                torch.cuda.synchronize(h.device)
            stamps.append(time.perf_counter())

        self.run(0, on_layer=stamp)
        return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def _elapsed_ms(device: torch.device, work) -> float:
    """Wall time of ``work()`` in ms, the device's queue drained before and after (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1e3


class Ladder:
    """The full model's decoder layers, all of them, on ``n`` rows for each rung ``n``: what a
    prefill that fed every layer n rows would cost, without any reduction machinery."""

    def __init__(self, engine: DuetLlava, top: int, rungs: int = 12):
        self.engine = engine
        steps = torch.linspace(0, 1, rungs - 1) ** 2 * (top - 1) + 1  # denser where few rows cost little
        self.rows = sorted({1, *(int(round(float(n))) for n in steps), top})
        self.ms: dict[int, list[float]] = {n: [] for n in self.rows}
        self.head_ms: list[float] = []

    def head(self) -> float:
        """The final norm and the LM head on the last row, what every prefill ends with whatever
        the method (on the 7B shape a 4096 x 32000 matrix, about half a decoder layer's weights)."""
        engine, lm = self.engine, self.engine.lm
        h = torch.randn(1, 1, lm.config.hidden_size, device=engine.device, dtype=engine.dtype)
        return _elapsed_ms(h.device, lambda: engine.lm_head(lm.norm(h[:, -1])))

    def time(self, n: int) -> float:
        engine, lm = self.engine, self.engine.lm
        h = torch.randn(1, n, lm.config.hidden_size, device=engine.device, dtype=engine.dtype)
        pos = torch.arange(n, device=engine.device)[None]
        rows = decoder.Rows.build(torch.zeros(1, n, dtype=torch.bool, device=engine.device), pos, {})
        rope, cache = lm.rotary_emb(h, pos), DynamicCache(config=lm.config)

        def layers():
            out = h
            for index in range(len(lm.layers)):
                out = decoder.run_layer(lm, index, out, rows, rope, engine.attention_mask, cache)

        return _elapsed_ms(h.device, layers)

    def round(self, rep: int, keep: bool = True) -> None:
        """Every rung once, in an order rotated by ``rep``; ``keep=False``: a warm-up round."""
        order = self.rows[rep % len(self.rows):] + self.rows[: rep % len(self.rows)]
        for n in order:
            ms = self.time(n) / len(self.engine.lm.layers)
            if keep:
                self.ms[n].append(ms)
        head = self.head()
        if keep:
            self.head_ms.append(head)

    def layer_ms(self, rep: int, n: int) -> float:
        """One layer's time at n rows in round ``rep``, linear between rungs."""
        xs = self.rows
        k = min(max(1, bisect.bisect_left(xs, n)), len(xs) - 1)
        a, b = xs[k - 1], xs[k]
        ta, tb = self.ms[a][rep], self.ms[b][rep]
        return ta + (tb - ta) * (n - a) / (b - a)

    def predict(self, rep: int, totals: list[int]) -> float:
        """The layers at the rows each saw, and the head once."""
        return sum(self.layer_ms(rep, n) for n in totals) + self.head_ms[rep]


def summarise(config: Config, full: Config, decode_steps: int, ladder: Ladder | None = None) -> dict:
    from .flops import llm_flops

    runs, lm = config.runs, config.engine.lm.config
    first = runs[0]
    return {
        "method": config.cfg.method,
        "budget": config.cfg.budget,
        "batch": config.batch,
        "avg_visual_tokens": sum(first["counts"]) / len(first["counts"]),
        "prefill_ms": median_spread([r["prefill"] for r in runs]),
        "speedup": median_spread([f["prefill"] / r["prefill"] for f, r in zip(full.runs, runs)]),
        "v2v_ms": median_spread([r.get("v2v", 0.0) for r in runs]),
        "t2v_ms": median_spread([r["t2v"] for r in runs]),
        "decode_ms_per_token": median_spread([r["decode"] / decode_steps for r in runs]) if decode_steps else None,
        "kv_bytes": first["kv"],
        "llm_flops": llm_flops(first["totals"], lm.hidden_size, lm.intermediate_size),
        **({} if ladder is None else limit_columns(runs, ladder)),
    }


def limit_columns(runs: list[dict], ladder: Ladder) -> dict:
    """Per round: the cost model's prediction, and measured / (predicted + the round's scoring)."""
    predicted = [ladder.predict(rep, r["totals"]) for rep, r in enumerate(runs)]
    return {"predicted_ms": median_spread(predicted),
            "vs_limit": median_spread([r["prefill"] / (p + r["t2v"]) for r, p in zip(runs, predicted)]),
            "scoring_share": median_spread([r["t2v"] / r["prefill"] for r in runs])}


@torch.inference_mode()
def run_bench(engine: DuetLlava, methods, budgets, reps: int, decode_steps: int, layers: bool = False,
              limit: bool = False, batches: tuple[int, ...] = (1,)) -> dict:
    """Every configuration once as warm-up, then ``reps`` rounds in which each runs once, in an
    order rotated round by round: slow drift of the machine (another process on the other core,
    thermal state) falls on every configuration alike, and a speed-up is computed per round, from
    two runs seconds apart, against the full model at the same batch size. ``limit``: the cost
    model's ladder (``Ladder``, batch 1) is timed in every round too, after the configurations.
    On CUDA, T2V scoring is timed in a prefill of its own each round, so the timed prefill runs
    without the scoring timer's synchronisations."""
    with Image.open(EXAMPLE) as image:
        prompt = engine.prepare([image.convert("RGB")], QUESTION)
    engine.vision_states(prompt.pixel_values)  # warm-up
    vision_ms = []
    for _ in range(reps):
        started = time.perf_counter()
        hidden = engine.vision_states(prompt.pixel_values)
        vision_ms.append((time.perf_counter() - started) * 1e3)
    fulls = {b: Config(engine, prompt, hidden, ReductionConfig("full", engine.n_patches), b) for b in batches}
    configs = [c for b in batches for c in [fulls[b]] + [Config(engine, prompt, hidden, ReductionConfig(m, n), b)
                                                         for m in methods if m != "full" for n in budgets]]
    warm = [config.run(decode_steps) for config in configs]
    ladder = Ladder(engine, warm[0]["totals"][0]) if limit else None
    if ladder:
        ladder.round(0, keep=False)
    cuda, load = engine.device.type == "cuda", []
    for rep in range(reps):
        meter = LoadMeter()
        for config in configs[rep % len(configs):] + configs[: rep % len(configs)]:
            config.runs.append(config.run(decode_steps, score=not cuda))
            if cuda:
                config.runs[-1]["t2v"] = config.scoring_ms()
        if ladder:
            ladder.round(rep)
        load.append(meter.cores())
        print(f"  round {rep + 1}/{reps}: full {fulls[batches[0]].runs[-1]['prefill']:.0f} ms, other load "
              f"{load[-1] if load[-1] is None else round(load[-1], 2)} cores", flush=True)
    return {
        "model": engine.name, "device": str(engine.device), "dtype": str(engine.dtype),
        "llm_layers": engine.n_layers, "vision_ms": median_spread(vision_ms), "batches": list(batches),
        "rows": [summarise(c, fulls[c.batch], decode_steps, ladder if c.batch == 1 else None) for c in configs],
        "ladder_ms": None if ladder is None else {n: median_spread(v) for n, v in ladder.ms.items()},
        "head_ms": None if ladder is None else median_spread(ladder.head_ms),
        "per_rep_ms": {c.name: [round(r["prefill"], 2) for r in c.runs] for c in configs},
        "layer_ms": {c.name: c.layer_ms() for c in configs} if layers else None,
        "other_load_cores": load, "machine": machine(), "reps": reps, "decode_steps": decode_steps,
    }


def compare(result: dict, a: str, b: str) -> dict:
    """Prefill time of configuration ``a`` over ``b``'s, per round: (median, min, max)."""
    times = result["per_rep_ms"]
    for name in (a, b):
        if name not in times:
            raise ValueError(f"{name!r} was not measured; measured: {', '.join(times)}")
    return dict(zip(("median", "min", "max"), median_spread([x / y for x, y in zip(times[a], times[b])])))


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
    rows, m = result["rows"], result["machine"]
    load = [x for x in result["other_load_cores"] if x is not None]
    lines = [
        f"**{result['model']}** · {result['llm_layers']} LLM layers · {result['device']} {result['dtype']} · "
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads) · {result['reps']} interleaved rounds "
        f"after a warm-up round · other processes' load {max(load, default=0):.2f} cores at most · "
        f"vision tower {result['vision_ms'][0]:.1f} ms",
        "",
        "| method | budget | batch | avg tokens | prefill ms, median (min) | speed-up, median (min-max) | analytic | "
        "measured/analytic | V2V ms | T2V ms | scoring % of prefill | decode ms/tok | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fulls = {r["batch"]: r for r in rows if r["method"] == "full"}
    for r in rows:
        speedup, analytic = r["speedup"], fulls[r["batch"]]["llm_flops"] / r["llm_flops"]
        overhead = 100 * (r["v2v_ms"][0] + r["t2v_ms"][0]) / r["prefill_ms"][0]
        decode = "—" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token'][0]:.2f}"
        lines.append(
            f"| {r['method']} | {r['budget'] if r['method'] != 'full' else '—'} | {r['batch']} | {r['avg_visual_tokens']:.1f} | "
            f"{r['prefill_ms'][0]:.1f} ({r['prefill_ms'][1]:.1f}) | {speedup[0]:.2f}x ({speedup[1]:.2f}-"
            f"{speedup[2]:.2f}) | {analytic:.2f}x | {speedup[0] / analytic:.2f} | {r['v2v_ms'][0]:.2f} | "
            f"{r['t2v_ms'][0]:.2f} | {overhead:.1f} | {decode} | {r['kv_bytes'] / 2**20:.2f} |"
        )
    if result.get("ladder_ms"):
        lines += limit_markdown(result)
    if result.get("layer_ms"):
        names = list(result["layer_ms"])
        lines += ["", "Per decoder layer, one prefill each (ms; a stage layer's ranking and drop included):", "",
                  "| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i in range(result["llm_layers"]):
            lines.append(f"| {i} | " + " | ".join(f"{result['layer_ms'][n][i]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def limit_markdown(result: dict) -> list[str]:
    """The cost-model table: each method against what its layers' row counts cost on this machine."""
    lines = ["", "Against the measured limit (the full model's layers at the rows each layer saw and its head on "
             "one row; per-round medians, min-max):", "",
             "| method | budget | prefill ms | predicted ms (layers + head) | T2V scoring ms | measured / (predicted "
             "+ scoring) | scoring % of prefill |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in result["rows"] if "vs_limit" in r):
        ratio, share = r["vs_limit"], r["scoring_share"]
        lines.append(f"| {r['method']} | {r['budget'] if r['method'] != 'full' else '—'} | {r['prefill_ms'][0]:.1f} | "
                     f"{r['predicted_ms'][0]:.1f} | {r['t2v_ms'][0]:.2f} | {ratio[0]:.3f} ({ratio[1]:.3f}-{ratio[2]:.3f}) | "
                     f"{100 * share[0]:.1f} |")
    rungs = result["ladder_ms"]
    lines += ["", "One decoder layer at n rows (ms, median over rounds): "
              + ", ".join(f"{n}: {v[0]:.2f}" for n, v in rungs.items())
              + f"; the head on one row: {result['head_ms'][0]:.2f}"]
    return lines


def config_name(text: str) -> tuple[str, int]:
    """"duet-64" -> ("duet", 64)."""
    method, _, budget = text.rpartition("-")
    if not method or not budget.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD-BUDGET, e.g. duet-64")
    return method, int(budget)


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the shipped model)")
    parser.add_argument("--shape", choices=["7b"], help="benchmark a random LLaVA-1.5-7B-shaped model instead")
    parser.add_argument("--llm-layers", type=int, default=8, help="decoder depth of --shape 7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights and activations (auto: float32 on CPU, bfloat16 on CUDA where supported)")
    parser.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8: copies of the prompt in one prefill")
    parser.add_argument("--methods", default="duet,visionzip,fastv,pyramiddrop,hired,fitprune")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--compare", nargs=2, type=config_name, metavar=("A", "B"),
                        help="measure only A and B (e.g. duet-64 visionzip-64) and print A's prefill time over B's")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (after one warm-up round)")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--layers", action="store_true", help="also time each decoder layer of one prefill")
    parser.add_argument("--limit", action="store_true",
                        help="also time the full model's layers at a ladder of row counts and hold each method to it")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 decode steps, budget 64 only")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--plot", type=Path, help="with --limit: also draw the cost model as an SVG here")
    parser.add_argument("--from", dest="saved", type=Path, metavar="JSON",
                        help="run nothing: print the tables (and --plot) of a result saved with --json")
    args = parser.parse_args(argv)
    if args.plot and not (args.limit or args.saved):
        parser.error("--plot draws the cost model: add --limit")
    if args.saved:
        result = json.loads(args.saved.read_text())
        print(markdown(result))
        write_plot(result, args.plot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.decode_steps, args.budgets = 1, 2, "64"
    from transformers.utils import logging

    logging.disable_progress_bar()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    engine = (llava_7b_shaped(args.llm_layers, args.device, dtype) if args.shape
              else DuetLlava.load(args.model, device=args.device, dtype=dtype))
    if args.compare:
        (ma, ba), (mb, bb) = args.compare
        if ba != bb and ma != mb:
            raise SystemExit("--compare: A and B must share a method or a budget")
        methods, budgets = list(dict.fromkeys([ma, mb])), list(dict.fromkeys([ba, bb]))
    else:
        methods, budgets = args.methods.split(","), [int(b) for b in args.budgets.split(",")]
    batches = tuple(int(b) for b in args.batch.split(","))
    result = run_bench(engine, methods, budgets, args.reps, args.decode_steps, args.layers, args.limit, batches)
    print(markdown(result))
    if args.compare:
        a, b = (f"{m}-{n}" for m, n in args.compare)
        ratio = result["compare"] = {"a": a, "b": b, **compare(result, a, b)}
        print(f"\n{a} / {b} prefill time, per round: {ratio['median']:.3f} "
              f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}, {args.reps} rounds)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    write_plot(result, args.plot)
    return 0


def write_plot(result: dict, path: Path | None) -> None:
    if path is None:
        return
    if not result.get("ladder_ms"):
        raise SystemExit("--plot: this result has no cost model (it was run without --limit)")
    from .limit_plot import limit_svg

    path.write_text(limit_svg(result))
