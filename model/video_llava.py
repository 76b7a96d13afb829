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

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoTokenizer, VideoLlavaImageProcessor

# Video-LLaVA's conversation format (the prompt its model card uses).
PROMPT = "USER: {placeholder}\n{question} ASSISTANT:"


@dataclass(frozen=True)
class Route:
    """Which tower reads the frames and which placeholder token stands for its output."""

    tower: nn.Module
    token_id: int
    cls_kept: bool  # the LLM sees each frame's CLS token ahead of its patch tokens


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
