"""A clean stop at any moment: ``python app.py`` ends with status 0 on SIGTERM and removes its
work folder, example caching included (issue 35: it aborted with status 134 there)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def lines_of(process: subprocess.Popen) -> queue.Queue:
    found: queue.Queue = queue.Queue()

    def read():
        for line in process.stdout:
            found.put(line)
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    return found


@pytest.mark.parametrize("signal_at", ["caching the results of 7 examples", "Running on local URL"])
def test_sigterm_while_examples_are_caching_exits_0_and_removes_the_work_folder(tiny_checkpoint, tmp_path,
                                                                                signal_at):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_checkpoint), "--port", str(free_port()),
                                "--cache-examples", "eager"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output, lines, deadline = [], lines_of(process), time.monotonic() + 120
    try:
        while not any(signal_at in line for line in output):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(output)
            output.append(line)
        work = [path for path in tmp_path.glob("duet-viz-*") if path.is_dir()]
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    while (line := lines.get(timeout=10)) is not None:
        output.append(line)
    text = "".join(output)
    assert len(work) == 1  # the app's work folder existed when the signal came
    assert "cached the results of" not in text, "caching had finished before the signal: the test proves nothing"
    assert status == 0, text[-3000:]
    assert not work[0].exists() and "terminate called" not in text
