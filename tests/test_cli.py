import json
import subprocess
import sys

import pytest
from PIL import Image

from model.video import write_clip

SPEC_FIELDS = {
    "model", "method", "budget", "answer", "generated_tokens", "grid", "frames", "t2v",
    "visual_tokens_per_layer", "avg_visual_tokens", "timings_ms", "flops",
}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, text=True, timeout=120)


def test_answer_json_has_every_spec_field(tiny_checkpoint, image, tmp_path):
    path = tmp_path / "in.png"
    image.save(path)
    done = run_cli("answer", "--model", str(tiny_checkpoint), "--image", str(path), "--question",
                   "what color is the circle ?", "--method", "duet", "--budget", "64",
                   "--max-new-tokens", "3", "--json")
    assert done.returncode == 0, done.stderr
    trace = json.loads(done.stdout)
    assert SPEC_FIELDS <= set(trace)
    assert set(trace["timings_ms"]) == {"vision", "v2v", "prefill", "decode_per_token", "total"}
    assert set(trace["flops"]) == {"vision", "llm", "llm_full"}
    assert {"dominant", "cls_kept", "clusters", "discarded", "scores"} <= set(trace["frames"][0])
    assert {"layer", "n_in", "kept", "scores"} <= set(trace["t2v"][0])
    assert (trace["method"], trace["budget"], trace["grid"]) == ("duet", 64, [24, 24])


@pytest.mark.parametrize("budget,entering,after_16,average", [("192", 307, 153, 191.75), ("128", 205, 102, 128.0)])
def test_duet_presets_report_the_tokens_the_official_code_keeps(tiny_checkpoint, image, tmp_path, budget, entering,
                                                                after_16, average):
    path = tmp_path / "in.png"
    image.save(path)
    done = run_cli("answer", "--model", str(tiny_checkpoint), "--image", str(path), "--question",
                   "what color is the circle ?", "--method", "duet", "--budget", budget, "--max-new-tokens", "2",
                   "--json")
    assert done.returncode == 0, done.stderr
    trace = json.loads(done.stdout)
    counts = trace["visual_tokens_per_layer"]
    assert (counts[0], counts[16], counts[24]) == (entering, after_16, 0)  # CLS included in the entering ones
    assert trace["avg_visual_tokens"] == average
    frame = trace["frames"][0]
    assert frame["cls_kept"] and len(frame["dominant"]) + len(frame["clusters"]) + 1 == entering
    assert len(frame["discarded"]) == 576 - len(frame["dominant"]) - sum(len(c["members"]) for c in frame["clusters"])


def test_answer_video_takes_the_video_llava_preset(tiny_checkpoint, tmp_path):
    clip = write_clip(tmp_path / "clip.webm", [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue", "red")])
    done = run_cli("answer", "--model", str(tiny_checkpoint), "--video", str(clip), "--frames", "3",
                   "--question", "what color is the circle ?", "--max-new-tokens", "2", "--json")
    assert done.returncode == 0, done.stderr
    trace = json.loads(done.stdout)
    assert len(trace["frames"]) == 3 and [f["n_tokens"] for f in trace["frames"]] == [192] * 3
    assert (trace["plan"]["k1"], trace["plan"]["k2"]) == (160, 32)
    assert [s["query"] for s in trace["t2v"]] == ["last", "last"]
    assert trace["visual_tokens_per_layer"][16] == int(0.5 * 3 * 192)


def test_answer_plain_prints_only_the_answer(tiny_checkpoint, image, tmp_path):
    path = tmp_path / "in.png"
    image.save(path)
    done = run_cli("answer", "--model", str(tiny_checkpoint), "--image", str(path), "--question", "what ?",
                   "--method", "full", "--budget", "576", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1


def test_bad_arguments_fail_with_a_message(tiny_checkpoint, tmp_path):
    done = run_cli("answer", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "missing.png"),
                   "--question", "what ?")
    assert done.returncode == 2 and "error:" in done.stderr
    done = run_cli("answer", "--model", str(tiny_checkpoint), "--image", "x.png", "--question", "q",
                   "--method", "nope")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_tiny_builds_a_loadable_checkpoint(tmp_path):
    done = run_cli("tiny", str(tmp_path / "ck"), "--layers", "4")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ck" / "config.json").exists() and (tmp_path / "ck" / "processor_config.json").exists()


def test_a_run_past_the_context_window_warns_on_stderr(tiny_checkpoint, tmp_path):
    clip = write_clip(tmp_path / "clip.webm", [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue")])
    done = run_cli("answer", "--model", str(tiny_checkpoint), "--video", str(clip), "--frames", "8",
                   "--question", "what color ?", "--method", "full", "--budget", "576", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "warning: full: this run needs" in done.stderr and "At most 7 frames fit with full." in done.stderr
    assert len(done.stdout.strip().splitlines()) <= 1  # the answer alone on stdout
