import json

import pytest

from model.bench import LoadMeter, compare, run_bench
from model.cli import main


def test_quick_bench_runs_end_to_end_with_every_row(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_checkpoint), "--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    methods = ("full", "duet", "visionzip", "fastv", "pyramiddrop", "hired", "fitprune")
    assert [(r["method"], r["budget"]) for r in result["rows"]] == [("full", 576)] + [(m, 64) for m in methods[1:]]
    for method in methods:
        assert f"| {method} |" in table
    duet = result["rows"][1]
    assert duet["llm_flops"] < result["rows"][0]["llm_flops"]
    assert duet["kv_bytes"] < result["rows"][0]["kv_bytes"]
    assert abs(duet["avg_visual_tokens"] - 64) <= 2


def test_rounds_interleave_and_speedups_are_per_round_ratios(engine):
    result = run_bench(engine, ["duet"], [192, 64], reps=3, decode_steps=1, layers=True)
    assert [(r["method"], r["budget"]) for r in result["rows"]] == [("full", 576), ("duet", 192), ("duet", 64)]
    times = result["per_rep_ms"]
    assert set(times) == {"full", "duet-192", "duet-64"} and all(len(v) == 3 for v in times.values())
    ratios = sorted(f / d for f, d in zip(times["full"], times["duet-64"]))
    median, low, high = result["rows"][2]["speedup"]
    assert (low, high) == pytest.approx((ratios[0], ratios[-1]), rel=1e-3) and median == pytest.approx(ratios[1], rel=1e-3)
    assert len(result["other_load_cores"]) == 3
    assert all(len(v) == engine.n_layers and min(v) > 0 for v in result["layer_ms"].values())
    ratio = compare(result, "duet-64", "duet-192")
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    with pytest.raises(ValueError, match="visionzip-64"):
        compare(result, "visionzip-64", "full")


def test_compare_runs_only_the_two_configurations(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["bench", "--model", str(tiny_checkpoint), "--compare", "duet-64", "visionzip-64", "--reps", "2",
                 "--decode-steps", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["per_rep_ms"]) == {"full", "duet-64", "visionzip-64"}
    assert "duet-64 / visionzip-64 prefill time, per round" in capsys.readouterr().out
    assert result["compare"]["a"] == "duet-64"


def test_the_load_meter_sees_a_busy_other_process():
    import subprocess
    import sys
    import time

    meter = LoadMeter()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    busy.wait()
    time.sleep(0.1)
    assert meter.cores() > 0.5  # one other process spun a core for most of the measured time


def test_ui_render_bench_reports_every_view(engine):
    from duet_viz.bench_ui import server_side

    result = server_side(engine, reps=2)
    assert len(result) == 4
    assert all(r["n"] == 2 and 0 < r["p50_ms"] <= r["p95_ms"] for r in result.values())


def test_the_cost_model_predicts_from_the_ladder_at_each_layers_rows(engine):
    result = run_bench(engine, ["duet"], [64], reps=2, decode_steps=0, limit=True)
    rungs = result["ladder_ms"]
    full, duet = result["rows"]
    assert min(rungs) == 1 and max(rungs) > 576  # the top rung is the whole prompt, image and text
    assert all(v[1] <= v[0] <= v[2] and v[1] > 0 for v in rungs.values())
    # the full model's every layer sees the whole prompt: its prediction is the top rung times depth
    # and the head once (with two rounds each median is a mean, and the prediction is linear in both)
    head = result["head_ms"]
    assert 0 < head[1] <= head[0] <= head[2]
    assert full["predicted_ms"][0] == pytest.approx(engine.n_layers * rungs[max(rungs)][0] + head[0], rel=1e-6)
    assert duet["predicted_ms"][0] < full["predicted_ms"][0]
    assert duet["vs_limit"][0] > 0 and 0 < duet["scoring_share"][0] < 1 and full["scoring_share"][0] == 0


def test_ladder_interpolates_linearly_between_rungs(engine):
    from model.bench import Ladder

    ladder = Ladder(engine, 100, rungs=4)
    assert ladder.rows[0] == 1 and ladder.rows[-1] == 100
    ladder.ms = {n: [float(n) * 2 + 1] for n in ladder.rows}  # an exactly linear layer cost
    ladder.head_ms = [0.5]
    for n in (1, 5, 37, 99, 100):
        assert ladder.layer_ms(0, n) == pytest.approx(2 * n + 1)
    assert ladder.predict(0, [10, 10, 3]) == pytest.approx(21 + 21 + 7 + 0.5)


def test_batched_rows_run_copies_of_the_prompt_through_one_prefill(engine):
    result = run_bench(engine, ["duet"], [64], reps=1, decode_steps=1, batches=(1, 2))
    rows = {(r["method"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("full", 1), ("duet", 1), ("full", 2), ("duet", 2)}
    assert set(result["per_rep_ms"]) == {"full", "duet-64", "full@b2", "duet-64@b2"}
    assert rows["duet", 2]["avg_visual_tokens"] == rows["duet", 1]["avg_visual_tokens"]
    assert rows["full", 2]["kv_bytes"] == 2 * rows["full", 1]["kv_bytes"]
    assert rows["duet", 2]["speedup"][0] > 1


def test_the_7b_shape_builds_through_the_llava_adapter():
    """``bench --shape 7b`` builds its random model in memory, not from a folder: it must wrap it
    in the same adapter the loader uses (one decoder layer here, the widths are what is checked)."""
    import torch

    from model.bench import llava_7b_shaped

    engine = llava_7b_shaped(1, device="cpu", dtype=torch.bfloat16)
    assert engine.backbone.kind == "llava" and engine.n_layers == 1 and engine.n_patches == 576
    assert engine.lm.config.hidden_size == 4096 and engine.vision.config.hidden_size == 1024
    assert engine.lm_head.weight.shape == (32064, 4096)


def _limit_result(rows):
    return {"model": "m", "device": "cpu", "dtype": "torch.float32", "reps": 3, "llm_layers": 2,
            "ladder_ms": {"1": [1.0, 0.9, 1.2], "300": [2.0, 1.8, 2.1], "600": [4.0, 3.9, 4.4]},
            "head_ms": [0.1, 0.1, 0.1], "rows": rows}


def _row(method, budget, measured, predicted, scoring):
    return {"method": method, "budget": budget, "prefill_ms": [measured, measured * 0.9, measured * 1.1],
            "predicted_ms": [predicted] * 3, "t2v_ms": [scoring] * 3,
            "vs_limit": [measured / (predicted + scoring)] * 3}


def test_the_cost_model_plot_puts_each_method_against_its_prediction():
    import xml.etree.ElementTree as ET

    from model.limit_plot import limit_svg

    rows = [_row("full", 576, 8.0, 8.0, 0.0), _row("duet", 64, 3.3, 2.0, 1.0), _row("fastv", 64, 6.0, 3.0, 1.0)]
    svg = ET.fromstring(limit_svg(_limit_result(rows)))
    ns = "{http://www.w3.org/2000/svg}"
    points = [e for e in svg.iter() if e.get("class") == "point"]
    labels = [e.find(f"{ns}title").text for e in points]
    assert len(points) == 3 + 3  # the ladder's rungs, then one point per method row
    assert labels[0].startswith("1 rows: 1.00 ms")
    assert labels[3].startswith("full: 1.000") and labels[4].startswith("duet-64: 1.100")
    assert labels[5].startswith("fastv-64: 1.500")

    def height(e):  # pixel y of a point's centre (a triangle's tip is 4.5 above it)
        if e.tag == f"{ns}circle":
            return float(e.get("cy"))
        if e.tag == f"{ns}rect":
            return float(e.get("y")) + 3.5
        return float(e.get("points").split()[0].split(",")[1]) + 4.5

    # the ratio panel's two reference lines: 1 below 1.05; the full model sits on 1, DUET's 1.1 above
    # 1.05 and FastV's 1.5 higher still (pixels: smaller y is higher)
    one, limit = (float(line.get("points").split()[0].split(",")[1]) for line in list(svg.iter(f"{ns}polyline"))[1:3])
    full, duet, fastv = (height(e) for e in points[3:])
    assert full == pytest.approx(one, abs=0.1) and fastv < duet < limit < one


def test_bench_redraws_tables_and_plot_from_a_saved_result(tmp_path, capsys):
    from model.bench import bench_main

    saved, svg = tmp_path / "r.json", tmp_path / "r.svg"
    result = _limit_result([_row("full", 576, 8.0, 8.0, 0.0)])
    result.update(machine={"cpu": "x", "cores": 2, "torch_threads": 1}, other_load_cores=[0.0],
                  vision_ms=[1.0, 1.0, 1.0])
    result["rows"][0].update(batch=1, avg_visual_tokens=576.0, speedup=[1.0] * 3, llm_flops=1.0, v2v_ms=[0.0] * 3,
                             decode_ms_per_token=None, kv_bytes=0, scoring_share=[0.0] * 3)
    saved.write_text(json.dumps(result))
    assert bench_main(["--from", str(saved), "--plot", str(svg)]) == 0
    assert "measured / (predicted + scoring)" in capsys.readouterr().out
    assert svg.read_text().startswith("<svg")
    with pytest.raises(SystemExit):
        bench_main(["--plot", str(svg)])  # a run without --limit has no cost model to draw
