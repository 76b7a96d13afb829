"""One adapter per host architecture, as ToMe keeps one patch file per host library.

An adapter owns what differs between backbones: how a checkpoint loads, how a prompt is built and
expanded, the tower pass and the score V2V ranks by, the merge's output order, the position ids
the LLM gets, and the patch grid the trace draws. The engine (``model/engine.py``), the decoder
loop (``model/decoder.py``) and the trace call the adapter through these names and know no
backbone:

- ``load(source, config, device, dtype)`` (classmethod), ``kind``, ``model``, ``processor``, ``lm``,
  ``takes_video`` (whether a question may come with several frames)
- ``prompt_text(question, n_frames)``, ``inputs(rgb_frames, text)`` -> the ``Prompt`` fields
- ``plan(reduction, n_layers, prompt)``, ``preset(method, video)``, ``kept_short_side_px``
- ``tower(prompt)`` -> states, ``reduce_prompt(states, plan, timer, prompt)`` -> :class:`Visual`
- ``positions(prompt, keep, visual, layout)``, ``grid_of(prompt)``, ``vision_flops(prompt)``
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass
class Visual:
    features: torch.Tensor  # (N, d_text) projected visual tokens, frames concatenated
    frames: list[dict]  # per-frame trace records
    tokens_per_frame: list[int]

    @classmethod
    def of(cls, features: torch.Tensor, records: list[dict], counts: list[int]) -> "Visual":
        """The frames' records, each told where its tokens sit among all of them."""
        offset = 0
        for f, (record, n) in enumerate(zip(records, counts)):
            record.update(index=f, token_offset=offset, n_tokens=n)
            offset += n
        return cls(features, records, counts)


ADAPTERS = {"llava": ("llava", "Llava"), "video_llava": ("video_llava", "VideoLlava"),
            "qwen2_5_vl": ("qwen2_5_vl", "Qwen25VL")}  # config.model_type -> (module, class)


def adapter_class(model_type: str):
    """The adapter for a checkpoint's ``config.model_type``."""
    if model_type not in ADAPTERS:
        raise ValueError(f"checkpoints of type {model_type!r} are not supported; "
                         f"supported: {', '.join(sorted(ADAPTERS))}")
    module, name = ADAPTERS[model_type]
    return getattr(importlib.import_module(f".{module}", __name__), name)
