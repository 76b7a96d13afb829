"""DUET-LLaVA engine: any Hugging Face LLaVA checkpoint, unmodified transformers, SDPA attention.

One run = prepare the prompt -> vision tower -> (V2V merge) -> projector -> a layer loop over the
stock decoder layers that drops visual tokens at stage layers -> greedy decoding on a KV cache
whose layers hold only the survivors. Scores are computed from a layer's own q/k for the few rows
that need them, so the model never switches to eager attention. After each reduction the
position ids are renumbered 0..T'-1, as DUET's and PyramidDrop's code do (FastV keeps the
survivors' ids; ``ReductionConfig.positions`` picks either), and each decoder layer decodes on
from the length of its own cache. Every decision lands in a JSON-able trace (SPEC §4); nothing
else in the product reads model internals.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    DynamicCache,
    LlavaForConditionalGeneration,
    VideoLlavaForConditionalGeneration,
)

from . import flops as F
from .budget import Plan, ReductionConfig, average, plan
from .schedules import SCHEDULE_FILE, read_schedules
from .salient import salient_spans
from .t2v import attention_probs, fitprune_parts, keep_top, tokens_overlapping
from .v2v import cls_attention, duet_merge, hired_select, visionzip_merge
from .video_llava import Route, VideoLlavaInputs

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "duet-llava-tiny"


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


@dataclass
class Prompt:
    input_ids: torch.Tensor  # (1, T) as the processor expands it: P (+ CLS) visual tokens per frame
    pixel_values: torch.Tensor  # (F, 3, H, W)
    salient: list[int]  # positions in input_ids of the salient text tokens (incl. the last)
    salient_rule: str  # which rule chose them: "spacy", "builtin", "given" (or "last-only", see salient_positions)
    question: str
    view_boxes: list[list[float]]  # per frame: the region of the original image the model sees
    route: Route


@dataclass
class Visual:
    features: torch.Tensor  # (N, d_text) projected visual tokens, frames concatenated
    frames: list[dict]  # per-frame trace records
    tokens_per_frame: list[int]


@dataclass
class Prefill:
    logits: torch.Tensor  # (vocab,) at the last position
    cache: DynamicCache | None
    stages: list[dict]
    counts: list[int]  # visual tokens seen by each layer
    tokens_per_layer: list[int]  # all tokens seen by each layer
    kept: dict[int, list[int]]  # stage layer -> surviving visual token ids
    next_positions: list[int]  # per layer: the position id the first generated token takes there


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
                      words=None) -> tuple[list[int], str]:
    """(token positions in the processor's expanded prompt ``input_ids`` of the question's salient
    words (``salient.salient_spans``) plus the last prompt token, the rule that chose them).
    Offsets come from tokenizing ``text`` with a single image token per image; if that does not
    reproduce the processor's ids, only the last token is used (rule "last-only")."""
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
        return [last], "last-only"
    words_found, rule = salient_spans(question, words)
    spans = [(start + a, start + b) for a, b, _ in words_found]
    chosen = {expanded_pos[i] for i in tokens_overlapping(offsets, spans)}
    return sorted(chosen | {last}), rule


class DuetLlava:
    """A loaded LLaVA (or Video-LLaVA) checkpoint plus the DUET / baseline reduction machinery."""

    def __init__(self, model: LlavaForConditionalGeneration | VideoLlavaForConditionalGeneration, processor,
                 name: str, fitprune_schedules: dict[int, tuple[int, ...]] | None = None):
        self.model, self.processor, self.name = model, processor, name
        # budget -> FitPrune deletions per layer, fitted for this model (``fitprune.py``)
        self.fitprune_schedules = fitprune_schedules or {}
        self.tokenizer = processor.tokenizer
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        inner, cfg = model.model, model.config
        self.video_llava = hasattr(inner, "video_tower")
        if self.video_llava:
            self.image_route = Route(inner.image_tower, cfg.image_token_id, cls_kept=False)
            self.video_route = Route(inner.video_tower, cfg.video_token_id, cls_kept=True)
        else:  # LLaVA: frames are a multi-image prompt through the one tower
            self.image_route = self.video_route = Route(inner.vision_tower, cfg.image_token_id, cls_kept=False)
        self.vision = self.image_route.tower
        self.projector = inner.multi_modal_projector
        self.lm = inner.language_model
        self.lm_head = model.lm_head
        self.image_token_id = cfg.image_token_id
        if not isinstance(cfg.vision_feature_layer, int):
            raise NotImplementedError("multi-layer vision features are not supported by the engine")
        if cfg.vision_feature_select_strategy != "default":
            raise NotImplementedError("only the 'default' feature strategy (CLS dropped) is supported")
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)
        self.n_patches = side * side
        n_hidden = vc.num_hidden_layers + 1  # embeddings + every layer
        self.feature_index = cfg.vision_feature_layer % n_hidden
        if self.feature_index == 0:
            raise ValueError("vision_feature_layer 0 (embeddings) has no attention to score patches with")
        self.n_layers = self.lm.config.num_hidden_layers
        # RoPE helper of the decoder family in use (Llama, Mistral, ...), never a copy of our own.
        self._apply_rope = sys.modules[type(self.lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.sdpa = self.lm.config._attn_implementation == "sdpa"

    @classmethod
    def load(cls, model_id: str | Path | None = None, device: str = "auto", dtype: torch.dtype | None = None):
        """Load a LLaVA or Video-LLaVA checkpoint (local folder or hub id) with SDPA attention and a
        PIL processor."""
        source = str(model_id or DEFAULT_MODEL)
        if model_id is None and not DEFAULT_MODEL.exists():
            raise FileNotFoundError(f"the shipped checkpoint is missing at {DEFAULT_MODEL}; pass --model")
        dev = pick_device(device)
        config = AutoConfig.from_pretrained(source)
        video = config.model_type == "video_llava"
        model_class = VideoLlavaForConditionalGeneration if video else LlavaForConditionalGeneration
        model = model_class.from_pretrained(
            source, dtype=dtype or pick_dtype(dev), attn_implementation="sdpa"
        ).to(dev).eval()
        if video:
            processor = VideoLlavaInputs.from_pretrained(source, config)
        else:
            processor = AutoProcessor.from_pretrained(source, backend="pil")
        local = Path(source).exists()
        schedules = read_schedules(Path(source) / SCHEDULE_FILE) if local else {}
        return cls(model, processor, Path(source).name if local else source, schedules)

    def plan(self, reduction: ReductionConfig) -> Plan:
        """``budget.plan`` for this model, with the FitPrune schedule fitted for it when there is one."""
        fitted = self.fitprune_schedules.get(int(reduction.budget))
        if reduction.method == "fitprune" and reduction.fitprune_deletions is None and fitted is not None:
            reduction = replace(reduction, fitprune_deletions=fitted)
        return plan(reduction, self.n_layers, self.n_patches)

    # ----------------------------------------------------------------------------- inputs
    def prepare(self, frames: list[Image.Image], question: str, salient_words=None) -> Prompt:
        question = " ".join(question.split())
        if not question:
            raise ValueError("the question is empty")
        route = self.video_route if len(frames) > 1 else self.image_route
        content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": question}]
        conversation = [{"role": "user", "content": content}]
        if self.video_llava:
            text = self.processor.prompt(question, len(frames))
        elif getattr(self.processor, "chat_template", None):
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:
            text = "USER: " + "<image>\n" * len(frames) + question + " ASSISTANT:"
        rgb = [f.convert("RGB") for f in frames]
        inputs = self.processor(images=rgb, text=text, return_tensors="pt")
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError("the engine runs one prompt at a time (batch size 1)")
        salient, rule = salient_positions(self.tokenizer, route.token_id, text, question, input_ids[0], salient_words)
        return Prompt(
            input_ids=input_ids,
            pixel_values=inputs["pixel_values"],
            salient=salient,
            salient_rule=rule,
            question=question,
            view_boxes=[self._view_box(f.size) for f in rgb],
            route=route,
        )

    def _view_box(self, size: tuple[int, int]) -> list[float]:
        """The part of the original image (x0, y0, x1, y1 in its pixels) that fills the model's
        square input, following the processor's pad / shortest-edge resize / centre crop."""
        ip = self.processor.image_processor
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

    # ----------------------------------------------------------------------------- vision
    def encode(self, prompt: Prompt, p: Plan, timer: Timer, hidden: tuple[torch.Tensor, ...] | None = None) -> Visual:
        """Vision tower (unless its ``hidden`` states are given) -> optional V2V merge per frame -> projector."""
        if hidden is None:
            started = timer.start()
            hidden = self.vision_states(prompt.pixel_values, prompt.route.tower)
            timer.stop("vision", started)
        visual = self.reduce(hidden, p, timer, prompt.route)
        for record, box in zip(visual.frames, prompt.view_boxes):
            record["view_box"] = box
        return visual

    def vision_states(self, pixel_values: torch.Tensor, tower=None) -> tuple[torch.Tensor, ...]:
        """Hidden states of the vision layers up to the feature layer (index 0 = embeddings).

        For CLIP towers the loop stops at the feature layer: LLaVA-1.5 reads layer -2, so the
        stock forward would compute a last layer nobody uses. Other towers run stock.
        """
        pixels = pixel_values.to(self.device, self.dtype)
        tower = tower or self.vision
        if not hasattr(tower, "pre_layrnorm"):
            return tower(pixels, output_hidden_states=True).hidden_states
        h = tower.pre_layrnorm(tower.embeddings(pixels))
        states = [h]
        for layer in tower.encoder.layers[: self.feature_index]:
            h = layer(h, None)
            states.append(h)
        return tuple(states)

    def cls_scores(self, before: torch.Tensor, tower=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (F, H, 1 + P, hd), CLS attention on each patch (F, P)) at the vision layer V2V
        scores with, from that layer's input ``before`` (F, 1 + P, d): what V2V ranks and
        clusters by, and what the trainer's ``--v2v-weight`` supervises."""
        layer = (tower or self.vision).encoder.layers[self.feature_index - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(before)
        n_frames, n_tokens, _ = x.shape
        keys = attn.k_proj(x).view(n_frames, n_tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
        query_cls = attn.q_proj(x[:, 0]).view(n_frames, attn.num_heads, attn.head_dim)
        return keys, torch.stack([cls_attention(query_cls[f], keys[f], attn.scale) for f in range(n_frames)])

    def reduce(self, hidden: tuple[torch.Tensor, ...], p: Plan, timer: Timer, route: Route | None = None) -> Visual:
        """V2V (or VisionZip) merge per frame on the tower's states, then the projector.

        Without a vision-side reduction the frames enter as the checkpoint feeds them: patches only,
        or CLS first on a ``route.cls_kept`` route (Video-LLaVA clips). A merge always keeps CLS as
        its first dominant token (``v2v`` module docstring)."""
        route = route or self.image_route
        features = hidden[self.feature_index]  # (F, 1 + P, d), CLS first
        if p.k1 is None:
            cls = [[]] if route.cls_kept else []
            records = [{"cls_kept": route.cls_kept, "token_patches": cls + [[i] for i in range(self.n_patches)]}
                       for _ in range(len(features))]
            merged = list(features if route.cls_kept else features[:, 1:])
        else:
            started = timer.start()
            merged, records = [], []
            keys, frame_scores = self.cls_scores(hidden[self.feature_index - 1], route.tower)
            for f, scores in enumerate(frame_scores):
                metric = keys[f].mean(dim=0)  # (1 + P, hd): the keys averaged over heads
                if p.method == "visionzip":
                    m = visionzip_merge(features[f], metric, scores, p.k1, p.k2)
                elif p.method == "hired":
                    m = hired_select(features[f], scores, p.k1)
                else:
                    m = duet_merge(features[f], metric, scores, p.k1, p.k2, p.cluster_width)
                merged.append(m.tokens)
                records.append({**m.record(scores), "token_patches": m.token_patches})
            timer.stop("v2v", started)
        started = timer.start()
        counts = [len(m) for m in merged]
        projected = self.projector(torch.cat(merged, dim=0))
        timer.stop("vision", started)
        offset = 0
        for f, (record, n) in enumerate(zip(records, counts)):
            record.update(index=f, token_offset=offset, n_tokens=n)
            offset += n
        return Visual(projected, records, counts)

    # ----------------------------------------------------------------------------- LLM
    def _kept(self, prompt: Prompt, visual: Visual) -> torch.Tensor:
        """Which rows of the full-length prompt the reduced sequence keeps: all text, and the first
        n_f visual slots of each frame f (n_f = its number of reduced tokens)."""
        ids = prompt.input_ids[0].to(self.device)
        per_frame = self.n_patches + prompt.route.cls_kept
        is_image = ids == prompt.route.token_id
        run_index = torch.cumsum(is_image.long(), 0) - 1  # index of an image token among all image tokens
        frame_of = torch.div(run_index, per_frame, rounding_mode="floor")
        within = run_index - frame_of * per_frame
        limit = torch.tensor(visual.tokens_per_frame, device=self.device)[frame_of.clamp(min=0)]
        return ~is_image | (within < limit)

    def positions(self, prompt: Prompt, visual: Visual, layout: str = "contiguous") -> torch.Tensor:
        """Position ids of the reduced LLM input. "contiguous" (DUET's and VisionZip's code: the
        LLM simply gets a shorter sequence): 0..T'-1. "original": every token keeps its position
        in the full-length prompt, so the question sits as far from the start as without reduction."""
        keep = self._kept(prompt, visual)
        if layout == "original":
            return torch.nonzero(keep).flatten()
        return torch.arange(int(keep.sum()), device=self.device)

    def llm_inputs(self, prompt: Prompt, visual: Visual) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Embeddings with each frame's P image tokens replaced by its reduced tokens.

        Returns (embeds (1, T', d), positions of visual tokens in it, salient positions in it).
        """
        ids = prompt.input_ids[0].to(self.device)
        token_id = prompt.route.token_id
        keep = self._kept(prompt, visual)
        new_index = torch.cumsum(keep.long(), 0) - 1
        short_ids = ids[keep]
        embeds = self.lm.embed_tokens(short_ids)[None]
        visual_rows = torch.nonzero(short_ids == token_id).flatten()
        embeds[0, visual_rows] = visual.features.to(embeds.dtype)
        salient = sorted({int(new_index[p]) for p in prompt.salient if keep[p]})
        return embeds, visual_rows, salient

    def _mask(self, n: int) -> torch.Tensor | None:
        """Causal mask for a prefill of n rows; SDPA derives it itself (is_causal)."""
        if self.sdpa:
            return None
        blocked = torch.ones(n, n, dtype=torch.bool, device=self.device).triu(1)
        return torch.zeros(n, n, dtype=self.dtype, device=self.device).masked_fill(
            blocked, torch.finfo(self.dtype).min
        )[None, None]

    def _probs(self, layer, h, rope, pos, query_rows) -> torch.Tensor:
        """(H, Q, T) causal softmax attention of ``query_rows`` over every row at ``layer`` (its own q/k)."""
        attn = layer.self_attn
        x = layer.input_layernorm(h)[0]
        hd = attn.head_dim
        cos, sin = rope
        q = attn.q_proj(x[query_rows]).view(1, len(query_rows), -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, x.shape[0], -1, hd).transpose(1, 2)
        q = self._apply_rope(q, q, cos[:, query_rows], sin[:, query_rows])[0]
        k = self._apply_rope(k, k, cos, sin)[1]
        return attention_probs(q[0], k[0], pos[query_rows], pos, attn.scaling)

    def _scores(self, layer, h, rope, pos, query_rows, visual_rows) -> torch.Tensor:
        """Attention mass that ``query_rows`` pay each visual row at ``layer``, mean over heads and rows."""
        return self._probs(layer, h, rope, pos, query_rows)[..., visual_rows].mean(dim=(0, 1))

    def fitprune_scores(self, layer, h, rope, pos, visual_rows, text_rows) -> tuple[torch.Tensor, dict]:
        """FitPrune's ranking at ``layer`` (``t2v.fitprune_parts`` on the head-max map of every row):
        (self x cross per visual row, {"self": ..., "cross": ...})."""
        every_row = torch.arange(h.shape[1], device=self.device)
        self_weight, cross_weight = fitprune_parts(self._probs(layer, h, rope, pos, every_row).amax(dim=0),
                                                   visual_rows, text_rows)
        return cross_weight * self_weight, {"self": self_weight, "cross": cross_weight}

    def prefill(
        self,
        embeds: torch.Tensor,
        visual_rows: torch.Tensor,
        salient: list[int],
        p: Plan,
        use_cache: bool = True,
        force: dict[int, list[int]] | None = None,
        record: bool = True,
        timer: Timer | None = None,
        n_frames: int = 1,
        positions: torch.Tensor | None = None,
    ) -> Prefill:
        """Run the decoder layers, dropping visual tokens at the plan's stage layers.

        ``salient`` are the rows of the salient text tokens (the last row included). After a drop
        the position ids are renumbered 0..T'-1 (``modeling_llama_pdrop.py`` l.1527-1528) unless
        ``p.positions`` is "original". ``force`` (stage layer -> kept visual ids) replays earlier
        decisions instead of scoring: used to recompute a sequence without cache with exactly the
        same kept tokens. A ``timer`` collects the scoring + selection time under "t2v" (it
        synchronises, so only pass one when measuring).
        """
        if embeds.shape[0] != 1:
            raise ValueError("the engine runs one sequence at a time (batch size 1)")
        lm = self.lm
        h = embeds
        n_rows = h.shape[1]
        pos = torch.arange(n_rows, device=self.device) if positions is None else positions.to(self.device)
        visual_ids = torch.arange(len(visual_rows), device=self.device)
        n_visual = len(visual_rows)
        is_visual = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        is_visual[visual_rows] = True
        is_salient = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        is_salient[torch.tensor(salient, device=self.device, dtype=torch.long)] = True
        after_image = torch.arange(n_rows, device=self.device) > (int(visual_rows.max()) if n_visual else -1)
        stage_at = {s.layer: s for s in p.stages}
        score_at = {s.score_layer: s for s in p.stages if not (force and s.layer in force)}
        cache = DynamicCache(config=lm.config) if use_cache else None
        rope = lm.rotary_emb(h, pos[None])
        pending, stages, counts, totals, kept, next_positions = {}, [], [], [], {}, []

        def rank(s, layer):
            """(scores of the current visual rows, FitPrune's parts or None, query rows) at ``layer``."""
            rows = torch.nonzero(is_visual).flatten()
            if s.query == "fitprune":
                query = torch.nonzero(after_image).flatten()
                return *self.fitprune_scores(layer, h, rope, pos, rows, query), len(query)
            query = torch.nonzero({
                "salient": is_salient,
                "text": after_image,
                "last": torch.arange(h.shape[1], device=self.device) == h.shape[1] - 1,
                "all": torch.ones(h.shape[1], dtype=torch.bool, device=self.device),
            }[s.query]).flatten()
            return self._scores(layer, h, rope, pos, query, rows), None, len(query)

        for index, layer in enumerate(lm.layers):
            started = timer.start() if timer and (index in score_at or index in stage_at) else None
            if index in stage_at:  # drop first: a stage scored at this layer ranks its own input
                s = stage_at[index]
                rows = torch.nonzero(is_visual).flatten()
                if force and index in force:
                    choice = torch.nonzero(torch.isin(visual_ids, torch.tensor(force[index], device=self.device))).flatten()
                    scores, parts, n_query = None, None, None
                else:
                    scores, parts, n_query = rank(s, layer) if s.score_layer == index else pending.pop(index)
                    choice = keep_top(scores, s.keep_of(n_visual, n_frames))
                survivors = ~is_visual
                survivors[rows[choice]] = True
                kept[index] = visual_ids[choice].tolist()
                if record:
                    stages.append({
                        "layer": index,
                        "score_layer": s.score_layer,
                        "query": s.query,
                        "query_rows": n_query,
                        "n_in": len(rows),
                        "ids_in": visual_ids.tolist(),
                        "kept": kept[index],
                        "scores": None if scores is None else scores.tolist(),
                        **({} if parts is None else {k: v.tolist() for k, v in parts.items()}),
                    })
                h, is_visual = h[:, survivors], is_visual[survivors]
                is_salient, after_image = is_salient[survivors], after_image[survivors]
                pos = torch.arange(h.shape[1], device=self.device) if p.positions == "contiguous" else pos[survivors]
                visual_ids = visual_ids[choice]
                rope = lm.rotary_emb(h, pos[None])
            if index in score_at and score_at[index].layer > index:  # ranked here, dropped at a later layer
                pending[score_at[index].layer] = rank(score_at[index], layer)
            if started is not None:
                timer.stop("t2v", started)
            counts.append(int(is_visual.sum()))
            totals.append(h.shape[1])
            next_positions.append(int(pos[-1]) + 1)
            h = layer(
                h,
                attention_mask=self._mask(h.shape[1]),
                position_ids=pos[None],
                past_key_values=cache,
                use_cache=use_cache,
                position_embeddings=rope,
            )
        logits = self.lm_head(lm.norm(h[:, -1]))[0]
        return Prefill(logits, cache, stages, counts, totals, kept, next_positions)

    def step(self, token: int, positions: list[int], cache: DynamicCache) -> torch.Tensor:
        """Logits after one generated ``token``, decoded at ``positions[i]`` in layer i (each layer
        continues from its own renumbered length, as ``modeling_llama_pdrop.py`` l.1266-1275 shifts
        the decoding position ids at every stage layer)."""
        h = self.lm.embed_tokens(torch.tensor([[token]], device=self.device))
        ropes = {}
        for layer, position in zip(self.lm.layers, positions):
            if position not in ropes:
                pos = torch.tensor([[position]], device=self.device)
                ropes[position] = (pos, self.lm.rotary_emb(h, pos))
            pos, rope = ropes[position]
            h = layer(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=rope)
        return self.lm_head(self.lm.norm(h[:, -1]))[0]

    # ----------------------------------------------------------------------------- public API
    @torch.inference_mode()
    def answer(
        self,
        frames: list[Image.Image] | Image.Image,
        question: str,
        reduction: ReductionConfig | None = None,
        max_new_tokens: int = 16,
        use_cache: bool = True,
        record: bool = True,
        hidden: tuple[torch.Tensor, ...] | None = None,
    ) -> dict:
        """Answer ``question`` about one image (or several frames) and return the SPEC §4 trace.

        ``hidden``: the tower's states for these frames (``vision_states`` of the prepared
        prompt's pixels), so an evaluation can run the tower once for many configurations; the
        trace's vision time then excludes the tower."""
        frames = [frames] if isinstance(frames, Image.Image) else list(frames)
        if not frames:
            raise ValueError("at least one image is required")
        reduction = reduction or ReductionConfig()
        p = self.plan(reduction)
        timer = Timer(self.device)
        started_total = timer.start()
        prompt = self.prepare(frames, question, reduction.salient_words)
        visual = self.encode(prompt, p, timer, hidden)
        embeds, visual_rows, salient = self.llm_inputs(prompt, visual)
        positions = self.positions(prompt, visual, p.positions)
        started = timer.start()
        n_frames = len(frames)
        first = self.prefill(embeds, visual_rows, salient, p, use_cache=use_cache, record=record, n_frames=n_frames,
                             positions=positions)
        token = int(first.logits.argmax())
        timer.stop("prefill", started)

        generated, steps = [], 0
        started = timer.start()
        while token not in self.eos_ids and len(generated) < max_new_tokens:
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            if use_cache:
                logits = self.step(token, [n + len(generated) - 1 for n in first.next_positions], first.cache)
            else:
                grown = torch.cat([embeds, self.lm.embed_tokens(torch.tensor([generated], device=self.device))], 1)
                grown_pos = torch.cat([positions, positions[-1] + torch.arange(1, len(generated) + 1,
                                                                              device=positions.device)])
                logits = self.prefill(grown, visual_rows, salient, p, use_cache=False, force=first.kept,
                                      record=False, n_frames=n_frames, positions=grown_pos).logits
            token = int(logits.argmax())
            steps += 1
        timer.stop("decode", started)
        timer.stop("total", started_total)

        ms = timer.ms
        n_visual_full = (self.n_patches + prompt.route.cls_kept) * len(frames)
        text_len = embeds.shape[1] - len(visual_rows)
        lm_cfg, vc = self.lm.config, self.model.config.vision_config
        return {
            "model": self.name,
            "method": p.method,
            "budget": p.budget,
            "question": prompt.question,
            "answer": self.tokenizer.decode(generated, skip_special_tokens=True).strip(),
            "generated_tokens": len(generated),
            "generated_ids": generated,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "grid": list(self.grid),
            "frames": visual.frames,
            "salient": [
                {"position": i, "token": self.tokenizer.convert_ids_to_tokens(int(prompt.input_ids[0, j]))}
                for i, j in zip(salient, sorted(prompt.salient))
            ],
            "salient_rule": prompt.salient_rule,
            "plan": {**{k: v for k, v in asdict(p).items() if k != "stages"},
                     "stages": [asdict(s) for s in p.stages]},
            "positions": p.positions,  # position ids after a reduction: "contiguous" (renumbered) or "original"
            "t2v": first.stages,
            "visual_tokens_per_layer": first.counts,
            "visual_tokens_per_frame_layer": per_frame_counts(visual.frames, first.stages, self.n_layers),
            "avg_visual_tokens": round(average(first.counts), 2),
            "timings_ms": {
                "vision": round(ms.get("vision", 0.0), 3),
                "v2v": round(ms.get("v2v", 0.0), 3),
                "prefill": round(ms["prefill"], 3),
                "decode_per_token": round(ms["decode"] / steps, 3) if steps else 0.0,
                "total": round(ms["total"], 3),
            },
            "flops": {
                "vision": F.vision_flops(len(frames), self.n_patches + 1, self.feature_index,
                                         vc.hidden_size, vc.intermediate_size),
                "llm": F.llm_flops(first.tokens_per_layer, lm_cfg.hidden_size, lm_cfg.intermediate_size),
                "llm_full": F.llm_flops([text_len + n_visual_full] * self.n_layers,
                                        lm_cfg.hidden_size, lm_cfg.intermediate_size),
            },
        }
