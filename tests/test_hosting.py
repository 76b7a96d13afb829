"""Hosting: Space config, the Dockerfile's steps, the model allow-list, ZeroGPU fallback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import app
from duet_viz.limits import Guard, Limits, launch_options
from duet_viz.ui import gpu_task

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("---\n")[1]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}


def test_space_front_matter_matches_requirements():
    meta = front_matter()
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == pins["gradio"]
    assert meta["python_version"].strip('"') == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "llava-hf/llava-1.5-7b-hf" in (ROOT / "README.md").read_text().split("---\n")[1]


def test_dockerfile_follows_the_space_conventions():
    assert re.search(r"^FROM python:3\.11-slim$", DOCKERFILE, re.M)
    assert re.search(r"useradd .*--uid 1000 user", DOCKERFILE) and re.search(r"^USER user$", DOCKERFILE, re.M)
    assert "GRADIO_SERVER_NAME=0.0.0.0" in DOCKERFILE and re.search(r"^EXPOSE 7860$", DOCKERFILE, re.M)
    assert "HEALTHCHECK" in DOCKERFILE and 'CMD ["python", "app.py"]' in DOCKERFILE
    assert "ARG TORCH_INDEX_URL" in DOCKERFILE and "trust_remote_code" not in DOCKERFILE


def docker_steps() -> tuple[list[str], str]:
    """The Dockerfile's RUN pip steps and its health-check command, continuation lines joined."""
    joined = DOCKERFILE.replace("\\\n", " ")
    runs = [line[4:].strip() for line in joined.splitlines() if line.startswith("RUN pip ")]
    health = re.search(r"HEALTHCHECK .*?CMD (.*)$", joined, re.M).group(1)
    return runs, health


def test_dockerfile_steps_run_in_a_fresh_venv_and_the_app_passes_its_health_check(tmp_path, tiny_checkpoint):
    """No Docker engine here: run the image's pip steps in a new venv (on top of this machine's
    packages, with the local torch wheel instead of the CPU index), then its CMD and HEALTHCHECK."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    runs, health = docker_steps()
    assert len(runs) == 2
    for step in runs:
        step = step.replace("--user ", "").replace('--index-url "$TORCH_INDEX_URL" ', "")
        done = subprocess.run(f"{python} -m {step}", shell=True, cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "DUET_MODEL": str(tiny_checkpoint)}
    server = subprocess.Popen([python, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        check = health.strip().strip('"').replace("7860", str(port))
        deadline = time.time() + 120
        while True:
            done = subprocess.run([python, "-c", check.split("-c ", 1)[1].strip('"')], capture_output=True)
            if done.returncode == 0 or time.time() > deadline or server.poll() is not None:
                break
            time.sleep(1)
        assert done.returncode == 0, server.stderr.read() if server.poll() is not None else "no answer in 120 s"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("name", ["someone/evil-model", "gpt2", "/etc", "../../etc"])
def test_models_outside_the_allow_list_are_refused(name):
    with pytest.raises(SystemExit, match="allowed hub models"):
        app.resolve_model(name)


def test_allowed_and_local_models_pass(tiny_checkpoint):
    assert app.resolve_model(None) is None
    assert app.resolve_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    for qwen in ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"):
        assert app.resolve_model(qwen) == qwen
    assert app.resolve_model(str(tiny_checkpoint)) == str(tiny_checkpoint)


def test_gpu_task_is_the_function_itself_without_spaces():
    def work():
        return 42

    assert gpu_task(work) is work  # `spaces` is not a requirement: only ZeroGPU Spaces add it


def test_security_defaults():
    source = "\n".join(p.read_text() for p in [ROOT / "app.py", *ROOT.glob("model/*.py"), *ROOT.glob("duet_viz/*.py")])
    assert "trust_remote_code=True" not in source and "share=True" not in source and "debug=True" not in source
    assert "**launch_options(demo, limits)" in (ROOT / "app.py").read_text()
    options = launch_options(None, Limits())
    assert options["max_file_size"] == 20 * 2**20 and options["state_session_capacity"] == 512
    assert [m.cls for m in options["app_kwargs"]["middleware"]] == [Guard]


def test_health_endpoint_of_the_served_app(served):
    with urllib.request.urlopen(served, timeout=10) as response:
        assert response.status == 200
