"""Shared fixtures: tiny random LLaVA checkpoints saved to disk and loaded back through the
engine's own loader, so every test exercises the real loading path."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import TinyLlavaSpec, build_random_checkpoint
from model.engine import DuetLlava


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """LLaVA-1.5 geometry (336 px, 576 patches, 32 decoder layers), tiny widths."""
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaSpec(), seed=0)


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    torch.manual_seed(0)
    return DuetLlava.load(tiny_checkpoint, device="cpu")


def noise_picture(seed: int, height: int, width: int, box: tuple[slice, slice], colour) -> Image.Image:
    """Random pixels with one flat rectangle (``box``, rows then columns) of ``colour``."""
    pixels = np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[box] = colour
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def image():
    return noise_picture(0, 300, 400, (slice(100, 200), slice(50, 150)), (220, 30, 30))


QUESTION = "what color is the red circle ?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(engine):
    """The app on loopback, launched in-process on the tiny engine, behind the guard as
    ``python app.py`` serves it (the per-address limits off: every test is one address), so that
    the browser tests prove the page needs no route the guard refuses."""
    from duet_viz.limits import Limits, launch_options
    from duet_viz.page import build_demo

    limits = Limits().shared_address()
    demo = build_demo(engine, limits=limits)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **launch_options(demo, limits))
    yield url
    demo.close()


@pytest.fixture(scope="session")
def client(served):
    from gradio_client import Client

    return Client(served, verbose=False)


@pytest.fixture(scope="session")
def llama2_checkpoint(tmp_path_factory):
    """A stand-in for llava-hf/llava-1.5-7b-hf: its real processor files, the Llama-2 vocabulary
    included (``tests/llama2.py``), tiny random weights, 32 decoder layers, 4096 positions."""
    from .llama2 import build_standin

    return build_standin(tmp_path_factory.mktemp("llava-1.5-7b-hf-standin"))


@pytest.fixture(scope="session")
def llama2_engine(llama2_checkpoint):
    return DuetLlava.load(llama2_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2.5-VL (28 decoder layers, as the 7B model) saved with its tokenizer, chat
    template and PIL image processor (``checkpoint.build_random_qwen``)."""
    from model.checkpoint import build_random_qwen

    return build_random_qwen(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def qwen_engine(tiny_qwen):
    return DuetLlava.load(tiny_qwen, device="cpu")


@pytest.fixture(scope="session")
def served_qwen(tiny_qwen, tmp_path_factory):
    """``python app.py --model TINY_QWEN`` in a process of its own (its own loader, guard and
    limits, examples cached lazily); yields its URL once it answers."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_port()
    log = tmp_path_factory.mktemp("qwen-app") / "stderr.log"
    root = Path(__file__).resolve().parent.parent
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_qwen), "--device", "cpu",
                                   "--port", str(port), "--cache-examples", "lazy"], cwd=root,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"python app.py --model {tiny_qwen} did not serve: {log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="session")
def qwen_client(served_qwen):
    from gradio_client import Client

    return Client(served_qwen, verbose=False)


@pytest.fixture(scope="session")
def wide_image():
    """A non-square picture: 280 x 420 px -> a 10 x 15 grid of 150 merged tokens on Qwen2.5-VL."""
    return noise_picture(1, 280, 420, (slice(80, 200), slice(250, 380)), (30, 30, 220))
