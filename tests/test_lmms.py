"""The lmms-eval plugin end to end on a local task made from the synthetic test split: its score
equals ``python -m model eval`` on the same questions, in one process (one by one, with traces)
and under ``accelerate launch`` in two (batched), with the shipped model on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.budget import ReductionConfig
from model.engine import DuetLlava
from model.lab.eval import evaluate
from model.lab.lmms_task import write_task
from model.lmms import cut, question_text

N = 16
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lmms-task"), "test", N)


def lmms_eval(task: Path, out: Path, model_args: str, launcher: list[str], batch_size: int) -> tuple[float, str]:
    """(accuracy, the run's output) of ``python -m lmms_eval`` on the local task."""
    command = [*launcher, "-m", "lmms_eval", "--model", "duet_llava", "--model_args", model_args,
               "--tasks", "duet_synthetic", "--include_path", str(task), "--batch_size", str(batch_size),
               "--output_path", str(out), "--device", "cpu", "--log_samples"]
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=out.parent, timeout=600)
    output = run.stdout + run.stderr
    results = sorted(out.rglob("*results.json"))
    assert run.returncode == 0 and results, output[-3000:]
    return json.loads(results[-1].read_text())["results"]["duet_synthetic"]["accuracy,none"], output


def test_one_and_two_processes_score_as_model_eval(task, tmp_path):
    cfg = ReductionConfig("duet", 64)
    expected = evaluate(DuetLlava.load(device="cpu"), "test", N, [cfg])["rows"][0]["accuracy"]
    traces = tmp_path / "traces"
    single, _ = lmms_eval(task, tmp_path / "one", f"method=duet,budget=64,traces={traces}", [sys.executable], 1)
    accelerate = Path(sys.executable).with_name("accelerate")
    double, output = lmms_eval(task, tmp_path / "two", "method=duet,budget=64",
                               [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2"], 4)
    assert single == pytest.approx(expected, abs=1e-12)
    assert double == pytest.approx(expected, abs=1e-12)
    assert "process 1 of 2" in output and "process 2 of 2" in output
    logged = [json.loads(line) for line in next((tmp_path / "two").rglob("*samples*.jsonl")).read_text().splitlines()]
    assert sorted(row["doc_id"] for row in logged) == list(range(N))  # both halves gathered
    written = sorted(traces.glob("duet_synthetic-*.json"))
    assert len(written) == N
    trace = json.loads(written[0].read_text())
    assert trace["method"] == "duet" and trace["budget"] == 64 and trace["t2v"]


def test_prompts_lose_their_image_markers_and_answers_stop_at_until():
    assert question_text("<image>\nwhat colour is the circle ?\nAnswer briefly.") == (
        "what colour is the circle ?\nAnswer briefly.")
    assert cut("red\n\nUSER: more", ["\n\n", "USER:"]) == "red"
    assert cut(" two ", []) == "two"


@pytest.mark.parametrize("shares", ["", ",dominant_share=0.65,contextual_share=0.05"], ids=["counts", "shares"])
def test_the_plugin_runs_a_local_task_on_qwen2_5_vl_with_the_authors_preset(task, tiny_qwen, tmp_path, shares):
    """``pretrained=<Qwen2.5-VL>,method=duet`` without a budget: the scripts' 540 + 100 settings
    (or run_inference.py's shares of each image's tokens), the chat template on [image, text], one
    document at a time (batch 4 asked)."""
    traces = tmp_path / "traces"
    _, output = lmms_eval(task, tmp_path / "qwen", f"pretrained={tiny_qwen},method=duet,traces={traces}{shares}",
                          [sys.executable], 4)
    written = sorted(traces.glob("duet_synthetic-*.json"))
    assert len(written) == N and "answers one document at a time" in output
    trace = json.loads(written[0].read_text())
    n = trace["grid"][0] * trace["grid"][1]  # the scene's merged tokens: counts are capped per image
    expected = ((int(0.65 * n), max(int(0.05 * n), 1)) if shares else
                (min(540, n - 1), min(100, n - min(540, n - 1))))
    assert (trace["plan"]["k1"], trace["plan"]["k2"]) == expected
    assert trace["plan"]["cls_token"] is False and trace["positions"] == "original"
    assert [s["layer"] for s in trace["t2v"]] == [14, 21]
