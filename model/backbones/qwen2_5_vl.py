"""Qwen2.5-VL checkpoints (``Qwen2_5_VLForConditionalGeneration``), as DUET-VLM's own Qwen code runs them.

Rules follow AMD-AGI/DUET-VLM ``qwen2_5_vl/modeling_qwen2_5vl_duet.py`` (cited ``qwen.py`` l.N
below), its ``eval_benchmarks.py`` and ``scripts/qwen/*.sh``:

- **Inputs.** Stock ``Qwen2_5_VLProcessor`` needs torchvision (its video processor), so the
  prompt is the tokenizer's chat template on one user turn [image, question] (``eval_benchmarks.py``
  l.586-590) and the image goes through ``Qwen2VLImageProcessorPil`` with ``max_pixels`` =
  2880 x 28 x 28, the eval script's default (l.675, l.485-486); ``<|image_pad|>`` expands to one
  token per 2 x 2 merged group. One image per question: video and several images are refused.
- **Score** (``qwen.py`` l.360-366, l.602-615, l.625-632): no CLS token, so each merged token ranks by the
  attention it *receives* in the last vision block: softmax(q kᵀ / √d) from that block's own
  q/k after the vision RoPE, mean over heads, summed over query rows (chunked:
  ``v2v.received_attention``), averaged over its 2 x 2 group, the window ordering undone; the
  keys pooled the same way and averaged over heads are the clustering metric. The softmax runs
  over every token of the image, as the authors' SDPA path computes it. Choice: fp32 here,
  the model's dtype there.
- **V2V** (l.2373-2499, ``v2v.slot_merge``): on the LLM-side tokens after the merger;
  ``dominant`` = min(dominant, N - 1), ``contextual`` = min(contextual, N - dominant) (l.2380-2388),
  scripts' 540 + 100, or as shares of the image's tokens, int(0.65 · N) and max(int(0.05 · N), 1)
  (``run_inference.py``'s ratios; ``dominant_share`` / ``contextual_share``); DUET's pool of
  cluster_width · contextual, or VisionZip's evenly spaced targets (``use_ori_visionzip``). Each
  kept token stays in its own place with its own 3-D M-RoPE position id; a contextual token takes
  its anchor's (l.2469-2472, l.2482, l.2496-2499).
- **T2V** (``pdrop_rank_drop``, l.1651-1780): before stage layer l (l.1603), layer l's own q/k (l.1687) after M-RoPE
  rank the visual tokens by every row after the image, softmax over all keys **without a causal
  mask** (l.1732-1733), mean over heads and rows (l.1736-1737); the top keep in order (l.1743); survivors keep
  their 3-D position ids (l.1762-1767) and decoding continues from the full prompt's ids (stock
  ``rope_deltas``). Scripts: layers 14, 21 of 28, ratios 0.5, 0.25 (the README quick start and
  ``configure_duet``'s docstring list others; the scripts ran the published tables).

**Where the authors' files disagree, and what runs here.** Stage counts: LLaVA's
``modeling_llama_pdrop.py`` l.1329-1330 keeps int(ratio_i · n) of the n V2V tokens at stage i,
every alive token ranked. The Qwen file overwrites ``self.image_tokens`` with each stage's keep
(l.1775) and then multiplies it by the next stage's *cumulative* ratio again (l.1677-1680): at the
second stage it ranks only the first int(n/2 · 0.5) of the n/2 survivors, keeps int(n/2 · 0.25)
of them and lets the other n/4 pass unranked (640 -> 320 -> 240 instead of 160). We follow the
LLaVA file's rule (keep int(ratio · n), rank every alive token), which is what the ratio list
states; the trace's stage records show the counts that ran.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

from .. import flops as F
from ..budget import DEFAULT_POSITIONS, Plan, ReductionConfig, Stage, average, layer_counts, plan
from ..device import Timer
from ..prompt import Prompt, Route
from ..v2v import group_mean, received_attention, slot_merge
from . import Visual

MAX_PIXELS = 2880 * 28 * 28  # eval_benchmarks.py --max-pixels 2880 (x 28 x 28, l.485-486, l.675)
AUTHORS_DOMINANT, AUTHORS_CONTEXTUAL = 540, 100  # scripts/qwen/*.sh --dominant 540 --contextual 100
AUTHORS_DOMINANT_SHARE, AUTHORS_CONTEXTUAL_SHARE = 0.65, 0.05  # run_inference.py --dominant 0.65 --contextual 0.05
AUTHORS_RATIOS = (0.5, 0.25)  # scripts/qwen/*.sh --ratio-list 0.5 0.25
AUTHORS_LAYERS = (14, 21)  # scripts/qwen/*.sh --layer-list 14 21, of Qwen2.5-VL-7B's 28 layers
DEFAULT_QUERY = "text"  # pdrop_rank_drop: every row after the image


def authors_counts(n_tokens: int, dominant: int, contextual: int) -> tuple[int, int]:
    """(dominant, contextual) for an image of ``n_tokens`` merged tokens, capped as the authors cap
    absolute counts (``qwen.py`` l.2380-2388)."""
    kept = min(dominant, n_tokens - 1)
    return kept, min(contextual, n_tokens - kept)


def stage_layers(n_layers: int) -> tuple[int, ...]:
    """The scripts' 14 and 21 of 28 layers at any depth (L/2, 3L/4)."""
    return tuple(max(1, min(n_layers - 1, round(l * n_layers / 28))) for l in AUTHORS_LAYERS)


def plan_qwen(cfg: ReductionConfig, n_layers: int, n_tokens: int) -> Plan:
    """``cfg`` for one image of ``n_tokens`` merged tokens.

    DUET and VisionZip: ``k1``/``k2`` are the authors' absolute counts (no CLS counted), capped per
    image; ``dominant_share``/``contextual_share`` the authors' ratios of this image's tokens
    (int(0.65 · n) and max(int(0.05 · n), 1), l.2380-2388; a count given wins, a share left out
    takes the authors' default); with neither, the budget (average visual tokens per LLM layer,
    SPEC §1) solves n = k1 + k2 for this image, split as 540 : 100. Counts or shares make the plan's
    budget the average they reach on this image. DUET's stages keep int(ratio · n) (module docstring).
    Other methods plan as on LLaVA over this image's tokens (FastV, PyramidDrop and FitPrune need no
    CLS; HiRED ranks by the received attention); given shares, their budget is DUET's average at
    those shares on this image, so a comparison is matched per image. Positions stay the original
    3-D ids unless asked."""
    positions = cfg.positions or ("original" if cfg.method in ("duet", "visionzip", "full", "hired")
                                  else DEFAULT_POSITIONS.get(cfg.method, "contiguous"))
    shared = cfg.dominant_share is not None or cfg.contextual_share is not None
    if cfg.method not in ("duet", "visionzip"):
        matched = plan_qwen(replace(cfg, method="duet", positions=None), n_layers, n_tokens).budget if shared else cfg.budget
        own = replace(cfg, budget=matched, dominant_share=None, contextual_share=None)
        solved = replace(plan(own, n_layers, n_tokens), cls_token=False, positions=positions)
        return solved if cfg.method != "hired" else replace(solved, stages=())
    base = Plan(cfg.method, int(cfg.budget), n_layers, n_tokens, cluster_width=cfg.cluster_width,
                positions=positions, cls_token=False)
    layers = cfg.stage_layers if cfg.stage_layers is not None else stage_layers(n_layers)
    ratios = cfg.stage_ratios if cfg.stage_ratios is not None else AUTHORS_RATIOS
    if cfg.method == "visionzip":
        layers, ratios = (), ()
    query = cfg.query or DEFAULT_QUERY

    def stages(n: int) -> tuple[Stage, ...]:
        return tuple(Stage(l, int(r * n), query, l, r, causal=False) for l, r in zip(layers, ratios))

    def avg(n: int) -> float:
        return average(layer_counts(n, stages(n), n_layers))

    counted = shared or cfg.k1 is not None or cfg.k2 is not None
    if counted:
        dominant, contextual = AUTHORS_DOMINANT, AUTHORS_CONTEXTUAL
        if shared:
            dominant = int((cfg.dominant_share if cfg.dominant_share is not None else AUTHORS_DOMINANT_SHARE) * n_tokens)
            share = cfg.contextual_share if cfg.contextual_share is not None else AUTHORS_CONTEXTUAL_SHARE
            contextual = max(int(share * n_tokens), 1)
        k1, k2 = authors_counts(n_tokens, cfg.k1 if cfg.k1 is not None else dominant,
                                cfg.k2 if cfg.k2 is not None else contextual)
    else:
        n = min(range(1, n_tokens + 1), key=lambda m: (abs(avg(m) - base.budget), m))
        k2 = min(n - 1, round(n * AUTHORS_CONTEXTUAL / (AUTHORS_DOMINANT + AUTHORS_CONTEXTUAL)))
        k1, k2 = (None, 0) if n == n_tokens else (n - k2, k2)  # every token: nothing to merge
    solved = replace(base, k1=k1, k2=k2)
    n = solved.tokens_per_frame
    if counted:
        solved = replace(solved, budget=max(1, round(avg(n))))
    feasible = counted or abs(avg(n) - base.budget) <= max(2.0, 0.02 * base.budget)
    return replace(solved, stages=tuple(s for s in stages(n) if s.keep < n), feasible=feasible)


class QwenInputs:
    """Processor for Qwen2.5-VL without torchvision: its tokenizer (chat template) + PIL image processor."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, source: str) -> "QwenInputs":
        return cls(AutoTokenizer.from_pretrained(source),
                   Qwen2VLImageProcessorPil.from_pretrained(source, max_pixels=MAX_PIXELS))

    def __call__(self, images, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """``Qwen2_5_VLProcessor``'s output for one prompt: each ``<|image_pad|>`` expanded to its
        image's merged tokens, and ``mm_token_type_ids`` (1 on image tokens) for ``get_rope_index``."""
        out = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the prompt holds {len(pieces) - 1} image placeholders for {len(images)} images")
        expanded = pieces[0] + "".join(self.image_token * (int(g.prod()) // merge) + rest
                                       for g, rest in zip(out["image_grid_thw"], pieces[1:]))
        input_ids = self.tokenizer(expanded, return_tensors="pt")["input_ids"]
        return {"input_ids": input_ids, "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"],
                "mm_token_type_ids": (input_ids == self.image_token_id).int()}


@dataclass
class QwenStates:
    merged: torch.Tensor  # (n, d_text) the merger's output, raster order (what stock feeds the LLM)
    block_input: torch.Tensor  # (N, d_vision) the last block's input, window order
    rope: tuple[torch.Tensor, torch.Tensor]  # that block's (cos, sin), window order
    window_index: torch.Tensor  # (n,) the merged groups' window order


class Qwen25VL:
    """Qwen2.5-VL's parts as transformers 5 names them: ``model.model.visual`` (windowed ViT + 2 x 2
    merger), ``model.model.language_model`` (Qwen2 decoder with M-RoPE), ``model.lm_head``."""

    kind = "qwen2_5_vl"
    video_llava = False
    takes_video = False  # one image per question (``one_image``)
    batches = False  # every image has its own grid and plan
    # an image is kept up to the side of a square of max_pixels: the processor never reads more
    kept_short_side_px = math.isqrt(MAX_PIXELS)

    def __init__(self, model, processor: QwenInputs):
        self.model, self.processor = model, processor
        self.visual = model.model.visual
        self.lm = model.model.language_model
        self.image_route = self.video_route = Route(self.visual, model.config.image_token_id, cls_kept=False)
        self.merge = self.visual.spatial_merge_size
        self.unit = self.merge ** 2  # patches per merged token
        self.factor = self.visual.patch_size * self.merge  # pixels per merged token side (28)
        self.n_patches = processor.image_processor.size["longest_edge"] // self.factor ** 2  # the most one image gets
        self.grid = None  # per image: Prompt.grids
        block = self.visual.blocks[-1]
        self.apply_vision_rope = sys.modules[type(block.attn).__module__].apply_rotary_pos_emb_vision

    @classmethod
    def load(cls, source: str, config, device: torch.device, dtype: torch.dtype) -> "Qwen25VL":
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device).eval(), QwenInputs.from_pretrained(source))

    # ----------------------------------------------------------------------------- inputs
    def prompt_text(self, question: str, n_frames: int) -> str:
        """The chat template on one user turn [image, question] (``eval_benchmarks.py`` l.586-590)."""
        self.one_image(n_frames)
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return self.processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                            add_generation_prompt=True)

    @staticmethod
    def one_image(n_frames: int) -> None:
        if n_frames != 1:
            raise ValueError("Qwen2.5-VL runs one image per question here; video and several images are not "
                             "supported (DUET-VLM's Qwen code reduces one image)")

    def inputs(self, rgb: list, text: str) -> dict:
        self.one_image(len(rgb))
        out = self.processor(images=rgb, text=text)
        grid_thw = out["image_grid_thw"]
        _, h, w = (int(v) for v in grid_thw[0])
        rope, _ = self.model.model.get_rope_index(out["input_ids"], out["mm_token_type_ids"], image_grid_thw=grid_thw)
        width, height = rgb[0].size
        return dict(input_ids=out["input_ids"], pixel_values=out["pixel_values"], route=self.image_route,
                    slots=[h * w // self.unit], grids=[[h // self.merge, w // self.merge]],
                    view_boxes=[[0.0, 0.0, float(width), float(height)]],  # resized whole, never cropped
                    image_grid_thw=grid_thw, rope_positions=rope[:, 0])

    def plan(self, reduction: ReductionConfig, n_layers: int, prompt: Prompt | None = None) -> Plan:
        """``plan_qwen`` for ``prompt``'s image (without one: the largest image ``max_pixels`` allows)."""
        return plan_qwen(reduction, n_layers, prompt.slots[0] if prompt is not None else self.n_patches)

    def preset(self, method: str, video: bool) -> dict:
        """The scripts' settings (``scripts/qwen/*.sh``) for a run that names no budget or split; the
        nominal budget is their per-layer average on an image of 640+ tokens, over the decoder's depth."""
        if method not in ("duet", "visionzip"):
            return {}
        n, n_layers = AUTHORS_DOMINANT + AUTHORS_CONTEXTUAL, self.lm.config.num_hidden_layers
        stages = [Stage(l, int(r * n), DEFAULT_QUERY, l, r) for l, r in zip(stage_layers(n_layers), AUTHORS_RATIOS)]
        budget = average(layer_counts(n, stages if method == "duet" else [], n_layers))
        return dict(k1=AUTHORS_DOMINANT, k2=AUTHORS_CONTEXTUAL, budget=round(budget))

    # ----------------------------------------------------------------------------- vision
    def tower(self, prompt: Prompt) -> QwenStates:
        """The stock tower, its last block's input and RoPE read by a forward pre-hook."""
        seen = {}

        def grab(module, args, kwargs):
            seen["h"], seen["rope"] = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]

        first = next(self.model.parameters())
        grid_thw = prompt.image_grid_thw.to(first.device)
        handle = self.visual.blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            merged = self.visual(prompt.pixel_values.to(first.device, first.dtype), grid_thw=grid_thw).pooler_output
        finally:
            handle.remove()
        window_index, _ = get_vision_window_index(grid_thw, self.merge, self.visual.window_size,
                                                  self.visual.patch_size)
        return QwenStates(merged, seen["h"], seen["rope"], window_index.to(first.device))

    def scores(self, states: QwenStates) -> tuple[torch.Tensor, torch.Tensor]:
        """(received attention per merged token (n,), pooled keys averaged over heads (n, hd)),
        raster order (module docstring)."""
        block = self.visual.blocks[-1]
        attn = block.attn
        x = block.norm1(states.block_input)
        n_rows = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n_rows, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self.apply_vision_rope(q, k, *states.rope)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, N, hd)
        reverse = torch.argsort(states.window_index)
        received = group_mean(received_attention(q, k, attn.scaling), self.unit)[reverse]
        metric = group_mean(k.float(), self.unit, dim=1)[:, reverse].mean(dim=0)
        return received, metric

    def reduce_prompt(self, states: QwenStates, p: Plan, timer: Timer, prompt: Prompt) -> Visual:
        """V2V / VisionZip / HiRED on the merger's output; without one, every token in its place."""
        n = len(states.merged)
        if p.k1 is None:
            record = {"cls_kept": False, "token_patches": [[i] for i in range(n)], "slots": list(range(n))}
            return Visual.of(states.merged, [record], [n])
        started = timer.start()
        scores, metric = self.scores(states)
        if p.method == "hired":
            m = slot_merge(states.merged, metric, scores, p.k1, 0)
        else:
            m = slot_merge(states.merged, metric, scores, p.k1, p.k2,
                           None if p.method == "visionzip" else p.cluster_width)
        timer.stop("v2v", started)
        record = {**m.record(scores), "token_patches": m.token_patches, "slots": m.slots}
        return Visual.of(m.tokens, [record], [len(m.tokens)])

    # ----------------------------------------------------------------------------- LLM side
    def positions(self, prompt: Prompt, keep: torch.Tensor, visual: Visual, layout: str) -> torch.Tensor:
        """(3, T') M-RoPE ids of the reduced input. "original" (the authors'): every row keeps its
        id in the full prompt, a kept visual token its slot's; "contiguous": 0..T'-1 on all three
        axes (an option: a renumbered image has no grid left)."""
        rows = torch.nonzero(keep).flatten()
        if layout == "contiguous":
            return torch.arange(len(rows), device=keep.device).expand(3, -1)
        ids = prompt.input_ids[0].to(keep.device)
        is_image = ids == prompt.route.token_id
        first = torch.argmax(is_image.int())
        slots = torch.tensor(visual.frames[0]["slots"], device=keep.device)
        rows[is_image[rows]] = first + slots
        return prompt.rope_positions.to(keep.device)[:, rows]

    def grid_of(self, prompt: Prompt) -> list[int]:
        return list(prompt.grids[0])

    def vision_flops(self, prompt: Prompt) -> float:
        """Every block counted as full attention over the image's patches (the windowed ones cost less)."""
        vc = self.model.config.vision_config
        return vc.depth * F.layer_flops(prompt.slots[0] * self.unit, vc.hidden_size, vc.intermediate_size)
