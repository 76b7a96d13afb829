"""Batched greedy answers: several questions through one left-padded prefill and one decoding loop.

The prefill is the engine's ``decoder.run`` on B sequences, each making its own V2V and T2V
decisions (its own CLS ranking, clusters, salient rows and top-k). A stage keeps the same number
of visual tokens in every sequence, so sequences are grouped by how many visual tokens enter the
LLM and over how many frames (under one method and budget: by frame count), and a group stays
rectangular.

Shorter prompts are padded on the left, so every sequence's last row is its last prompt token and
each generated token lands in the same column. An explicit mask hides the pad rows from every real
row; a pad row attends to itself only, so no softmax is empty. Position ids are each sequence's
own, the ones batch 1 gives it. A group without padding runs exactly as ``engine.answer`` does
(SDPA's causal path, no mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache

from . import decoder
from .budget import Plan, ReductionConfig, average
from .device import Timer


@dataclass
class Sequence:
    """One prompt as the LLM receives it (``engine.llm_inputs``), before batching."""

    embeds: torch.Tensor  # (1, T, d)
    visual_rows: torch.Tensor  # rows of the visual tokens
    salient: list[int]  # rows of the salient text tokens, the last one included
    positions: torch.Tensor  # (T,) position ids
    frames: list[dict]  # the V2V records of its frames
    n_frames: int


def sequence(engine, prompt, p: Plan, timer: Timer,
             states: tuple[torch.Tensor, ...] | None = None) -> Sequence:
    """``prompt`` reduced by ``p`` (``engine.encode``, on the tower's ``states`` when given), as
    the LLM receives it."""
    visual = engine.encode(prompt, p, timer, states)
    embeds, visual_rows, salient = engine.llm_inputs(prompt, visual)
    return Sequence(embeds, visual_rows, salient, engine.positions(prompt, visual, p.positions), visual.frames,
                    len(prompt.pixel_values))


def tower_states(engine, prompts) -> list[tuple[torch.Tensor, ...]]:
    """Each prompt's vision-tower states (``engine.vision_states``) from one tower pass per route."""
    states: list = [None] * len(prompts)
    for route in {id(p.route): p.route for p in prompts}.values():
        members = [i for i, p in enumerate(prompts) if p.route is route]
        with torch.inference_mode():
            hidden = engine.vision_states(torch.cat([prompts[i].pixel_values for i in members]), route.tower)
        start = 0
        for i in members:
            n = len(prompts[i].pixel_values)
            states[i] = tuple(h[start:start + n] for h in hidden)
            start += n
    return states


def pad_mask(pads: torch.Tensor, n_queries: int, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, k) additive mask for the last ``n_queries`` of ``n_keys`` rows: causal, and the
    first ``pads[b]`` keys of sequence b hidden from every row but their own."""
    keys = torch.arange(n_keys, device=pads.device)
    queries = keys[n_keys - n_queries:]
    blocked = (keys[None, :] > queries[:, None])[None] | (
        (keys[None, None, :] < pads[:, None, None]) & (keys[None, None, :] != queries[None, :, None]))
    return torch.zeros(blocked.shape, dtype=dtype, device=pads.device).masked_fill(
        blocked, torch.finfo(dtype).min)[:, None]


def left_padded(engine, group: list[Sequence]) -> tuple[torch.Tensor, decoder.Rows]:
    """The group's embeddings (B, T, d), padded on the left, and their ``decoder.Rows``."""
    n = max(s.embeds.shape[1] for s in group)
    dev = engine.device
    index = torch.arange(n, device=dev)
    h = torch.zeros(len(group), n, group[0].embeds.shape[-1], dtype=group[0].embeds.dtype, device=dev)
    pads = torch.tensor([n - s.embeds.shape[1] for s in group], device=dev)
    visual, salient = (torch.zeros(len(group), n, dtype=torch.bool, device=dev) for _ in range(2))
    pos = torch.zeros(len(group), n, dtype=torch.long, device=dev)
    for b, s in enumerate(group):
        start = int(pads[b])
        h[b, start:] = s.embeds[0]
        visual[b, start + s.visual_rows] = True
        salient[b, start + torch.tensor(s.salient, device=dev, dtype=torch.long)] = True
        pos[b, start:] = s.positions.to(dev)
    real = index[None] >= pads[:, None]
    last_visual = (index[None] * visual).amax(1, keepdim=True)
    queries = {"salient": salient, "text": index[None] > last_visual, "last": (index == n - 1).expand(len(group), -1),
               "all": real}
    return h, decoder.Rows.build(visual, pos, queries, pads)


def step(engine, tokens: torch.Tensor, positions: list[list[int]], cache: DynamicCache,
         pads: torch.Tensor) -> torch.Tensor:
    """Logits (B, vocab) after one generated token per sequence, decoded at ``positions[i][b]``
    in layer i (each layer continues from its own renumbered length, as ``engine.step``)."""
    h = engine.lm.embed_tokens(tokens[:, None])
    padded = bool(pads.any())
    for i, layer in enumerate(engine.lm.layers):
        pos = torch.tensor(positions[i], device=engine.device)[:, None]
        mask = pad_mask(pads, 1, cache.get_seq_length(i) + 1, h.dtype) if padded else None
        h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  position_embeddings=engine.lm.rotary_emb(h, pos))
    return engine.lm_head(engine.lm.norm(h[:, -1]))


def generate(engine, group: list[Sequence], p: Plan, max_new_tokens: int) -> list[dict]:
    """Greedy answers of one group: a left-padded prefill through ``decoder.run`` on a KV cache,
    then one decoding step per token for every sequence until each has met EOS or the limit."""
    h, rows = left_padded(engine, group)
    pads = rows.pads
    mask = (lambda n: pad_mask(pads, n, n, h.dtype)) if bool(pads.any()) else engine.attention_mask
    out = decoder.run(engine.lm, h, rows, p, engine.apply_rope, n_frames=group[0].n_frames,
                      cache=DynamicCache(config=engine.lm.config), mask=mask)
    logits = engine.lm_head(engine.lm.norm(out.hidden[:, -1]))
    generated: list[list[int]] = [[] for _ in group]
    done = [False] * len(group)
    for count in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for b, token in enumerate(tokens.tolist()):
            if not done[b]:
                done[b] = token in engine.eos_ids
                if not done[b]:
                    generated[b].append(token)
        if all(done) or count == max_new_tokens - 1:
            break
        positions = [[n + count for n in layer] for layer in out.next_positions]
        logits = step(engine, tokens, positions, out.cache, pads)
    return [{
        "answer": engine.tokenizer.decode(ids, skip_special_tokens=True).strip(),
        "generated_ids": ids,
        "frames": s.frames,
        "t2v": [{"layer": layer, "kept": kept[b]} for layer, kept in sorted(out.kept.items())],
        "visual_tokens_per_layer": out.counts,
        "avg_visual_tokens": round(average(out.counts), 2),
    } for b, (s, ids) in enumerate(zip(group, generated))]


@torch.inference_mode()
def answer_batch(engine, items: list[tuple[list[Image.Image], str]], reduction: ReductionConfig | None = None,
                 max_new_tokens: int = 16, hidden: list[tuple[torch.Tensor, ...]] | None = None,
                 texts: list[str] | None = None) -> list[dict]:
    """Greedy answers to ``items`` ((frames, question) pairs) under one reduction, batched.

    Per item, a record with the trace's decision fields (SPEC §4): ``answer``, ``generated_ids``,
    ``frames`` (V2V records), ``t2v`` (stage layer and kept ids), ``visual_tokens_per_layer``,
    ``avg_visual_tokens``, ``warnings``. ``hidden``: the items' tower states (``tower_states``), so
    several reductions can share one tower pass. ``texts``: prompts the caller built, one per item
    (``engine.prepare``'s ``text``)."""
    if not engine.backbone.batches:
        raise NotImplementedError(f"batched answers are not supported on {engine.backbone.kind} checkpoints "
                                  "(each image has its own grid and plan): use batch size 1")
    reduction = reduction or ReductionConfig()
    p = engine.plan(reduction)
    prompts = [engine.prepare(list(frames), question, reduction.salient_words, text)
               for (frames, question), text in zip(items, texts or [None] * len(items))]
    hidden = hidden or tower_states(engine, prompts)
    timer = Timer(engine.device)
    sequences = [sequence(engine, prompt, p, timer, states) for prompt, states in zip(prompts, hidden)]
    results: list = [None] * len(items)
    for shape in sorted({(len(s.visual_rows), s.n_frames) for s in sequences}):
        members = [i for i, s in enumerate(sequences) if (len(s.visual_rows), s.n_frames) == shape]
        for i, record in zip(members, generate(engine, [sequences[i] for i in members], p, max_new_tokens)):
            s = sequences[i]
            warning = engine.context_warning(prompts[i], [f["n_tokens"] for f in s.frames], s.positions,
                                             max_new_tokens, p)
            results[i] = {**record, "warnings": [warning] if warning else []}
    return results
