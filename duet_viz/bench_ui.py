"""``python -m duet_viz.bench_ui``: how fast the views render, server side and in the browser.

Server side: building each figure from a trace (once per run), p50/p95 over ``--reps``.
Browser side (Debian chromium + playwright): the layer slider's step, i.e. the time from the
slider's JavaScript switching the visible layer to Plotly finishing the redraw, p50/p95 over
every layer ``--sweeps`` times. Scrubbing never calls the server, so this is the whole latency.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from . import figures
from .page import ASSETS, EXAMPLES, LAYER_JS, build_demo

STEP_JS = """
async ([layers, sweeps]) => {
  const step = LAYER_JS;
  const plot = document.querySelector('#layer-view .js-plotly-plot');
  const times = [];
  for (let s = 0; s < sweeps; s++) {
    for (let layer = 0; layer < layers; layer++) {
      const t0 = performance.now();
      await step(layer);
      await new Promise(requestAnimationFrame);
      times.push(performance.now() - t0);
    }
  }
  return times;
}
"""


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * (len(ordered) - 1) + 0.5))], 2),
            "n": len(ordered)}


def server_side(engine, reps: int) -> dict:
    from PIL import Image

    from model.budget import ReductionConfig

    name, question = EXAMPLES[0]
    with Image.open(ASSETS / name) as image:
        image = image.convert("RGB")
    trace = engine.answer(image, question, ReductionConfig("duet", 64), max_new_tokens=2)
    builders = {
        "layer_view (all layers, once per run)": lambda: figures.layer_view(trace, image, layer=0),
        "cluster_map (once per run)": lambda: figures.cluster_map(trace, image),
        "tokens_per_layer (once per run)": lambda: figures.tokens_per_layer([trace]),
        "overlay_png (per download)": lambda: figures.overlay_png(trace, image, layer=0),
    }
    out = {}
    for label, build in builders.items():
        build()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            build()
            times.append((time.perf_counter() - started) * 1e3)
        out[label] = percentiles(times)
    return out


def browser_side(engine, sweeps: int) -> dict:
    from playwright.sync_api import sync_playwright

    demo = build_demo(engine)
    demo.queue()
    started = time.perf_counter()
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        headless=True, args=["--no-sandbox", "--disable-gpu",
                                                             "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.goto(url)
            page.get_by_text(EXAMPLES[0][1], exact=True).last.click()
            page.get_by_role("button", name="Run").click()
            page.wait_for_selector("#layer-view .js-plotly-plot .heatmaplayer", timeout=120_000)
            first_view_s = time.perf_counter() - started
            times = page.evaluate(STEP_JS.replace("LAYER_JS", LAYER_JS.strip()), [engine.n_layers, sweeps])
            browser.close()
    finally:
        demo.close()
    return {"slider step (browser, Plotly redraw)": percentiles(times),
            "page load + example run until the layer view shows (s)": round(first_view_s, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet_viz.bench_ui", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweeps", type=int, default=5)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from transformers.utils import logging

    from model.engine import DuetLlava

    logging.disable_progress_bar()
    started = time.perf_counter()
    engine = DuetLlava.load(args.model, device="cpu")
    result = {"model_load_s": round(time.perf_counter() - started, 2), **server_side(engine, args.reps)}
    if not args.no_browser:
        result.update(browser_side(engine, args.sweeps))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
