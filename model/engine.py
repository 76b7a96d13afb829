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

import json
import sys
from dataclasses import dataclass, replace
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

from . import decoder, trace
from .budget import Plan, ReductionConfig, plan
from .device import Timer, pick_device, pick_dtype
from .inputs import check_question
from .prompt import Prompt, salient_positions, view_box
from .schedules import SCHEDULE_FILE, read_schedules
from .v2v import cls_attention, duet_merge, hired_select, visionzip_merge
from .video_llava import Route, VideoLlavaInputs

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "duet-llava-tiny"


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


class DuetLlava:
    """A loaded LLaVA (or Video-LLaVA) checkpoint plus the DUET / baseline reduction machinery."""

    def __init__(self, model: LlavaForConditionalGeneration | VideoLlavaForConditionalGeneration, processor,
                 name: str, fitprune_schedules: dict[int, tuple[int, ...]] | None = None,
                 training: dict | None = None):
        self.model, self.processor, self.name = model, processor, name
        # the checkpoint's training.json when it has one (models this project trains: what they
        # were trained on, by which recipe, how they scored)
        self.training = training
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
        self.apply_rope = sys.modules[type(self.lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
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
        record = Path(source) / "training.json"
        training = json.loads(record.read_text()) if local and record.exists() else None
        return cls(model, processor, Path(source).name if local else source, schedules, training)

    def plan(self, reduction: ReductionConfig) -> Plan:
        """``budget.plan`` for this model, with the FitPrune schedule fitted for it when there is one."""
        fitted = self.fitprune_schedules.get(int(reduction.budget))
        if reduction.method == "fitprune" and reduction.fitprune_deletions is None and fitted is not None:
            reduction = replace(reduction, fitprune_deletions=fitted)
        return plan(reduction, self.n_layers, self.n_patches)

    # ----------------------------------------------------------------------------- inputs
    def prompt_text(self, question: str, n_frames: int) -> str:
        """The prompt stock transformers builds for ``question`` about ``n_frames`` images: the
        processor's chat template on one user turn of the images and the question (Video-LLaVA:
        its model card's format), the question's text placed as it is."""
        if self.video_llava:
            return self.processor.prompt(question, n_frames)
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(n_frames)] + [{"type": "text", "text": question}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
        return "USER: " + "<image>\n" * n_frames + question + " ASSISTANT:"

    def prepare(self, frames: list[Image.Image], question: str, salient_words=None, text: str | None = None) -> Prompt:
        """The prompt for ``question`` about ``frames``: checked (``inputs.check_question``, the
        same checks the app runs) and placed in ``prompt_text``. ``text``: a prompt the caller
        built and checked itself (the lmms plugin: as lmms-eval's ``llava_hf`` builds it from a
        task's text); ``question`` is then the part of it that the salient rule reads."""
        if text is None:
            question = check_question(question, self.tokenizer)
            text = self.prompt_text(question, len(frames))
        route = self.video_route if len(frames) > 1 else self.image_route
        rgb = [f.convert("RGB") for f in frames]
        inputs = self.processor(images=rgb, text=text, return_tensors="pt")
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError("the engine runs one prompt at a time (batch size 1)")
        salient, rule, words = salient_positions(self.tokenizer, route.token_id, text, question, input_ids[0],
                                                 salient_words)
        return Prompt(
            input_ids=input_ids,
            pixel_values=inputs["pixel_values"],
            salient=salient,
            salient_rule=rule,
            salient_words=words,
            question=question,
            view_boxes=[view_box(self.processor.image_processor, f.size) for f in rgb],
            route=route,
        )

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

    def vision_states(self, pixel_values: torch.Tensor, tower=None,
                      patches: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Hidden states of the vision layers up to the feature layer (index 0 = embeddings).

        For CLIP towers the loop stops at the feature layer: LLaVA-1.5 reads layer -2, so the
        stock forward would compute a last layer nobody uses. Other towers run stock.
        ``patches`` (F, w*w), for patch-aligned windows cut from whole images: the grid index each
        window patch came from, whose position embedding it gets (CLS keeps its own), so a window
        is encoded as its patches are within the whole image (the trainer's tower stage).
        """
        pixels = pixel_values.to(self.device, self.dtype)
        tower = tower or self.vision
        if not hasattr(tower, "pre_layrnorm"):
            return tower(pixels, output_hidden_states=True).hidden_states
        if patches is None:
            h = tower.embeddings(pixels)
        else:
            emb = tower.embeddings
            table = emb.position_embedding.weight
            x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2) + table[1 + patches]
            h = torch.cat([(emb.class_embedding + table[0]).expand(len(x), 1, -1), x], 1)
        h = tower.pre_layrnorm(h)
        states = [h]
        for layer in tower.encoder.layers[: self.feature_index]:
            h = layer(h, None)
            states.append(h)
        return tuple(states)

    def cls_scores(self, before: torch.Tensor, tower=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (F, H, 1 + P, hd), CLS attention on each patch (F, P)) at the vision layer V2V
        scores with, from that layer's input ``before`` (F, 1 + P, d): what V2V ranks and
        clusters by."""
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

    def context_warning(self, prompt: Prompt, tokens_per_frame: list[int], positions: torch.Tensor,
                        max_new_tokens: int, p: Plan) -> str | None:
        """What to tell the user when this run's position ids go past the decoder's
        ``max_position_embeddings`` (LLaVA-1.5: 4096; 8 frames with all 576 tokens each need
        4608 for the image tokens alone), else None. Such a run still runs, as stock
        ``generate`` would run it, but its answer comes from positions the model was never
        trained on; the message names the limit and how many frames of this run would fit.
        Counted at the first layer, where the most positions are in use: the prompt's last
        position id + 1, plus every generated token but the last."""
        limit = self.lm.config.max_position_embeddings
        needed = int(positions.max()) + max_new_tokens
        if needed <= limit:
            return None
        n_frames = len(tokens_per_frame)
        ids = prompt.input_ids[0]
        image_rows = torch.nonzero(ids == prompt.route.token_id).flatten()
        per_frame = self.n_patches + prompt.route.cls_kept
        # position ids one frame spans: its visual tokens (all of them, where positions are the
        # full prompt's) and the text between it and the next frame ("<image>\n" in a LLaVA prompt)
        gap = int(image_rows[per_frame] - image_rows[per_frame - 1] - 1) if n_frames > 1 else 0
        span = (per_frame if p.positions == "original" else tokens_per_frame[0]) + gap
        fits = n_frames - -(-(needed - limit) // span)
        advice = (f"at most {fits} frame{'s' * (fits != 1)} fit with {p.method}" if fits >= 1 else
                  "not even one image fits: ask a shorter question or generate fewer tokens")
        return (f"{p.method}: this run needs {needed} positions ({len(positions)} prompt tokens, {n_frames} "
                f"frame{'s' * (n_frames != 1)}, + {max_new_tokens} new tokens), more than the model's {limit} "
                f"(max_position_embeddings); positions past {limit} were never trained, so its answer may mean "
                f"little. {advice[0].upper() + advice[1:]}.")

    def attention_mask(self, n: int) -> torch.Tensor | None:
        """Causal mask for a prefill of n rows; SDPA derives it itself (is_causal)."""
        if self.sdpa:
            return None
        blocked = torch.ones(n, n, dtype=torch.bool, device=self.device).triu(1)
        return torch.zeros(n, n, dtype=self.dtype, device=self.device).masked_fill(
            blocked, torch.finfo(self.dtype).min
        )[None, None]

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
        on_layer=None,
    ) -> Prefill:
        """One sequence through ``decoder.run`` with a KV cache, dropping visual tokens at the
        plan's stage layers (position ids renumbered after a drop, ``modeling_llama_pdrop.py``
        l.1527-1528, unless ``p.positions`` is "original").

        ``salient`` are the rows of the salient text tokens (the last row included); "text" ranks
        with every row after the image. ``force`` (stage layer -> kept visual ids) replays earlier
        decisions: the uncached recomputation of a cached run. A ``timer`` collects the scoring +
        selection time under "t2v" (it synchronises, so only pass one when measuring); ``on_layer``
        goes to ``decoder.run`` (the benchmark's per-layer timers).
        """
        if embeds.shape[0] != 1:
            raise ValueError("the engine runs one sequence at a time (batch size 1)")
        n_rows = embeds.shape[1]
        index = torch.arange(n_rows, device=self.device)
        visual = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        visual[visual_rows] = True
        salient_mask = torch.zeros_like(visual)
        salient_mask[torch.tensor(salient, device=self.device, dtype=torch.long)] = True
        last_visual = int(visual_rows.max()) if len(visual_rows) else -1
        queries = {"salient": salient_mask, "text": index > last_visual, "last": index == n_rows - 1,
                   "all": torch.ones_like(visual)}
        pos = index if positions is None else positions.to(self.device)
        rows = decoder.Rows.build(visual[None], pos[None], {k: v[None] for k, v in queries.items()})
        out = decoder.run(self.lm, embeds, rows, p, self.apply_rope, n_frames=n_frames,
                          cache=DynamicCache(config=self.lm.config) if use_cache else None,
                          force=None if force is None else {k: [v] for k, v in force.items()},
                          record=record, mask=self.attention_mask, timer=timer, on_layer=on_layer)
        logits = self.lm_head(self.lm.norm(out.hidden[:, -1]))[0]
        return Prefill(logits, out.cache, out.stages, out.counts, out.totals,
                       {k: v[0] for k, v in out.kept.items()}, [n[0] for n in out.next_positions])

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
        text: str | None = None,
    ) -> dict:
        """Answer ``question`` about one image (or several frames) and return the SPEC §4 trace.

        ``hidden``: the tower's states for these frames (``vision_states`` of the prepared
        prompt's pixels), so an evaluation can run the tower once for many configurations; the
        trace's vision time then excludes the tower. ``text``: a prompt the caller built
        (``prepare``). A run past the decoder's context window runs, with a warning in the
        trace's ``warnings`` (``context_warning``)."""
        frames = [frames] if isinstance(frames, Image.Image) else list(frames)
        if not frames:
            raise ValueError("at least one image is required")
        reduction = reduction or ReductionConfig()
        p = self.plan(reduction)
        timer = Timer(self.device)
        started_total = timer.start()
        prompt = self.prepare(frames, question, reduction.salient_words, text)
        visual = self.encode(prompt, p, timer, hidden)
        embeds, visual_rows, salient = self.llm_inputs(prompt, visual)
        positions = self.positions(prompt, visual, p.positions)
        warning = self.context_warning(prompt, visual.tokens_per_frame, positions, max_new_tokens, p)
        started = timer.start()
        first = self.prefill(embeds, visual_rows, salient, p, use_cache=use_cache, record=record,
                             n_frames=len(frames), positions=positions)
        timer.stop("prefill", started)
        started = timer.start()
        decoded = self.decode(first, embeds, visual_rows, salient, p, positions, max_new_tokens, use_cache,
                                len(frames))
        timer.stop("decode", started)
        timer.stop("total", started_total)
        return trace.build(self, prompt, visual, p, first, salient, decoded, embeds.shape[1] - len(visual_rows),
                           timer.ms, [warning] if warning else [])

    def decode(self, first: Prefill, embeds, visual_rows, salient, p: Plan, positions, max_new_tokens: int,
               use_cache: bool, n_frames: int) -> tuple[list[int], int]:
        """(greedy tokens after ``first`` until EOS or ``max_new_tokens``, decoding steps run): on
        the pruned KV cache (``step``), or without cache by recomputing the grown sequence with
        the same kept tokens."""
        generated, token, steps = [], int(first.logits.argmax()), 0
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
        return generated, steps
