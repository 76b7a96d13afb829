"""Issue 36: every field capped before Gradio stores it, files and folders per upload counted,
the sweep removing the folders it empties, and nothing of the app's left in Gradio's cache after
a stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from duet_viz.hostile import Probe, run_args
from duet_viz.limits import (
    FILE_OVERHEAD_BYTES,
    MAX_DATA_CHARS,
    MAX_FIELD_CHARS,
    Limits,
    Refusal,
    UploadSpace,
    longest_string,
)

from .conftest import free_port
from .test_app import EXAMPLE
from .test_hostile import ROOT, launched, upload


@pytest.fixture(scope="module")
def public(engine):
    with launched(engine, Limits()) as probe:
        yield probe


def test_longest_string_walks_keys_values_and_refuses_deep_nesting():
    assert longest_string(["ab", {"xyz": 1, "k": ["abcd"]}, 3.0, None]) == 4
    nested = "x"
    for _ in range(20):
        nested = [nested]
    with pytest.raises(Refusal, match="nested too deeply"):
        longest_string(nested)


@pytest.mark.parametrize("field,message", [
    ("question", rf"“Question” is too long \(25,000,000 characters; at most {MAX_FIELD_CHARS:,}\)"),
    ("salient", rf"is too long \(25,000,000 characters; at most {MAX_FIELD_CHARS:,}\)"),
])
def test_a_huge_field_is_refused_in_words_before_gradio_sees_it(public, engine, field, message):
    image = upload(public, EXAMPLE, "203.0.113.140")
    session = uuid.uuid4().hex[:12]
    reply = public.join("run", run_args(image, **{field: "a" * 25_000_000}), "203.0.113.140", session=session)
    assert reply.status == 413 and reply.data is None
    assert re.search(message, reply.message), reply.message


@pytest.mark.parametrize("field,value,message", [
    ("question", "what \ud800 is it", r"The question holds a character that is not text \(U\+D800, at position 6\)"),
    ("salient", "cat \udfff", r"The salient-words override holds a character that is not text \(U\+DFFF"),
])
def test_a_lone_surrogate_is_refused_in_words(public, field, value, message):
    """JSON's \\ud800 escapes carry text that is not Unicode; the tokenizer's own error named Rust types."""
    image = upload(public, EXAMPLE, "203.0.113.143")
    reply = public.join("run", run_args(image, **{field: value}), "203.0.113.143")
    assert reply.status == 200 and reply.data is None and re.search(message, reply.message), reply.message


def test_refused_fields_leave_no_session_state_behind(engine):
    """64 sessions each sending a refused 25 MB question: Gradio never holds any of them."""
    with launched(engine, Limits().shared_address()) as probe:
        image = upload(probe, EXAMPLE, "203.0.113.141")
        sessions = [uuid.uuid4().hex[:12] for _ in range(64)]
        for session in sessions:
            reply = probe.join("run", run_args(image, question="a" * 25_000_000), "203.0.113.141", session=session)
            assert reply.status == 413
        holder = probe.demo.server_app.state_holder
        assert not [s for s in sessions if s in holder]
        kept = probe.join("run", run_args(image), "203.0.113.141", session=sessions[0])
        assert kept.data is not None and sessions[0] in holder  # an admitted request is stored as usual


def test_many_fields_together_are_capped(public):
    image = upload(public, EXAMPLE, "203.0.113.142")
    data = run_args(image, compare=["duet-64"] * (MAX_DATA_CHARS // 8))
    reply = public.join("run", data, "203.0.113.142")
    assert reply.status == 413 and "too large together" in reply.message


def multipart(n_files: int) -> tuple[bytes, dict]:
    boundary = "duetboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{n}.txt"\r\n'
             f"Content-Type: text/plain\r\n\r\nx\r\n" for n in range(n_files)]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def cache_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_files_per_upload_are_capped_and_a_refused_upload_leaves_nothing(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    limits = Limits().shared_address()
    with launched(engine, limits) as probe:
        before = set(cache_files(tmp_path))
        body, headers = multipart(limits.max_files_per_upload + 1)
        response = httpx.post(f"{probe.base}/upload", content=body, headers=headers, timeout=60)
        assert response.status_code == 400 and f"At most {limits.max_files_per_upload} files" in response.text
        assert set(cache_files(tmp_path)) == before
        body, headers = multipart(3)
        response = httpx.post(f"{probe.base}/upload", content=body, headers=headers, timeout=60)
        assert response.status_code == 200 and len(response.json()) == 3


def test_files_count_their_folder_and_the_sweep_removes_emptied_folders(tmp_path):
    demo = SimpleNamespace(upload_file_set=set(), temp_file_sets=[set()], GRADIO_CACHE=str(tmp_path))
    space = UploadSpace(demo, max_bytes=10 * (FILE_OVERHEAD_BYTES + 1), min_age_s=0)
    paths = [space.store(bytes([n]), f"{n}.bin") for n in range(12)]  # 1 byte each, 8 KB on disk each
    assert sum(p.exists() for p in paths) == 10  # not 12 bytes: 12 folders and files
    output = tmp_path / "out" / "overlay.png"  # a file Gradio moved into its cache for the app
    output.parent.mkdir()
    output.write_bytes(b"png")
    demo.temp_file_sets[0].add(str(output))
    for path in paths:  # Gradio's sweep deletes old files and leaves their folders
        path.unlink(missing_ok=True)
    output.unlink()
    assert space.sweep() == 11 and list(tmp_path.iterdir()) == []
    young = UploadSpace(demo, max_bytes=2**20, min_age_s=3600)
    kept = young.store(b"abc", "a.bin")
    kept.unlink()
    assert young.sweep() == 0 and kept.parent.is_dir()  # Gradio may be about to move a file into it
    young.clear()
    assert list(tmp_path.iterdir()) == []


def test_a_stop_leaves_gradios_cache_as_it_found_it(tiny_checkpoint, tmp_path):
    """SIGTERM after an upload and a run: the app's work folder is gone, and no file or folder the
    app put in Gradio's cache is left."""
    cache = tmp_path / "gradio"
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_TEMP_DIR": str(cache), "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_checkpoint), "--port", str(port),
                               "--cache-examples", "lazy"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        assert len(list(tmp_path.glob("duet-viz-*"))) == 1

        probe = Probe(f"http://127.0.0.1:{port}/")
        image = upload(probe, EXAMPLE, "127.0.0.1")
        assert Path(image["path"]).is_file() and cache in Path(image["path"]).parents
        assert probe.join("run", run_args(image, max_new_tokens=2), "127.0.0.1").data is not None
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert list(tmp_path.glob("duet-viz-*")) == []
    assert not cache.exists() or list(cache.rglob("*")) == []
