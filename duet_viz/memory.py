"""What the server keeps and gives back: content fingerprints of inputs, the size of a kept
result, and glibc tuning so freed activations return to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib

from PIL import Image


def fingerprint(source) -> str:
    """Content hash of an upload (file path) or a pasted image (PIL), so a repeated input is found
    whatever temp path it arrived under."""
    digest = hashlib.sha256()
    if isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    else:
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


_GLIBC = _glibc()
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_heap_growth() -> None:
    """Serve large blocks (activations) from mmap, so freeing them returns them to the OS. glibc
    otherwise raises its mmap threshold after the first large frees and carves later activations
    out of per-thread heaps that fragment; the server's RSS then creeps up request after request
    (measured with ``python -m duet_viz.load``, BENCHMARKS.md)."""
    if _GLIBC is not None:
        _GLIBC.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def release_memory() -> None:
    """Hand freed heap pages back to the OS after a model run (glibc's malloc_trim)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


SHARED = "examples"  # owner of the pinned example results, which every session may reuse
MAX_RESULT_BYTES = 256 * 2**20
SESSION_SHARE = 0.25  # of the result cache's entries and bytes that one session's results may hold
# Python's dicts, lists and floats of a trace take several times its JSON text: at most 5.2 times
# (tracemalloc, the shipped model's traces of every method on an image and a 16-frame clip).
TRACE_BYTES_PER_JSON_BYTE = 6


def result_bytes(frames: list[Image.Image], trace_json: str) -> int:
    """What a result holds in memory: its kept frames, its traces and their JSON text."""
    pixels = sum(f.width * f.height * len(f.getbands()) for f in frames)
    return pixels + (1 + TRACE_BYTES_PER_JSON_BYTE) * len(trace_json)
