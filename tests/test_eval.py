import json
from collections import Counter

import numpy as np
import pytest

from model.lab import scenes
from model.budget import ReductionConfig
from model.cli import main
from model.lab.scenes import query_patches
from model.lab.eval import evaluate, items, markdown, markdown_objects, represented_patches


def test_query_patches_follow_the_mask():
    sample = next(s for s in (scenes.sample(0, "test", i) for i in range(50)) if s.query)
    patches = query_patches(sample)
    coverage = sum(scenes.patch_coverage(sample.objects[i].mask).reshape(-1) for i in sample.query)
    assert patches and all(coverage[p] > 0 for p in patches)


def test_represented_patches_use_the_last_stage_that_keeps_tokens():
    trace = {"frames": [{"token_patches": [[0, 1], [2], [3, 4, 5]]}],
             "t2v": [{"kept": [0, 2]}, {"kept": []}]}
    assert represented_patches(trace) == {0, 1, 3, 4, 5}
    trace["t2v"] = []
    assert represented_patches(trace) == set(range(6))


def test_eval_runs_end_to_end_on_a_tiny_n(engine):
    configs = [ReductionConfig("full", 576), ReductionConfig("duet", 64), ReductionConfig("fastv", 64)]
    result = evaluate(engine, "test", 3, configs, max_new_tokens=2)
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("full", 576), ("duet", 64), ("fastv", 64)}
    assert all(r["n"] == 3 for r in rows.values())
    if rows[("full", 576)]["accuracy"] > 0:
        assert rows[("full", 576)]["retention"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["query_recall"] is None or 0.0 <= r["query_recall"] <= 1.0
    assert rows[("full", 576)]["query_recall"] in (None, 1.0)
    assert "| duet | 64 |" in markdown(result)


def test_accuracy_by_object_count_partitions_the_samples(engine):
    n = 8
    result = evaluate(engine, "test", n, [ReductionConfig("full", 576)], max_new_tokens=2)
    row = result["rows"][0]
    counts = Counter(len(scenes.sample(0, "test", i).objects) for i in range(n))
    assert set(row["by_objects"]) == set(counts)
    # weighted by how many scenes have each count, the groups give back the overall accuracy
    assert sum(row["by_objects"][k] * c for k, c in counts.items()) / n == pytest.approx(row["accuracy"])
    table = markdown_objects(result)
    assert table.splitlines()[0].count("object") == len(counts) and "| full | — |" in table
    assert markdown_objects(json.loads(json.dumps(result))) == table  # as read back from --json


def test_eval_cli_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_checkpoint), "--n", "2", "--budgets", "64", "--methods", "full,duet",
                 "--json", str(out)]) == 0
    assert "| full |" in capsys.readouterr().out and out.exists()


def test_variants_of_one_method_and_budget_stay_separate_rows(engine):
    configs = [ReductionConfig("duet", 64), ReductionConfig("duet", 64, stage_layers=(), stage_ratios=())]
    result = evaluate(engine, "test", 1, configs, max_new_tokens=1)
    assert [r["overrides"] for r in result["rows"]] == ["", "stage_layers=(), stage_ratios=()"]
    assert "duet (stage_layers=(), stage_ratios=())" in markdown(result)


def test_clip_eval_uses_motion_invariant_questions_and_per_frame_budgets(engine):
    from model.lab.eval import VIDEO_KINDS, items

    clips = list(items("test", 4, 0, frames=3))
    assert len(clips) == 4 and all(s.kind in VIDEO_KINDS and len(frames) == 3 for s, frames in clips)
    assert all(np.any(np.asarray(f[0]) != np.asarray(f[-1])) for _, f in clips)  # something moved
    result = evaluate(engine, "test", 2, [ReductionConfig("full", 576), ReductionConfig("duet", 58)],
                      max_new_tokens=1, frames=3)
    full, duet = result["rows"]
    assert result["frames"] == 3 and full["avg_visual_tokens"] == 3 * 576
    assert duet["avg_visual_tokens"] <= 3 * 58 + 3 and duet["query_recall"] is None


def test_start_evaluates_the_slice_that_begins_there(engine):
    full = [ReductionConfig("full", 576)]
    later = evaluate(engine, "val", 3, full, max_new_tokens=2, start=5)
    kinds = Counter(scenes.sample(0, "val", i).kind for i in range(5, 8))
    row = later["rows"][0]
    assert later["start"] == 5 and row["n"] == 3
    assert set(row["by_kind"]) == set(kinds)
    assert [s.question for s, _ in items("val", 2, 0, 1, start=5)] == [scenes.sample(0, "val", i).question for i in (5, 6)]


def test_wilson_intervals_match_the_closed_form():
    from model.intervals import wilson

    low, high = wilson(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = wilson(100, 100)
    assert high == pytest.approx(1.0) and round(low, 4) == 0.963
    assert wilson(0, 0) == (0.0, 1.0)


def test_score_intervals_are_wilsons_for_exact_match_and_normal_for_partial_credit():
    from duet_viz.browser import interval
    from model.intervals import score_interval, wilson

    assert score_interval([1.0] * 50 + [0] * 50) == wilson(50, 100)
    low, high = score_interval([0.5, 0.7, 0.9, 0.3] * 25)  # mean 0.6, sample sd 0.2247, n 100
    assert (round(low, 4), round(high, 4)) == (0.556, 0.644)
    assert score_interval([0.9, 1.0, 1.0, 0.95])[1] == 1.0  # clipped
    assert interval([1, 0, 1, 1]) == "{:.3f}–{:.3f}".format(*wilson(3, 4)) and interval([]) == ""
