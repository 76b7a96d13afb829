"""A question about one image or several frames, as the LLM receives it: the processor's expanded
ids, which of them are salient, and what part of each picture the model sees."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .salient import salient_spans
from .t2v import tokens_overlapping


@dataclass(frozen=True)
class Route:
    """Which tower reads the frames and which placeholder token stands for its output."""

    tower: nn.Module
    token_id: int
    cls_kept: bool  # the LLM sees each frame's CLS token ahead of its patch tokens


@dataclass
class Prompt:
    input_ids: torch.Tensor  # (1, T) as the processor expands it: every visual slot of every frame
    pixel_values: torch.Tensor  # what the tower reads: (F, 3, H, W) for CLIP towers, (patches, C*T*P*P) for Qwen2.5-VL
    salient: list[int]  # positions in input_ids of the salient text tokens (incl. the last)
    salient_rule: str  # which rule chose them: "spacy", "builtin", "given" (or "last-only", see salient_positions)
    salient_words: list[str]  # the question's words behind them, in order, once each (what a person reads)
    question: str
    view_boxes: list[list[float]]  # per frame: the region of the original image the model sees
    route: Route
    slots: list[int] = field(default_factory=list)  # per frame: its visual slots in input_ids (CLS included where kept)
    grids: list[list[int]] = field(default_factory=list)  # per frame: [rows, cols] of the patches the trace draws
    image_grid_thw: torch.Tensor | None = None  # (F, 3) Qwen2.5-VL: each image's (t, h, w) patch grid
    rope_positions: torch.Tensor | None = None  # (3, T) Qwen2.5-VL: the full prompt's M-RoPE position ids


def per_frame_counts(frames: list[dict], stages: list[dict], n_layers: int) -> list[list[int]]:
    """Visual tokens of each frame alive at each LLM layer (frames x layers), from the records."""
    bounds = [(f["token_offset"], f["token_offset"] + f["n_tokens"]) for f in frames]
    alive = [b - a for a, b in bounds]
    kept_at = {s["layer"]: s["kept"] for s in stages}
    rows = [[] for _ in frames]
    for layer in range(n_layers):
        if layer in kept_at:
            alive = [sum(a <= t < b for t in kept_at[layer]) for a, b in bounds]
        for row, count in zip(rows, alive):
            row.append(count)
    return rows


def salient_positions(tokenizer, image_token_id: int, text: str, question: str, input_ids: torch.Tensor,
                      words=None) -> tuple[list[int], str, list[str]]:
    """(token positions in the processor's expanded prompt ``input_ids`` of the question's salient
    words (``salient.salient_spans``) plus the last prompt token, the rule that chose them, those
    words as the question spells them, once each). Offsets come from tokenizing ``text`` with a
    single image token per image; if that does not reproduce the processor's ids, only the last
    token is used (rule "last-only", no words)."""
    last = len(input_ids) - 1
    short = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = short["input_ids"], short["offset_mapping"]
    expansion = (input_ids == image_token_id).sum().item() // max(1, ids.count(image_token_id))
    shift, expanded_pos = 0, []
    for token in ids:
        expanded_pos.append(len(expanded_pos) + shift)
        if token == image_token_id:
            shift += expansion - 1
    expanded = [t for t in ids for _ in range(expansion if t == image_token_id else 1)]
    start = text.rfind(question)
    if expanded != input_ids.tolist() or start < 0:
        return [last], "last-only", []
    words_found, rule = salient_spans(question, words)
    chosen, named = set(), []
    for a, b, word in words_found:
        hit = tokens_overlapping(offsets, [(start + a, start + b)])
        chosen |= {expanded_pos[i] for i in hit}
        if hit and word not in named:
            named.append(word)
    return sorted(chosen | {last}), rule, named


def view_box(image_processor, size: tuple[int, int]) -> list[float]:
    """The part of the original image (x0, y0, x1, y1 in its pixels) that fills the model's
    square input, following the processor's pad / shortest-edge resize / centre crop."""
    ip = image_processor
    w, h = size
    x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
    if getattr(ip, "do_pad", False):
        side = max(w, h)
        x0, y0, x1, y1 = (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2
    bw, bh = x1 - x0, y1 - y0
    if getattr(ip, "do_center_crop", False) and ip.crop_size is not None:
        crop_h, crop_w = ip.crop_size["height"], ip.crop_size["width"]
        edge = (ip.size or {}).get("shortest_edge")
        scale = edge / min(bw, bh) if edge else 1.0
        cw, ch = crop_w / scale, crop_h / scale
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, y0, x1, y1 = cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2
    return [round(v, 2) for v in (x0, y0, x1, y1)]
