"""Training batches from synthetic scenes: processor inputs, answer-only labels, per-patch labels,
and the windows the tower stage trains on.

Conversations go through the stock processor and chat template ("USER: <image>\\n{question}
ASSISTANT: {answer}</s>"), right-padded; the labels are the answer tokens (answer word + </s>).
"""

from __future__ import annotations

import numpy as np
import torch

from ..prompt import salient_positions
from . import scenes


def conversation(question: str, answer: str | None = None, n_images: int = 1) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    turns = [{"role": "user", "content": content}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def encode(processor, samples: list[scenes.Sample], min_coverage: float = 0.3) -> dict:
    """Inputs of the full conversations plus:
    ``labels`` (B, T): the answer tokens, -100 elsewhere; ``salient``: per sample, the salient
    token positions of its prompt (the engine's rule); one (B, P) tensor of patch class ids per
    name in ``scenes.PATCH_TARGETS`` (``scenes.patch_labels``, from the exact object masks)."""
    tok = processor.tokenizer
    full = [processor.apply_chat_template(conversation(s.question, s.answer)) for s in samples]
    prompts = [processor.apply_chat_template(conversation(s.question), add_generation_prompt=True) for s in samples]
    batch = processor(images=[s.image for s in samples], text=full, padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    lengths = batch["attention_mask"].sum(1).tolist()
    image_token = tok.convert_tokens_to_ids("<image>")
    batch["salient"] = []
    for row, (text, prompt, s) in enumerate(zip(full, prompts, samples)):
        ids, prompt_ids = tok(text)["input_ids"], tok(prompt)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"the prompt does not tokenize as a prefix of the conversation: {text!r}")
        end = lengths[row]
        start = end - (len(ids) - len(prompt_ids))  # the image expands inside the prompt, not in the answer
        labels[row, start:end] = batch["input_ids"][row, start:end]
        batch["salient"].append(salient_positions(tok, image_token, prompt, s.question, batch["input_ids"][row, :start])[0])
    batch["labels"] = labels
    targets = [scenes.patch_labels(s.objects, min_coverage) for s in samples]
    for name in scenes.PATCH_TARGETS:
        batch[name] = torch.from_numpy(np.stack([t[name].reshape(-1) for t in targets]))
    return batch


def windows(batch: dict, samples: list[scenes.Sample], size: int, rng: np.random.Generator):
    """Four patch-aligned windows of ``size`` x ``size`` patches per scene, each around one of its
    objects: (pixels (4B, 3, w, w), grid index of each window patch (4B, size²), per-patch targets
    cut from the scene's). A window holds ~10x fewer tokens than its scene and most of them on an
    object, so the tower learns shapes from many more objects per second."""
    side, patch = scenes.IMAGE_SIZE // scenes.PATCH_SIZE, scenes.PATCH_SIZE
    pixels, indices, targets = [], [], {name: [] for name in scenes.PATCH_TARGETS}
    offsets = torch.arange(size)
    for row, sample in enumerate(samples):
        for _ in range(4):
            obj = sample.objects[rng.integers(len(sample.objects))]
            r, c = int(obj.centre[1]) // patch, int(obj.centre[0]) // patch
            r0 = int(np.clip(r - rng.integers(1, size - 1), 0, side - size))
            c0 = int(np.clip(c - rng.integers(1, size - 1), 0, side - size))
            pixels.append(batch["pixel_values"][row, :, r0 * patch:(r0 + size) * patch, c0 * patch:(c0 + size) * patch])
            grid_rows, grid_cols = torch.meshgrid(offsets + r0, offsets + c0, indexing="ij")
            indices.append((grid_rows * side + grid_cols).flatten())
            for name, values in targets.items():
                values.append(batch[name][row].view(side, side)[r0:r0 + size, c0:c0 + size].reshape(-1))
    return torch.stack(pixels), torch.stack(indices), {k: torch.stack(v) for k, v in targets.items()}
