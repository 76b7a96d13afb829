"""LLaVA-1.5 checkpoints (``LlavaForConditionalGeneration``): a CLIP tower, a projector, a Llama decoder.

What is LLaVA's own: the prompt (the processor's chat template, or LLaVA-1.5's conversation when a
checkpoint has none), the tower pass up to the feature layer (``vision_feature_layer``, -2), the
CLS row of that layer's attention that V2V, VisionZip and HiRED rank by, the merge per frame
(``v2v``), the projector, one square patch grid, and 1-D position ids. Several frames enter as a
multi-image prompt through the one tower. Everything else (the decoder loop, decoding, the trace)
is the engine's and knows none of this.
"""

from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from .. import flops as F
from ..budget import Plan, ReductionConfig, plan
from ..device import Timer
from ..prompt import Prompt, Route, view_box
from ..v2v import cls_attention, duet_merge, hired_select, visionzip_merge
from . import Visual


class Llava:
    """The LLaVA family's parts, named as transformers 5 names them (``model.model.*``)."""

    kind = "llava"
    video_llava = False
    takes_video = True  # frames enter as a multi-image prompt
    batches = True  # ``model/batch.py`` can group its prompts
    kept_short_side_px = None  # the inputs' default (336 px): its processor reads no more

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        inner, cfg = model.model, model.config
        self.image_route = self.video_route = self.routes(inner, cfg)
        self.vision = self.image_route.tower
        self.projector = inner.multi_modal_projector
        self.lm = inner.language_model
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

    def routes(self, inner, cfg) -> Route:
        """LLaVA: frames are a multi-image prompt through the one tower."""
        return Route(inner.vision_tower, cfg.image_token_id, cls_kept=False)

    @classmethod
    def load(cls, source: str, config, device: torch.device, dtype: torch.dtype) -> "Llava":
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device).eval(), AutoProcessor.from_pretrained(source, backend="pil"))

    # ----------------------------------------------------------------------------- inputs
    def prompt_text(self, question: str, n_frames: int) -> str:
        """The processor's chat template on one user turn of the images and the question."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(n_frames)] + [{"type": "text", "text": question}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
        return "USER: " + "<image>\n" * n_frames + question + " ASSISTANT:"

    def inputs(self, rgb: list, text: str) -> dict:
        """What ``engine.prepare`` puts in the ``Prompt`` beside the question's own fields."""
        route = self.video_route if len(rgb) > 1 else self.image_route
        out = self.processor(images=rgb, text=text, return_tensors="pt")
        return dict(input_ids=out["input_ids"], pixel_values=out["pixel_values"], route=route,
                    slots=[self.n_patches + route.cls_kept] * len(rgb), grids=[list(self.grid)] * len(rgb),
                    view_boxes=[view_box(self.processor.image_processor, f.size) for f in rgb])

    def plan(self, reduction: ReductionConfig, n_layers: int, prompt: Prompt | None = None) -> Plan:
        """``budget.plan`` on the checkpoint's fixed patch count (the same for every image)."""
        return plan(reduction, n_layers, self.n_patches)

    # ----------------------------------------------------------------------------- vision
    def tower(self, prompt: Prompt) -> tuple[torch.Tensor, ...]:
        return self.vision_states(prompt.pixel_values, prompt.route.tower)

    def reduce_prompt(self, states, p: Plan, timer: Timer, prompt: Prompt) -> Visual:
        return self.reduce(states, p, timer, prompt.route)

    def vision_states(self, pixel_values: torch.Tensor, tower=None,
                      patches: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Hidden states of the vision layers up to the feature layer (index 0 = embeddings).

        For CLIP towers the loop stops at the feature layer: LLaVA-1.5 reads layer -2, so the
        stock forward would compute a last layer nobody uses. Other towers run stock.
        ``patches`` (F, w*w), for patch-aligned windows cut from whole images: the grid index each
        window patch came from, whose position embedding it gets (CLS keeps its own), so a window
        is encoded as its patches are within the whole image (the trainer's tower stage).
        """
        first = next(self.model.parameters())
        pixels = pixel_values.to(first.device, first.dtype)
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
        projected = self.projector(torch.cat(merged, dim=0))
        timer.stop("vision", started)
        return Visual.of(projected, records, [len(m) for m in merged])

    # ----------------------------------------------------------------------------- LLM side
    def positions(self, prompt: Prompt, keep: torch.Tensor, visual: Visual, layout: str) -> torch.Tensor:
        """1-D position ids of the reduced input (``keep``: the full prompt's rows it holds).
        "contiguous" (DUET's and VisionZip's code: the LLM simply gets a shorter sequence):
        0..T'-1; "original": every token keeps its position in the full-length prompt."""
        if layout == "original":
            return torch.nonzero(keep).flatten()
        return torch.arange(int(keep.sum()), device=keep.device)

    def grid_of(self, prompt: Prompt) -> list[int]:
        return list(self.grid)

    def vision_flops(self, prompt: Prompt) -> float:
        vc = self.model.config.vision_config
        return F.vision_flops(len(prompt.slots), self.n_patches + 1, self.feature_index, vc.hidden_size,
                              vc.intermediate_size)

    def preset(self, method: str, video: bool) -> dict:
        """Reduction settings a run takes when it names no budget or split (``cli``): none here."""
        return {}
