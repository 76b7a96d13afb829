import json
import subprocess
import sys

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
    assert {"dominant", "clusters", "scores"} <= set(trace["frames"][0])
    assert {"layer", "n_in", "kept", "scores"} <= set(trace["t2v"][0])
    assert (trace["method"], trace["budget"], trace["grid"]) == ("duet", 64, [24, 24])


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
