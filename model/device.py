"""Where the model runs and how its work is timed."""

from __future__ import annotations

import time

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available")
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Timer:
    """Wall-clock sections, synchronising CUDA so GPU work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        return time.perf_counter()

    def stop(self, name: str, started: float):
        self._sync()
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1e3
