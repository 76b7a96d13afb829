import json

from model.bench import run_bench
from model.cli import main


def test_quick_bench_runs_end_to_end_with_every_row(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_checkpoint), "--quick",
                 "--json", str(out)]) == 0
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


def test_ui_render_bench_reports_every_view(engine):
    from duet_viz.bench_ui import server_side

    result = server_side(engine, reps=2)
    assert len(result) == 4
    assert all(r["n"] == 2 and 0 < r["p50_ms"] <= r["p95_ms"] for r in result.values())


def test_full_in_methods_does_not_repeat_the_baseline(engine):
    result = run_bench(engine, ["full", "duet"], [192, 64], reps=1, decode_steps=1)
    assert [(r["method"], r["budget"]) for r in result["rows"]] == [("full", 576), ("duet", 192), ("duet", 64)]
