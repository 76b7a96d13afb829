import json

from model.cli import main


def test_quick_bench_runs_end_to_end_with_every_row(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_checkpoint), "--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [(r["method"], r["budget"]) for r in result["rows"]] == [
        ("full", 576), ("duet", 64), ("visionzip", 64), ("fastv", 64), ("pyramiddrop", 64)]
    for method in ("full", "duet", "visionzip", "fastv", "pyramiddrop"):
        assert f"| {method} |" in table
    duet = result["rows"][1]
    assert duet["llm_flops"] < result["rows"][0]["llm_flops"]
    assert duet["kv_bytes"] < result["rows"][0]["kv_bytes"]
    assert abs(duet["avg_visual_tokens"] - 64) <= 2
