"""CLIP-style contrastive pre-training of the vision tower, as CLIP trains the ViT-L/14-336 that
LLaVA-1.5 uses: the tower's CLS output (after its post-layernorm, the stock ``pooler_output``)
and a caption's embedding from a small text encoder, each projected and normalised, matched by a
symmetric InfoNCE loss with a learned temperature.

The loss reads the CLS *output* only; nothing acts on any attention map. What the CLS token's
attention learns to look at (what V2V, VisionZip and HiRED rank patches by) follows from having
to summarise the scene, as in real CLIP. Besides the in-batch negatives, every image is scored
against its caption's hard negatives (``captions.hard_negatives``), so the summary must bind each
object's colour to its shape, size and place.

The text encoder and the two projections are the lab's (saved with the trainer's state and as
``<run>/<stage>/clip.pt``); the exported LLaVA keeps only the tower, as LLaVA does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import captions

MAX_WORDS = 128


class TextEncoder(nn.Module):
    """Word embeddings + learned positions, a pre-norm bidirectional transformer, the state at the
    end-of-text token, layer-normed and projected: CLIP's text tower in miniature, initialised as
    CLIP initialises its own (word embeddings std 0.02, positions 0.01). With torch's default
    std 1 for the words the positions were 1 % of a token's input, and a caption and its hard
    negatives (the same words, bound differently) started 25x closer together."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4, embed: int = 128):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.positions = nn.Parameter(torch.randn(MAX_WORDS, width) * 0.01)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.project = nn.Linear(width, embed, bias=False)

    def forward(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(N, embed) unnormalised embeddings of right-padded ``ids`` (N, T) whose last real token
        (``real`` (N, T) bool) is the end-of-text token."""
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        h = self.blocks(h, src_key_padding_mask=~real)
        last = real.sum(1) - 1
        return self.project(self.norm(h[torch.arange(len(ids)), last]))


class Clip(nn.Module):
    """The text encoder, the image projection of the tower's pooled CLS output and the temperature."""

    def __init__(self, vocab_size: int, tower_width: int, embed: int = 128):
        super().__init__()
        self.text = TextEncoder(vocab_size, embed=embed)
        self.image_projection = nn.Linear(tower_width, embed, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeddings(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(pooled), dim=-1)

    def text_embeddings(self, tokenizer, texts: list[str]) -> torch.Tensor:
        ids, real = tokenize(tokenizer, texts)
        return F.normalize(self.text(ids.to(self.log_scale.device), real.to(self.log_scale.device)), dim=-1)

    def loss(self, images: torch.Tensor, texts: torch.Tensor, n_images: int) -> tuple[torch.Tensor, dict]:
        """Symmetric InfoNCE. ``images`` (B, e); ``texts`` (B + extra, e) with image b's caption at
        row b and the hard negatives after them: each image picks its caption among every text of
        the batch, each caption its image among the B images."""
        scale = self.log_scale.clamp(max=math.log(100)).exp()
        logits = scale * images @ texts.T
        target = torch.arange(n_images, device=images.device)
        to_text = F.cross_entropy(logits, target)
        to_image = F.cross_entropy(logits[:, :n_images].T, target)
        stats = {"clip_batch_acc": (logits.argmax(1) == target).float().mean().item(), "scale": scale.item()}
        if texts.shape[0] > n_images:  # how far each caption beats the batch's best wrong text
            stats["clip_margin"] = (logits[target, target] - logits[:, n_images:].max(1).values).mean().item()
        return (to_text + to_image) / 2, stats


def tokenize(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded word ids of each text followed by the end-of-text token, and the real-token mask."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    if max(map(len, rows)) > MAX_WORDS:
        raise ValueError(f"a caption is longer than {MAX_WORDS} words")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        real[i, : len(row)] = True
    return ids, real


def batch_texts(samples, rng, negatives: int) -> list[str]:
    """Every sample's caption first, then each sample's hard negatives."""
    positives = [captions.caption(s.objects) for s in samples]
    return positives + [t for s in samples for t in captions.hard_negatives(s.objects, rng, negatives)]


@torch.no_grad()
def retrieval(clip: Clip, tokenizer, pooled: torch.Tensor, samples, rng, candidates: int = 8) -> list[bool]:
    """Zero-shot caption retrieval: for each image, is its true caption the most similar among
    itself and ``candidates - 1`` hard negatives?"""
    images = clip.image_embeddings(pooled)
    hits = []
    for image, s in zip(images, samples):
        texts = [captions.caption(s.objects), *captions.hard_negatives(s.objects, rng, candidates - 1)]
        hits.append(bool((clip.text_embeddings(tokenizer, texts) @ image).argmax() == 0))
    return hits
