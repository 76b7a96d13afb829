from duet_viz.load import run_load


def test_small_load_run_serves_every_request_correctly(tiny_checkpoint):
    report = run_load(str(tiny_checkpoint), sessions=4, requests=3, timeout_s=120, invalid_share=0.5)
    assert report["requests"] == 12
    assert report["success_rate"] == 1.0, report["by_kind"]
    assert "valid" in report["by_kind"] and len(report["by_kind"]) >= 2
    assert report["rss_mb"]["peak"] >= report["rss_mb"]["start"] > 0
    assert len(report["rss_mb"]["quarter_peaks"]) == 4
