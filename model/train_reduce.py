"""Training-time DUET (SPEC §2 Training): the inference reductions, batched and differentiable.

Rows are right-padded conversations with one image each. V2V merges every image to the same
k1 + k2 tokens, so every row shrinks by the same amount; at each stage layer every row keeps the
same number of visual tokens (its own top-ranked, scored without gradient), so the batch stays
rectangular and index gathers carry gradients for everything that survives. The rows that rank
are those DUET's training code uses (``modeling_llama_pdrop.py`` l.1427-1428, salient tokens off
by default): every prompt token after the image that is not an answer token. After each drop the
position ids are renumbered 0..T'-1, as at inference. Right padding needs no padding mask under
causal attention (SDPA's own, or the engine's mask with eager attention): real tokens never
attend to the pad tokens after them.

``query_attention_loss`` supervises what T2V ranks by: the salient rows' attention at the first
stage layer, pushed onto the visual tokens of the objects the question is about (both training
paths use it, on all 576 tokens or on the V2V-merged ones). The same loss on the last prompt
token alone at an earlier layer supervises binding (the trainer's ``--bind-weight``), and on the
last token's layer-0 attention onto the question's object words (colour and shape names) it
supervises reading the question (``--ask-weight``). A supervised attention is a ``Supervision``;
no such layer may come after the first stage layer: up to its input, rows are still the
prompt's positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .budget import Plan
from .engine import DuetLlava, Timer, Visual
from .t2v import keep_top


class Supervision(NamedTuple):
    """One supervised attention: the input of decoder ``layer``, the salient rows (or the last
    prompt row alone), pushed onto the queried objects' visual tokens or the asked words."""

    layer: int
    last_only: bool
    onto: str = "objects"  # "words": the question's colour and shape words; "choices": the answers a
    # position question offers; "named": each colour/shape word's row (not the salient rows) onto the
    # objects that word names ("red": every red object); "absent": on existence questions, all tokens,
    # the first one when nothing matches (absent_marks); "count" and "point": one head's whole
    # distribution (head_attention_loss)
    head: int = 0  # the head "count" and "point" supervise


def query_attention_loss(engine: DuetLlava, layer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                         pos: torch.Tensor, salient: list[torch.Tensor], columns: torch.Tensor,
                         on_query: list[torch.Tensor | None], owner: list[int] | None = None) -> torch.Tensor | None:
    """Mean over rows with a query of -log(share of the T2V score on the query's tokens).

    ``h`` (B, T, d) enters ``layer``; ``salient[b]`` are row b's salient rows; ``columns`` (B, T) the
    tokens the share is taken over (the visual ones, or all of a row's tokens); ``on_query[b]`` (bool,
    one per column of b in order) marks the queried ones, None when the question is about no
    object ("is there ...?" answered no). The score is the engine's (``DuetLlava._scores``: softmax
    attention of the salient rows, mean over rows and heads), so on the visual tokens the loss
    trains exactly the ranking T2V keeps tokens by. None when no row has a query. With ``owner``,
    entry k of ``salient`` and ``on_query`` belongs to sequence ``owner[k]`` (several per sequence)."""
    losses = []
    for k, target in enumerate(on_query):
        if target is None or not target.any():
            continue
        b = k if owner is None else owner[k]
        scored = torch.nonzero(columns[b]).flatten()
        scores = engine._scores(layer, h[b:b + 1], (rope[0][b:b + 1], rope[1][b:b + 1]), pos[b], salient[k],
                                scored)
        share = scores[target].sum() / scores.sum().clamp_min(1e-12)
        losses.append(-torch.log(share.clamp_min(torch.finfo(share.dtype).tiny)))  # keeps a gradient at any share
    return torch.stack(losses).mean() if losses else None


def head_attention_loss(engine: DuetLlava, layer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        pos: torch.Tensor, rows: list[torch.Tensor], present: torch.Tensor,
                        targets: list[torch.Tensor | None], head: int) -> torch.Tensor | None:
    """Mean over sequences with a target of the cross-entropy between ``targets[b]`` (a
    distribution over b's present tokens) and head ``head``'s attention of row ``rows[b]`` at
    ``layer``. None when no sequence has a target. Two targets use it:

    - count: equal mass on the sequence's first token and on the token showing each counted
      object's centroid patch. The head's output then holds the first token's value with weight
      1 / (n + 1), a number the later layers can read n from. Attention spread over whole
      objects, as binding learns it, averages their features into one and says nothing about how
      many there are. With ``--count-spread`` each object's share is spread over the patches it
      covers, in proportion to how much of its mask each holds: equal mass per object still, but
      asked of keys that only need to tell how large an object is, not single out one patch of it.
    - point: all mass on the question's own copy of the answer to a position question ("is the
      red circle on the left or right ?" -> the row of "left"). The query has to match the bound
      object's half to a word, and only the offered pair is there to match: the head copies an
      answer the question itself offers."""
    losses = []
    for b, target in enumerate(targets):
        if target is None:
            continue
        probs = engine._probs(layer, h[b:b + 1], (rope[0][b:b + 1], rope[1][b:b + 1]), pos[b], rows[b])
        log_p = probs[head, 0, torch.nonzero(present[b]).flatten()].clamp_min(torch.finfo(probs.dtype).tiny).log()
        losses.append(-(target * log_p).sum())
    return torch.stack(losses).mean() if losses else None


def row_targets(marked: list[list[int] | None], present: torch.Tensor,
                masses: list[list[float] | None] | None = None) -> list[torch.Tensor | None]:
    """Per sequence, a ``head_attention_loss`` target over its present tokens: equal mass on each
    listed row, or ``masses[b]`` (one per listed row) when given, normalised to sum to 1 (a row
    listed twice, e.g. two centroids merged into one token, gets both masses); None stays None."""
    targets = []
    for b, rows in enumerate(marked):
        if rows is None:
            targets.append(None)
            continue
        weights = (torch.ones(len(rows)) if masses is None or masses[b] is None
                   else torch.tensor(masses[b], dtype=torch.float32)).to(present.device)
        mass = torch.zeros(present.shape[1], device=present.device)
        mass.index_add_(0, torch.tensor(rows, device=present.device), weights)
        targets.append(mass[present[b]] / weights.sum())
    return targets


def counting_targets(rows: list[list[int] | None], present: torch.Tensor,
                     centre_masses: list[list[float] | None] | None) -> list[torch.Tensor | None]:
    """The count head's ``row_targets``: ``rows[b]`` is the first row, then the row of each counted
    patch; with ``centre_masses`` the first row weighs 1 and each patch its mass, else all alike."""
    masses = None if centre_masses is None else [None if m is None else [1.0, *m] for m in centre_masses]
    return row_targets(rows, present, masses)


EARLY_DROP = "early-drop"  # a plan method: a random subset of each image's patch tokens enters the LLM
OBJECT_DROP = "object-drop"  # the same, drawing the patches objects cover first


def random_subset(visual: Visual, keep: int, generator: torch.Generator, first: torch.Tensor | None = None) -> Visual:
    """Per frame, ``keep`` of its tokens drawn uniformly at random from ``generator``, in their
    order: what ranks them is nothing (the trainer's ``--early-drop``). With ``first`` (frames,
    tokens) bool, frame i draws its marked tokens before any other (``--object-drop``: the
    patches objects cover, ground truth rather than any method's score)."""
    features, frames, offset = [], [], 0
    for frame, (record, n) in enumerate(zip(visual.frames, visual.tokens_per_frame)):
        order = torch.randperm(n, generator=generator)
        if first is not None:  # a stable sort on "unmarked" keeps the random order within each group
            order = order[torch.argsort((~first[frame].cpu()[order]).long(), stable=True)]
        chosen = order[:keep].sort().values
        features.append(visual.features[offset + chosen.to(visual.features.device)])
        frames.append({**record, "token_patches": [record["token_patches"][i] for i in chosen.tolist()]})
        offset += n
    return Visual(torch.cat(features), frames, [len(f["token_patches"]) for f in frames])


def marked_rows(rows_per_sequence: list[list[int]] | None, present: torch.Tensor,
                index: torch.Tensor | None = None) -> list[torch.Tensor] | None:
    """Per sequence, bool per present token: is it at one of the given prompt positions. ``index``
    (B, T_prompt) maps prompt positions to rows when the sequence was shortened (V2V)."""
    if rows_per_sequence is None:
        return None
    marks = []
    for b, rows in enumerate(rows_per_sequence):
        at = torch.tensor(rows, dtype=torch.long, device=present.device)
        at = at if index is None else index[b, at]
        marks.append(torch.zeros(present.shape[1], dtype=torch.bool, device=present.device).index_fill_(0, at, True)
                     [present[b]])
    return marks


def absent_marks(absent: list[bool | None], on_query: list[torch.Tensor | None], is_visual: torch.Tensor,
                 present: torch.Tensor) -> list[torch.Tensor | None]:
    """Per sequence, bool per present token: for an existence question answered "no"
    (``absent[b]`` True) the first token, for one answered "yes" the visual tokens showing the
    queried object (``on_query[b]``, one per visual token); None for other questions.

    Why: where the answer is "no", `od3-full` answered "is there a red circle?" wrongly in
    28-32 % of scenes with a red object of another shape but in 5 % of those with a circle of
    another colour: its match is the colour's. Scored over every token, the last prompt row at
    the bind layer has to put its attention on an object only when both words match it, and on
    the first token, where a softmax with nothing to find rests, otherwise: one attention does
    the conjunction."""
    marks = []
    for b, missing in enumerate(absent):
        if missing is None or (not missing and on_query[b] is None):
            marks.append(None)
            continue
        row = torch.zeros(present.shape[1], dtype=torch.bool, device=present.device)
        if missing:
            row[0] = True
        else:
            row[torch.nonzero(is_visual[b]).flatten()[on_query[b]]] = True
        marks.append(row[present[b]])
    return marks


class Marks(NamedTuple):
    """What a batch's supervised attentions are scored against (``supervised_losses``)."""

    salient: list[torch.Tensor]  # salient rows per sequence (the last one is the last prompt row)
    is_visual: torch.Tensor  # (B, T)
    present: torch.Tensor  # (B, T): not padding
    on_query: list[torch.Tensor | None] | None  # per sequence, bool per visual token: shows a queried object
    on_words: list[torch.Tensor] | None  # per sequence, bool per present token: a colour/shape word
    lookups: list[tuple[int, torch.Tensor, torch.Tensor]] | None  # (sequence, word row, bool per visual token)
    on_choices: list[torch.Tensor] | None = None  # per sequence, bool per present token: an offered answer
    counted: list[torch.Tensor | None] | None = None  # per sequence, the count target (row_targets) or None
    pointed: list[torch.Tensor | None] | None = None  # per sequence, the point target (row_targets) or None
    on_absent: list[torch.Tensor | None] | None = None  # per sequence, bool per present token (absent_marks)


def supervised_losses(engine: DuetLlava, index: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      pos: torch.Tensor, supervised: dict[str, Supervision], marks: Marks) -> dict[str, torch.Tensor | None]:
    """{name: query attention loss} of the supervisions at decoder layer ``index``, whose input is ``h``."""
    layer = engine.lm.layers[index]
    losses = {}
    for name, s in supervised.items():
        if s.layer != index:
            continue
        if s.onto == "named":
            losses[name] = query_attention_loss(engine, layer, h, rope, pos, [r.view(1) for _, r, _ in marks.lookups],
                                                marks.is_visual, [t for *_, t in marks.lookups],
                                                [b for b, *_ in marks.lookups])
            continue
        rows = [r[-1:] for r in marks.salient] if s.last_only else marks.salient
        if s.onto in ("count", "point"):
            losses[name] = head_attention_loss(engine, layer, h, rope, pos, rows, marks.present,
                                               marks.counted if s.onto == "count" else marks.pointed, s.head)
            continue
        columns, marked = {"objects": (marks.is_visual, marks.on_query), "words": (marks.present, marks.on_words),
                           "choices": (marks.present, marks.on_choices), "absent": (marks.present, marks.on_absent),
                           }[s.onto]
        losses[name] = query_attention_loss(engine, layer, h, rope, pos, rows, columns, marked)
    return losses


def reduced_loss(engine: DuetLlava, p: Plan, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                 labels: torch.Tensor, salient: list[list[int]], queried: list[set[int]] | None = None,
                 supervised: dict[str, Supervision] | None = None, asked: list[list[int]] | None = None,
                 named: list[list[set[int]]] | None = None, generator: torch.Generator | None = None,
                 offered: list[list[int]] | None = None, centres: list[list[int] | None] | None = None,
                 pointed: list[list[int] | None] | None = None, objects: torch.Tensor | None = None,
                 absent: list[bool | None] | None = None, centre_masses: list[list[float] | None] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
    """(answer cross-entropy, visual tokens entering the LLM (B, k1+k2, d), every patch projected
    (B, P, d) for per-patch supervision, {name: query attention loss or None}) under plan ``p``.

    ``salient[b]`` are row b's salient token positions in ``input_ids`` (engine rule); ``queried[b]``
    the patches of row b's queried objects (empty: none); ``asked[b]`` the positions of row b's
    object words, ``named[b]`` the patches of the objects each of them names, ``offered[b]`` the
    positions of the answers its question offers, ``centres[b]`` the centroid patches of the objects
    a count question counts (or, with ``centre_masses[b]``, every patch they cover, each with its
    share of its object's mass 1) and ``pointed[b]`` the positions of the answer word in a position
    question (None for other questions), ``absent[b]`` whether an existence question's answer is
    "no" (None for other questions); ``supervised`` the attentions to score against
    them (default: none). A stage whose ``query`` is "random"
    keeps a uniformly random choice of each row's visual tokens, drawn from ``generator`` (the
    trainer's ``--late-drop``: no method's ranking); a plan whose method is ``EARLY_DROP`` lets a
    random ``p.budget`` of them enter the LLM (``--early-drop``), and one whose method is
    ``OBJECT_DROP`` draws the patches ``objects`` (B, P) marks first (``--object-drop``).
    """
    supervised = supervised or {}
    first_stage = p.stages[0].layer if p.stages else engine.n_layers
    if any(s.layer > first_stage for s in supervised.values()):
        raise ValueError("supervised attention layers must not come after the first stage layer")
    if any(s.onto == "objects" for s in supervised.values()) and queried is None:
        raise ValueError("supervised attention onto objects needs the queried patches")
    if any(s.onto in ("words", "named") for s in supervised.values()) and asked is None:
        raise ValueError("supervised attention onto or from words needs the asked word positions")
    if any(s.onto == "choices" for s in supervised.values()) and offered is None:
        raise ValueError("supervised attention onto the offered answers needs their positions")
    if any(s.onto == "count" for s in supervised.values()) and centres is None:
        raise ValueError("supervised counting attention needs the counted objects' centroid patches")
    if any(s.onto == "point" for s in supervised.values()) and pointed is None:
        raise ValueError("supervised pointing attention needs the answer word's positions")
    if any(s.onto == "absent" for s in supervised.values()) and (absent is None or queried is None):
        raise ValueError("supervised attention for absent objects needs which answers are no and the queried patches")
    if any(s.onto == "named" for s in supervised.values()) and named is None:
        raise ValueError("supervised attention onto named objects needs their patches")
    if (p.method in (EARLY_DROP, OBJECT_DROP) or any(s.query == "random" for s in p.stages)) and generator is None:
        raise ValueError("a random stage or early drop needs a generator")
    if p.method == OBJECT_DROP and objects is None:
        raise ValueError("an object-first drop needs the patches objects cover")
    lm = engine.lm
    pad = engine.tokenizer.pad_token_id
    real = input_ids != pad
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("reduced_loss needs right-padded rows")
    batch = input_ids.shape[0]
    hidden = engine.vision_states(pixel_values)
    visual = engine.reduce(hidden, p, Timer(engine.device))
    # every patch projected, for the auxiliary heads: without a vision-side merge that is what reduce returned
    every_patch = (visual.features.view(batch, engine.n_patches, -1) if p.k1 is None
                   else engine.projector(hidden[engine.feature_index][:, 1:]))
    if p.method in (EARLY_DROP, OBJECT_DROP):
        visual = random_subset(visual, p.budget, generator, objects if p.method == OBJECT_DROP else None)
    n = visual.tokens_per_frame[0]
    tokens = visual.features.view(batch, n, -1)

    is_image = input_ids == engine.image_token_id
    keep = ~is_image | (is_image.long().cumsum(1) - 1 < n)
    ids = input_ids[keep].view(batch, -1)
    targets = labels[keep].view(batch, -1)
    new_index = keep.long().cumsum(1) - 1
    salient_pos = [new_index[b, torch.tensor(rows, device=ids.device)] for b, rows in enumerate(salient)]

    h = lm.embed_tokens(ids)
    is_visual = ids == engine.image_token_id
    h = h.masked_scatter(is_visual[..., None].expand_as(h), tokens.to(h.dtype))
    pos = torch.arange(ids.shape[1], device=ids.device).expand(batch, -1)
    rope = lm.rotary_emb(h, pos)
    stage_at = {s.layer: s for s in p.stages}
    attention = {}

    def covering(b: int, patches: set[int]) -> torch.Tensor:
        """Per visual token of row b: does it represent any of ``patches``."""
        return torch.tensor([bool(patches & set(members)) for members in visual.frames[b]["token_patches"]])

    on_query = None if queried is None else [None if not patches else covering(b, patches)
                                             for b, patches in enumerate(queried)]
    present = ids != pad
    lookups = None if named is None else [  # (sequence, row of the word, bool per visual token)
        (b, new_index[b, at], covering(b, patches))
        for b in range(batch) for at, patches in zip(asked[b], named[b])]

    def centre_rows(b: int, patches: list[int]) -> list[int] | None:
        """The first row, then the row of the first visual token representing each counted patch;
        None when one is not represented (an early drop can leave it out)."""
        first_row = {}
        for row, members in zip(torch.nonzero(is_visual[b]).flatten().tolist(), visual.frames[b]["token_patches"]):
            for patch in members:
                first_row.setdefault(patch, row)
        return None if any(p not in first_row for p in patches) else [0] + [first_row[p] for p in patches]

    counted = None if centres is None else counting_targets(
        [None if patches is None else centre_rows(b, patches) for b, patches in enumerate(centres)], present,
        centre_masses)
    pointed_rows = None if pointed is None else row_targets(
        [None if at is None else new_index[b, torch.tensor(at)].tolist() for b, at in enumerate(pointed)], present)
    # no stage runs before a supervised layer, so rows are still positions and salient_pos the salient rows
    marks = Marks(salient_pos, is_visual, present, on_query, marked_rows(asked, present, new_index), lookups,
                  marked_rows(offered, present, new_index), counted, pointed_rows,
                  None if absent is None else absent_marks(absent, on_query, is_visual, present))
    mask = engine._mask(h.shape[1])  # None under SDPA, which is causal by itself
    for index, layer in enumerate(lm.layers):
        attention |= supervised_losses(engine, index, h, rope, pos, supervised, marks)
        if index in stage_at:
            with torch.no_grad():
                rows = []
                for b in range(batch):
                    visual_rows = torch.nonzero(is_visual[b]).flatten()
                    if stage_at[index].query == "random":
                        scores = torch.rand(len(visual_rows), generator=generator).to(h.device)
                    else:
                        after_image = torch.arange(h.shape[1], device=h.device) > int(visual_rows.max())
                        query = torch.nonzero(after_image & present[b] & (targets[b] == -100)).flatten()
                        scores = engine._scores(layer, h[b:b + 1], (rope[0][b:b + 1], rope[1][b:b + 1]), pos[b],
                                                query, visual_rows)
                    survivors = ~is_visual[b].clone()
                    survivors[visual_rows[keep_top(scores, stage_at[index].keep)]] = True
                    rows.append(torch.nonzero(survivors).flatten())
                gather = torch.stack(rows)
            h = h.gather(1, gather[..., None].expand(-1, -1, h.shape[-1]))
            is_visual, targets, present = is_visual.gather(1, gather), targets.gather(1, gather), present.gather(1, gather)
            pos = torch.arange(h.shape[1], device=h.device).expand(batch, -1)
            rope = lm.rotary_emb(h, pos)
            mask = engine._mask(h.shape[1])
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
    logits = engine.lm_head(lm.norm(h))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100)
    return loss, tokens, every_patch, attention
