from duet_viz.load import hostile_markdown, run_hostile, run_load


def test_small_load_run_serves_every_request_correctly(tiny_checkpoint):
    report = run_load(str(tiny_checkpoint), sessions=4, requests=3, timeout_s=120, invalid_share=0.5)
    assert report["requests"] == 12
    assert report["success_rate"] == 1.0, report["by_kind"]
    assert "valid" in report["by_kind"] and len(report["by_kind"]) >= 2
    assert report["rss_mb"]["peak"] >= report["rss_mb"]["start"] > 0
    assert len(report["rss_mb"]["quarter_peaks"]) == 4


def test_hostile_mix_reports_each_attack_and_the_sigterm(tiny_checkpoint):
    cases = ["thin image", "direct /run/run", "bad fields", "unused Gradio routes", "999 files in one upload"]
    report = run_hostile(str(tiny_checkpoint), cases=cases)
    assert [row["case"] for row in report["cases"]] == cases
    assert all(row["unexpected"] == 0 and row["requests"] > 0 for row in report["cases"]), report["cases"]
    assert report["cases"][1]["outcomes"] == {"refused 404": 40}
    assert report["cases"][3]["outcomes"] == {"refused 404": 6}
    assert report["cases"][4]["outcomes"] == {"refused 400": 1}
    assert report["sigterm"] == {"exit_code": 0, "work_folders_left": [], "cache_entries_left": 0}
    assert all(row["timed_requests"] > 0 and row["max_stall_s"] < 60 for row in report["cases"])  # others' requests
    table = hostile_markdown(report, "python -m duet_viz.load --hostile")
    assert all(f"| {case} |" in table for case in cases) and " cores;" in table and "longest other request" in table
