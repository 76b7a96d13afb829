"""The SPEC §4 trace of one answer: every decision, count, timing and FLOP count, JSON-able.

A trace is versioned by its ``schema`` field (:data:`SCHEMA`; traces written before the field
existed are schema 1) and, from schema 2, can carry what it was computed on: each frame record
may hold the frame's view -- the region of the input the model saw (``view_box``), as a
:data:`VIEW_PX`-px JPEG -- either inline (``view_jpeg``: base64) or as a sidecar file next to the
trace (``view_file``: a bare file name in the trace's folder). :func:`attach_views` adds them;
``python -m model answer --json`` writes them inline, the lmms-eval plugin inline or as sidecars
(``trace_images``). The trace browser (``duet_viz/traces.py``) draws a trace's pictures on them.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from . import flops as F
from .budget import Plan, average
from .prompt import Prompt, per_frame_counts

SCHEMA = 2
VIEW_PX = 336  # the side of a frame's view: the LLaVA-1.5 input, and the figures' canvas
VIEW_JPEG_QUALITY = 85


def view_image(image: Image.Image, view_box: list[float], size: int | tuple[int, int] = VIEW_PX) -> Image.Image:
    """The region ``view_box`` (x0, y0, x1, y1) of ``image`` that the model saw, as an RGB picture of
    ``size`` (a side, or (width, height); padding is grey). A stored view is always a VIEW_PX
    square, whatever the region's aspect (Qwen2.5-VL sees whole, non-square images): the figures
    stretch it back onto the trace's grid (``duet_viz.figures.canvas``)."""
    x0, y0, x1, y1 = view_box
    canvas = Image.new("RGB", (math.ceil(x1 - x0), math.ceil(y1 - y0)), (128, 128, 128))
    canvas.paste(image.convert("RGB"), (round(-x0), round(-y0)))
    return canvas.resize((size, size) if isinstance(size, int) else size, Image.BICUBIC)


def view_jpeg(image: Image.Image, view_box: list[float]) -> bytes:
    buffer = io.BytesIO()
    view_image(image, view_box).save(buffer, format="JPEG", quality=VIEW_JPEG_QUALITY)
    return buffer.getvalue()


def attach_views(trace: dict, frames: list[Image.Image], sidecar: Path | None = None) -> dict:
    """``trace`` (not changed) with each frame's view: inline, or with ``sidecar`` (the path the
    trace will be written to) as ``<stem>.f<frame>.jpg`` files written next to it."""
    records = []
    for index, (record, image) in enumerate(zip(trace["frames"], frames)):
        jpeg = view_jpeg(image, record["view_box"])
        if sidecar is None:
            records.append({**record, "view_jpeg": base64.b64encode(jpeg).decode()})
        else:
            name = f"{sidecar.stem}.f{index}.jpg"
            (sidecar.parent / name).write_bytes(jpeg)
            records.append({**record, "view_file": name})
    return {**trace, "frames": records}


def build(engine, prompt: Prompt, visual, p: Plan, first, salient: list[int], decoded: tuple[list[int], int], text_len: int,
          ms: dict[str, float], warnings: list[str]) -> dict:
    """The trace of ``engine.answer``: ``first`` is its prefill, ``salient`` the salient rows of
    the reduced input, ``decoded`` the greedy tokens and how many decoding steps made them, ``ms`` the timer's sections,
    ``warnings`` what the user should know about the run (``engine.context_warning``)."""
    generated, steps = decoded
    n_visual_full = sum(prompt.slots)
    lm_cfg = engine.lm.config
    return {
        "schema": SCHEMA,
        "model": engine.name,
        "method": p.method,
        "budget": p.budget,
        "question": prompt.question,
        "answer": engine.tokenizer.decode(generated, skip_special_tokens=True).strip(),
        "generated_tokens": len(generated),
        "generated_ids": generated,
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "grid": engine.backbone.grid_of(prompt),
        "frames": visual.frames,
        "salient": [
            {"position": i, "token": engine.tokenizer.convert_ids_to_tokens(int(prompt.input_ids[0, j]))}
            for i, j in zip(salient, sorted(prompt.salient))
        ],
        "salient_rule": prompt.salient_rule,
        "salient_words": prompt.salient_words,
        "warnings": warnings,
        "plan": {**{k: v for k, v in asdict(p).items() if k != "stages"},
                 "stages": [asdict(s) for s in p.stages]},
        "positions": p.positions,  # position ids after a reduction: "contiguous" (renumbered) or "original"
        "t2v": first.stages,
        "visual_tokens_per_layer": first.counts,
        "visual_tokens_per_frame_layer": per_frame_counts(visual.frames, first.stages, engine.n_layers),
        "avg_visual_tokens": round(average(first.counts), 2),
        "timings_ms": {
            "vision": round(ms.get("vision", 0.0), 3),
            "v2v": round(ms.get("v2v", 0.0), 3),
            "prefill": round(ms["prefill"], 3),
            "decode_per_token": round(ms["decode"] / steps, 3) if steps else 0.0,
            "total": round(ms["total"], 3),
        },
        "flops": {
            "vision": engine.backbone.vision_flops(prompt),
            "llm": F.llm_flops(first.tokens_per_layer, lm_cfg.hidden_size, lm_cfg.intermediate_size),
            "llm_full": F.llm_flops([text_len + n_visual_full] * engine.n_layers,
                                    lm_cfg.hidden_size, lm_cfg.intermediate_size),
        },
    }
