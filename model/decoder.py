"""The one loop over the stock decoder layers that drops visual tokens: inference and training.

A batch of B rows enters as hidden states (B, T, d) plus ``Rows``: which rows are visual, their
position ids, the rows each kind of query ranks with, and where each row came from. At a plan's
stage layer every sequence keeps its own top-ranked visual tokens (``select``), the same number in
every sequence, so the batch stays rectangular; the gather carries gradients for everything that
survives. Ranking reads a layer's own q/k for the few rows that need them (``t2v.layer_scores``),
so the layers keep running on SDPA. Right-padded rows need no padding mask under causal
attention: real tokens never attend to the pads after them. Left-padded rows (batched generation,
``model/batch.py``) stay at the front of their sequence through every drop (``Rows.pads``); the
caller's mask hides them, and renumbered position ids start at 0 on each sequence's first real row.

No value goes back to the host between the first and the last layer: every count the loop needs
is known before it (the plan fixes how many visual tokens each stage keeps; query and pad rows are
never dropped, so their numbers are counted once, in ``Rows.build``), rows are located by a stable
sort of a mask whose number of True entries is known (``where``) instead of ``nonzero``, and what
the loop reports (kept ids, stage records, next positions) stays on the device until it ends. So a
GPU prefill queues every layer's kernels without waiting on one.

``run`` is what the engine's prefill (B = 1, with a KV cache), batched generation (B rows, left
padding, a KV cache) and the trainer (B rows, grads, no cache) call; ``on_layer(index, h, rows)``
is called before each layer and once after the last (index = number of layers), for training
losses and per-layer timing outside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from transformers import DynamicCache

from .budget import Plan, Stage
from .t2v import fitprune_scores, keep_top, layer_scores

# CPU BLAS (the MKL sgemm in torch's CPU wheel) multiplies 4-15 rows by a 4096 x 11008 weight in up
# to 65 ms and 16 rows in 37 ms (BENCHMARKS.md §6): below this many rows a layer runs on the rows
# padded with copies of the last one, which no real row sees (causal attention), and their cache
# entries are removed at once. DUET's last layers hold only the prompt's text.
MIN_CPU_ROWS = 16


@dataclass
class Rows:
    """Per row of a (B, T) batch, gathered with the hidden states at every drop."""

    visual: torch.Tensor  # (B, T) bool: a visual token
    pos: torch.Tensor  # (B, T) long: position ids; (3, B, T) for M-RoPE (temporal, height, width: Qwen2.5-VL)
    queries: dict[str, torch.Tensor]  # kind ("salient", "text", "last", "all") -> (B, T) bool: the rows that rank under it
    origin: torch.Tensor  # (B, T) long: index of the row in the batch as it entered the loop
    visual_ids: torch.Tensor  # (B, V) long: id (0..V0-1 in input order) of each visual token still alive
    pads: torch.Tensor  # (B,) long: left-padding rows at the start of each sequence
    n_pads: tuple[int, ...]  # the same, on the host
    n_text: dict[str, tuple[int, ...]]  # kind -> per sequence, its non-visual query rows (never dropped)
    with_visual: frozenset[str]  # the kinds whose query rows include every visual token ("all")

    @classmethod
    def build(cls, visual: torch.Tensor, pos: torch.Tensor, queries: dict[str, torch.Tensor],
              pads: torch.Tensor | None = None) -> "Rows":
        """The rows of a batch entering the loop; the host-side counts are read here, once."""
        batch, n = visual.shape
        counts = visual.sum(1).tolist()
        if len(set(counts)) > 1:
            raise ValueError("every sequence of a batch must hold the same number of visual tokens")
        ids = torch.arange(counts[0], device=visual.device).expand(batch, -1)
        origin = torch.arange(n, device=visual.device).expand(batch, -1)
        pads = torch.zeros(batch, dtype=torch.long, device=visual.device) if pads is None else pads
        with_visual = set()
        for kind, mask in queries.items():
            on_visual = (mask & visual).sum(1).tolist()
            if any(0 < k < counts[0] for k in on_visual):
                raise ValueError(f"query rows {kind!r} hold some visual tokens but not all")
            if any(on_visual):
                with_visual.add(kind)
        n_text = {kind: tuple((mask & ~visual).sum(1).tolist()) for kind, mask in queries.items()}
        return cls(visual, pos, queries, origin, ids, pads, tuple(pads.tolist()), n_text, frozenset(with_visual))

    def query_count(self, kind: str, b: int) -> int:
        return self.n_text[kind][b] + (self.visual_ids.shape[1] if kind in self.with_visual else 0)

    def take(self, index: torch.Tensor, chosen: torch.Tensor, layout: str) -> "Rows":
        """The rows at ``index`` (B, T'), the visual ones being ``chosen`` (B, V') of the alive ones."""
        if layout == "contiguous":
            pos = (torch.arange(index.shape[1], device=index.device) - self.pads[:, None]).clamp(min=0)
            pos = pos.expand(*self.pos.shape[:-2], -1, -1)  # every M-RoPE axis renumbered alike
        else:
            pos = self.pos.gather(-1, index.expand(*self.pos.shape[:-2], -1, -1))
        return replace(self, visual=self.visual.gather(1, index), pos=pos,
                       queries={k: v.gather(1, index) for k, v in self.queries.items()},
                       origin=self.origin.gather(1, index), visual_ids=self.visual_ids.gather(1, chosen))


def where(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` True entries of a 1-D ``mask``: ``nonzero`` for a mask
    whose number of True entries is known, so the device never reports it back to the host."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]


@dataclass
class Output:
    hidden: torch.Tensor  # (B, T', d) after the last layer, before the final norm
    rows: Rows  # what survived to the last layer
    cache: DynamicCache | None
    stages: list[dict] = field(default_factory=list)  # sequence 0's trace records (SPEC §4)
    kept: dict[int, list[list[int]]] = field(default_factory=dict)  # stage layer -> per sequence, surviving ids
    counts: list[int] = field(default_factory=list)  # visual tokens each layer sees
    totals: list[int] = field(default_factory=list)  # all tokens each layer sees
    next_positions: list[list[int]] = field(default_factory=list)  # per layer, per sequence: the next position id


def select(scores: torch.Tensor, stage: Stage, n_visual: int, n_frames: int) -> torch.Tensor:
    """T2V's choice: indices (ascending) of the ``stage.keep_of`` best-scored visual tokens."""
    return keep_top(scores, stage.keep_of(n_visual, n_frames))


@dataclass
class Ranking:
    scores: list[torch.Tensor]  # per sequence, one score per alive visual token
    parts: dict[str, torch.Tensor] | None  # sequence 0: FitPrune's self and cross weights
    query_rows: int  # sequence 0: how many rows ranked


def last_position(pos: torch.Tensor) -> torch.Tensor:
    """(B,) the position id of each sequence's last row; with M-RoPE that row is text, whose three
    ids are equal."""
    return (pos if pos.dim() == 2 else pos[0])[:, -1]


def rank(layer, h: torch.Tensor, rope, rows: Rows, stage: Stage, apply_rope) -> Ranking:
    """Each sequence's scores of its alive visual tokens at ``layer`` (input ``h``), by the stage's
    query rows; FitPrune ranks by self x cross over every row (``t2v.fitprune_scores``). A
    left-padded sequence is scored on its real rows alone, as it is scored unbatched: its pad rows
    carry position 0, so as keys they would join every query row's softmax. The causal mask
    follows the rows' order in the sequence (``origin``: the order position ids give, also where
    M-RoPE ids repeat); a stage with ``causal`` off lets every query row see every key (DUET's
    Qwen2.5-VL code)."""
    scores, parts, n_query = [], None, 0
    kind = "text" if stage.query == "fitprune" else stage.query
    n_visual = rows.visual_ids.shape[1]
    with torch.no_grad():
        for b in range(h.shape[0]):
            start = rows.n_pads[b]
            visual = where(rows.visual[b, start:], n_visual)
            query = where(rows.queries[kind][b, start:], rows.query_count(kind, b))
            row_rope = (rope[0][b:b + 1, start:], rope[1][b:b + 1, start:])
            real = h[b, start:]
            order = rows.origin[b, start:] if stage.causal else None
            if stage.query == "fitprune":
                score, found = fitprune_scores(layer, real, row_rope, order, visual, query, apply_rope)
                parts = parts or found
            else:
                score = layer_scores(layer, real, row_rope, order, query, visual, apply_rope)
            scores.append(score)
            n_query = n_query or len(query)
    return Ranking(scores, parts, n_query)


def drop(h: torch.Tensor, rows: Rows, choices: list[torch.Tensor], layout: str) -> tuple[torch.Tensor, Rows]:
    """Keep every non-visual row and, per sequence, the visual tokens at ``choices[b]``."""
    index, n_rows, n_visual = [], rows.visual.shape[1], rows.visual_ids.shape[1]
    for b, choice in enumerate(choices):
        visual = where(rows.visual[b], n_visual)
        survivors = ~rows.visual[b]
        survivors[visual[choice]] = True
        index.append(where(survivors, n_rows - n_visual + len(choice)))
    index = torch.stack(index)
    return h.gather(1, index[..., None].expand(-1, -1, h.shape[-1])), rows.take(index, torch.stack(choices), layout)


def forced(rows: Rows, ids: list[list[int]]) -> list[torch.Tensor]:
    """Per sequence, the indices among its alive visual tokens of the ids an earlier run kept."""
    return [where(torch.isin(rows.visual_ids[b], torch.tensor(keep, device=rows.visual_ids.device)), len(keep))
            for b, keep in enumerate(ids)]


def stage_record(index: int, stage: Stage, rows: Rows, ranking: Ranking | None, kept: torch.Tensor) -> dict:
    """A stage's trace record, its tensors still on the device (``on_host`` after the loop)."""
    return {
        "layer": index,
        "score_layer": stage.score_layer,
        "query": stage.query,
        "query_rows": None if ranking is None else ranking.query_rows,
        "n_in": rows.visual_ids.shape[1],
        "ids_in": rows.visual_ids[0],
        "kept": kept,
        "scores": None if ranking is None else ranking.scores[0],
        **({} if ranking is None or ranking.parts is None else ranking.parts),
    }


def on_host(value):
    """A record's tensors as lists: read back once, after the loop."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def needs_ranking(stage: Stage, n_alive: int, n_visual: int, n_frames: int) -> bool:
    """A stage that keeps none or all of the alive visual tokens decides nothing by ranking
    (DUET's last stage keeps 0 %): it is not scored, and its trace record has no scores."""
    return 0 < stage.keep_of(n_visual, n_frames) < n_alive


def run_layer(lm, index: int, h: torch.Tensor, rows: Rows, rope, mask, cache: DynamicCache | None) -> torch.Tensor:
    """Decoder layer ``index`` on ``h``; on CPU, fewer than ``MIN_CPU_ROWS`` rows run padded."""
    layer, n = lm.layers[index], h.shape[1]
    pad = MIN_CPU_ROWS - n if h.device.type == "cpu" else 0
    pos = rows.pos
    if pad > 0:
        h = torch.cat([h, h[:, -1:].expand(-1, pad, -1)], 1)
        pos = torch.cat([pos, pos[..., -1:] + torch.arange(1, pad + 1, device=pos.device)], -1)
        rope = lm.rotary_emb(h, pos)
    # M-RoPE ids live in ``rope`` only: stock Qwen2.5-VL hands its layers no position ids either
    out = layer(h, attention_mask=mask(h.shape[1]), position_ids=pos if pos.dim() == 2 else None,
                past_key_values=cache, use_cache=cache is not None, position_embeddings=rope)
    if pad > 0:
        if cache is not None:
            cache.layers[index].crop(-pad)
        out = out[:, :n]
    return out


def run(lm, h: torch.Tensor, rows: Rows, p: Plan, apply_rope, *, n_frames: int = 1,
        cache: DynamicCache | None = None, force: dict[int, list[list[int]]] | None = None, record: bool = False,
        mask: Callable[[int], torch.Tensor | None] = lambda n: None, timer=None,
        on_layer: Callable[[int, torch.Tensor, Rows], None] | None = None,
        choose: Callable[[int, Ranking], list[torch.Tensor]] | None = None) -> Output:
    """Run ``lm``'s decoder layers on ``h``, dropping visual tokens at ``p``'s stage layers.

    A stage layer drops first, then a stage scored there for a later layer ranks its input.
    ``force`` (stage layer -> per sequence, kept visual ids) replays earlier decisions instead of
    scoring: the uncached recomputation of a cached run. ``mask(n)`` is the attention mask for n
    rows (None under SDPA). A ``timer`` collects ranking and dropping under "t2v".
    ``choose(layer, ranking)`` decides, per sequence, which alive visual tokens (indices) survive
    a stage instead of its top-k; every stage is then ranked, whatever its count, and a stage
    after the last layer is ranked and chosen too, with nothing left to drop from (FitPrune's
    schedule fitting, ``fitprune.simulate``)."""
    n_visual = rows.visual_ids.shape[1]

    def ranked(stage: Stage, n_alive: int) -> bool:
        return choose is not None or needs_ranking(stage, n_alive, n_visual, n_frames)

    stage_at = {s.layer: s for s in p.stages}
    score_at = {s.score_layer: s for s in p.stages if not (force and s.layer in force)}
    rope = lm.rotary_emb(h, rows.pos)
    out = Output(h, rows, cache)
    pending: dict[int, Ranking] = {}
    kept: dict[int, list[torch.Tensor]] = {}  # on the device until the loop ends
    next_positions: list[torch.Tensor] = []
    for index, layer in enumerate(lm.layers):
        if on_layer:
            on_layer(index, h, rows)
        started = timer.start() if timer and (index in score_at or index in stage_at) else None
        if index in stage_at:
            stage = stage_at[index]
            n_alive = rows.visual_ids.shape[1]
            if force and index in force:
                ranking, choices = None, forced(rows, force[index])
            elif not ranked(stage, n_alive):
                keep = torch.arange(min(stage.keep_of(n_visual, n_frames), n_alive), device=h.device)
                ranking, choices = None, [keep] * h.shape[0]
            else:
                ranking = rank(layer, h, rope, rows, stage, apply_rope) if stage.score_layer == index else pending.pop(index)
                choices = (choose(index, ranking) if choose else
                           [select(s, stage, n_visual, n_frames) for s in ranking.scores])
            kept[index] = [rows.visual_ids[b, c] for b, c in enumerate(choices)]
            if record:
                out.stages.append(stage_record(index, stage, rows, ranking, kept[index][0]))
            h, rows = drop(h, rows, choices, p.positions)
            rope = lm.rotary_emb(h, rows.pos)
        later = score_at.get(index)
        if later is not None and later.layer > index and ranked(later, rows.visual_ids.shape[1]):
            pending[later.layer] = rank(layer, h, rope, rows, later, apply_rope)
        if started is not None:
            timer.stop("t2v", started)
        out.counts.append(rows.visual_ids.shape[1])
        out.totals.append(h.shape[1])
        next_positions.append(last_position(rows.pos) + 1)
        h = run_layer(lm, index, h, rows, rope, mask, cache)
    if choose and len(lm.layers) in pending:
        choose(len(lm.layers), pending.pop(len(lm.layers)))
    if on_layer:
        on_layer(len(lm.layers), h, rows)
    return replace(out, hidden=h, rows=rows, kept={k: [t.tolist() for t in v] for k, v in kept.items()},
                   stages=[{k: on_host(v) for k, v in record.items()} for record in out.stages],
                   next_positions=torch.stack(next_positions).tolist() if next_positions else [])
