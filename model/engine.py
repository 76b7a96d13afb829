"""DUET engine: any supported Hugging Face vision-language checkpoint, unmodified transformers, SDPA.

One run = prepare the prompt -> vision tower -> (V2V merge) -> projector -> a layer loop over the
stock decoder layers that drops visual tokens at stage layers -> greedy decoding on a KV cache
whose layers hold only the survivors. Scores are computed from a layer's own q/k for the few rows
that need them, so the model never switches to eager attention. After each reduction the
position ids are renumbered 0..T'-1, as DUET's and PyramidDrop's LLaVA code do, or kept (FastV,
and DUET on Qwen2.5-VL); ``ReductionConfig.positions`` picks either, and each decoder layer
decodes on from the length of its own cache. Every decision lands in a JSON-able trace (SPEC §4);
nothing else in the product reads model internals.

What differs per backbone (loading, the prompt, the tower and its score, the merge's order, the
position ids, the patch grid) is its adapter's (``model/backbones``); this module knows none.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, DynamicCache

from . import decoder, trace
from .backbones import Visual, adapter_class
from .budget import Plan, ReductionConfig
from .device import Timer, pick_device, pick_dtype
from .inputs import check_question
from .prompt import Prompt, salient_positions
from .schedules import SCHEDULE_FILE, read_schedules

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "duet-llava-tiny"


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
    """A loaded checkpoint (LLaVA, Video-LLaVA or Qwen2.5-VL) plus the DUET / baseline reduction
    machinery. The backbone's own parts and helpers (``vision``, ``projector``, ``grid``,
    ``n_patches``, ``vision_states``, ``reduce``, ...) are read through from its adapter."""

    def __init__(self, backbone, name: str, fitprune_schedules: dict[int, tuple[int, ...]] | None = None,
                 training: dict | None = None):
        self.backbone, self.name = backbone, name
        self.model, self.processor = backbone.model, backbone.processor
        # the checkpoint's training.json when it has one (models this project trains: what they
        # were trained on, by which recipe, how they scored)
        self.training = training
        # budget -> FitPrune deletions per layer, fitted for this model (``fitprune.py``)
        self.fitprune_schedules = fitprune_schedules or {}
        self.tokenizer = self.processor.tokenizer
        first = next(self.model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.lm = backbone.lm
        self.lm_head = self.model.lm_head
        self.image_token_id = backbone.image_route.token_id  # the placeholder a single image expands
        self.n_layers = self.lm.config.num_hidden_layers
        # RoPE helper of the decoder family in use (Llama, Mistral, Qwen2, ...), never a copy of our own.
        self.apply_rope = sys.modules[type(self.lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.sdpa = self.lm.config._attn_implementation == "sdpa"

    def __getattr__(self, name: str):
        if name == "backbone":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.backbone, name)

    @classmethod
    def load(cls, model_id: str | Path | None = None, device: str = "auto", dtype: torch.dtype | None = None):
        """Load a checkpoint (local folder or hub id) of any backbone in ``model/backbones`` with SDPA
        attention and a PIL processor."""
        source = str(model_id or DEFAULT_MODEL)
        if model_id is None and not DEFAULT_MODEL.exists():
            raise FileNotFoundError(f"the shipped checkpoint is missing at {DEFAULT_MODEL}; pass --model")
        dev = pick_device(device)
        config = AutoConfig.from_pretrained(source)
        backbone = adapter_class(config.model_type).load(source, config, dev, dtype or pick_dtype(dev))
        local = Path(source).exists()
        schedules = read_schedules(Path(source) / SCHEDULE_FILE) if local else {}
        record = Path(source) / "training.json"
        training = json.loads(record.read_text()) if local and record.exists() else None
        return cls(backbone, Path(source).name if local else source, schedules, training)

    def plan(self, reduction: ReductionConfig, prompt: Prompt | None = None) -> Plan:
        """The backbone's plan for ``reduction`` (on Qwen2.5-VL: for ``prompt``'s image), with the
        FitPrune schedule fitted for this model when there is one."""
        fitted = self.fitprune_schedules.get(int(reduction.budget))
        if reduction.method == "fitprune" and reduction.fitprune_deletions is None and fitted is not None:
            reduction = replace(reduction, fitprune_deletions=fitted)
        return self.backbone.plan(reduction, self.n_layers, prompt)

    # ----------------------------------------------------------------------------- inputs
    def prompt_text(self, question: str, n_frames: int) -> str:
        """The prompt stock transformers builds for ``question`` about ``n_frames`` images (the
        backbone's chat template on one user turn), the question's text placed as it is."""
        return self.backbone.prompt_text(question, n_frames)

    def prepare(self, frames: list[Image.Image], question: str, salient_words=None, text: str | None = None) -> Prompt:
        """The prompt for ``question`` about ``frames``: checked (``inputs.check_question``, the
        same checks the app runs) and placed in ``prompt_text``. ``text``: a prompt the caller
        built and checked itself (the lmms plugin: as lmms-eval's ``llava_hf`` builds it from a
        task's text); ``question`` is then the part of it that the salient rule reads."""
        if text is None:
            question = check_question(question, self.tokenizer)
            text = self.prompt_text(question, len(frames))
        parts = self.backbone.inputs([f.convert("RGB") for f in frames], text)
        input_ids = parts["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError("the engine runs one prompt at a time (batch size 1)")
        salient, rule, words = salient_positions(self.tokenizer, parts["route"].token_id, text, question,
                                                 input_ids[0], salient_words)
        return Prompt(salient=salient, salient_rule=rule, salient_words=words, question=question, **parts)

    # ----------------------------------------------------------------------------- vision
    def encode(self, prompt: Prompt, p: Plan, timer: Timer, hidden=None) -> Visual:
        """The tower (unless its states ``hidden`` are given) -> optional V2V merge per frame ->
        projector, as the backbone runs them."""
        if hidden is None:
            started = timer.start()
            hidden = self.backbone.tower(prompt)
            timer.stop("vision", started)
        visual = self.backbone.reduce_prompt(hidden, p, timer, prompt)
        for record, box in zip(visual.frames, prompt.view_boxes):
            record["view_box"] = box
        return visual

    # ----------------------------------------------------------------------------- LLM
    def _kept(self, prompt: Prompt, visual: Visual) -> torch.Tensor:
        """Which rows of the full-length prompt the reduced sequence keeps: all text, and the first
        n_f visual slots of each frame f (n_f = its number of reduced tokens)."""
        ids = prompt.input_ids[0].to(self.device)
        is_image = ids == prompt.route.token_id
        run_index = torch.cumsum(is_image.long(), 0) - 1  # index of an image token among all image tokens
        slots = torch.tensor(prompt.slots, device=self.device)
        ends = torch.cumsum(slots, 0)
        frame_of = torch.searchsorted(ends, run_index.clamp(min=0), right=True).clamp(max=len(ends) - 1)
        within = run_index - (ends - slots)[frame_of]
        limit = torch.tensor(visual.tokens_per_frame, device=self.device)[frame_of]
        return ~is_image | (within < limit)

    def positions(self, prompt: Prompt, visual: Visual, layout: str = "contiguous") -> torch.Tensor:
        """Position ids of the reduced LLM input, (T',) or (3, T') for M-RoPE, as the backbone
        lays them out: "contiguous" renumbers, "original" keeps the full-length prompt's."""
        return self.backbone.positions(prompt, self._kept(prompt, visual), visual, layout)

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
        per_frame = prompt.slots[0]
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
        rows = decoder.Rows.build(visual[None], pos.unsqueeze(-2), {k: v[None] for k, v in queries.items()})
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
        timer = Timer(self.device)
        started_total = timer.start()
        prompt = self.prepare(frames, question, reduction.salient_words, text)
        p = self.plan(reduction, prompt)
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
                grown_pos = torch.cat([positions, positions[..., -1:] + torch.arange(1, len(generated) + 1,
                                                                                    device=positions.device)], -1)
                logits = self.prefill(grown, visual_rows, salient, p, use_cache=False, force=first.kept,
                                      record=False, n_frames=n_frames, positions=grown_pos).logits
            token = int(logits.argmax())
            steps += 1
        return generated, steps
