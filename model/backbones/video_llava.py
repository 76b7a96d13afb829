"""Video-LLaVA checkpoints (``VideoLlavaForConditionalGeneration``, e.g. LanguageBind/Video-LLaVA-7B-hf).

Video-LLaVA has two CLIP towers with one shared config: ``image_tower`` reads a single image
(``<image>``, CLS dropped as in LLaVA-1.5) and ``video_tower`` reads a clip (``<video>``; every
frame keeps its CLS token, so a clip is F x (P + 1) tokens). Its stock processor needs
torchvision for videos, which this project does not install; the frames go through the
checkpoint's own image processor instead (the same CLIP resize, centre crop and normalisation its
video processor applies) and the placeholder is expanded the way ``VideoLlavaProcessor`` does it.
The engine then treats the clip like LLaVA's multi-image prompt, with each frame's CLS token
carried along in front of its (reduced) patch tokens.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

from ..prompt import Route
from .llava import Llava

# Video-LLaVA's conversation format (the prompt its model card uses).
PROMPT = "USER: {placeholder}\n{question} ASSISTANT:"


class VideoLlava(Llava):
    """LLaVA's adapter with Video-LLaVA's two towers, prompt and processor."""

    kind = "video_llava"
    video_llava = True

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.video_route = Route(model.model.video_tower, model.config.video_token_id, cls_kept=True)

    def routes(self, inner, cfg) -> Route:
        return Route(inner.image_tower, cfg.image_token_id, cls_kept=False)

    @classmethod
    def load(cls, source: str, config, device: torch.device, dtype: torch.dtype) -> "VideoLlava":
        model = VideoLlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device).eval(), VideoLlavaInputs.from_pretrained(source, config))

    def prompt_text(self, question: str, n_frames: int) -> str:
        """Its model card's format (``VideoLlavaInputs.prompt``)."""
        return self.processor.prompt(question, n_frames)


class VideoLlavaInputs:
    """Processor for Video-LLaVA checkpoints without torchvision: tokenizer + image processor."""

    def __init__(self, tokenizer, image_processor, patch_size: int):
        self.tokenizer, self.image_processor, self.patch_size = tokenizer, image_processor, patch_size

    @classmethod
    def from_pretrained(cls, source: str, config) -> "VideoLlavaInputs":
        return cls(AutoTokenizer.from_pretrained(source), VideoLlavaImageProcessor.from_pretrained(source),
                   config.vision_config.patch_size)

    def prompt(self, question: str, n_frames: int) -> str:
        """One image: the image tower's ``<image>``; several frames: one ``<video>`` for the clip."""
        return PROMPT.format(placeholder="<video>" if n_frames > 1 else "<image>", question=question)

    def __call__(self, images, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        pixel_values = self.image_processor(images=images, return_tensors="pt",
                                            return_legacy_image_output=False)["pixel_values"]
        side = pixel_values.shape[-1] // self.patch_size
        if "<video>" in text:
            text = text.replace("<video>", "<video>" * ((side * side + 1) * len(images)))
        else:
            text = text.replace("<image>", "<image>" * (side * side), 1)
        return {"input_ids": self.tokenizer(text, return_tensors="pt")["input_ids"], "pixel_values": pixel_values}
