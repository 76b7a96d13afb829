"""Train the shipped tiny LLaVA from scratch on synthetic scenes VQA (SPEC §7, §8).

The model is a stock `LlavaForConditionalGeneration` (CLIP-style tower at 336 px / patch 14 ->
576 patches, features at layer -2, Llama decoder) built from a `TinyLlavaSpec`. Inputs go through
the stock processor and chat template: "USER: <image>\\n{question} ASSISTANT: {answer}</s>"; the
language loss is cross-entropy on the answer tokens (answer word + </s>) only.

Answer loss alone stays at chance once scenes hold several objects (SPEC §8): the model has to
bind the asked shape to its colour across 576 visual tokens. Four things address that here:
- dense auxiliary supervision: linear heads read each projected visual token (the projector output
  the LLM sees, computed from the layer -2 features) and classify the patch's colour, shape and
  whether it holds an object's centroid, with labels from the exact object masks
  (`data.patch_labels`); with `--position-weight W` also which image half (left/right, top/bottom)
  the patch's object lies in. The heads live beside the model and are never exported.
- a vision pre-stage: the first `pre_steps` steps train the tower + projector on the auxiliary
  loss alone, on full 1-6 object scenes (more labelled patches per image); a step costs a
  fraction of a full one because the decoder is not run. With `--pre-crops W` it trains on
  W x W-patch windows around objects instead (`window_tokens`), about six times more objects per
  second. Measured here: the tower did not learn shape from whole images (per-patch shape recall
  ~0.35 of 4 shapes after 3 k scenes, like a per-patch MLP with no attention), and on 8 x 8
  windows it did after ~45 k windows (0.35 -> 0.77 between 1.2 k and 1.7 k steps of 32 windows).
- the vision tower's position embeddings start as a 2D sine-cosine grid (`init_grid_positions`).
- a curriculum: training scenes hold 1..k objects, k growing by one every `curriculum_steps`
  until 6. Validation always uses the full 1-6 range.

`--attn-weight W` adds query attention supervision (`train_reduce.query_attention_loss`): the
salient text rows' attention at the first DUET stage layer (L/2), the score T2V ranks tokens by,
is pushed onto the patches of the objects the question is about (from the masks). Without it the
shipped model's layer-6 attention kept 29 % of the queried object's tokens when T2V kept half of
all tokens (measured on validation scenes; its layer-3 attention kept 78 %): the model answered
from what earlier layers had already gathered, and T2V's ranking was not about the question.

`--bind-weight W` puts the same loss on the last prompt token alone at L/4: the token that
answers has to find the asked object early enough for later layers to read it. Why (measured on
the shipped model, validation): it answers 89 % of one-object scenes, 62 % of two-object and 47 %
of six-object ones, and its last token's attention share on the queried object is <= 0.41 in
every layer and head. With `--bind-weight 1` from the shipped model the share stayed near 0.37
(loss ~1.0) for 1070 full-token and 1750 DUET-64 steps, and validation did not pass the shipped
model's: not used for the shipped model (EVAL.md, *Reading*, has the probes).

The probes found the decoder binds once the last token holds the asked attributes, and that it
does not build that query from the question words by itself. `--ask-weight W` supervises exactly
that read: the last prompt token's attention at `--ask-layer` (default 0) onto the question's
colour and shape words; `--bind-layer` then moves binding next to it. `--lookup-weight W` makes
each of those words attend, at layer 0, to the objects it names ("red": every red object), the
single-attribute match the probes learned fastest. `--choices-weight W` puts the ask loss on
the answers a position question offers ("left or right", "top or bottom"): the object words
already take all of the ask share, so adding the choices to that target would not move it.
`--init-from F --init-parts vision` keeps a trained tower and projector under a fresh decoder;
`--init-from D --init-vision-from T` puts T's tower and projector under D's trained decoder (a
tower retrained for position answers, under the decoder that already binds and names objects);
`--init-from D --text-hidden H --text-heads N --text-kv-heads K --text-mlp M` widens D's decoder
to those sizes, computing what D does at the start (`load_widened`); and `--rope-theta` sets the
decoder's rotary base (a 16-wide head has two rotary pairs slow enough to match content across
576 positions at 1e4, four at 1e6). EVAL.md, *Reading*, reports the runs.

`--redraw-answers W1,W2,...` restarts the output rows of answers the loaded model cannot tell
apart (`redraw_rows`). The shipped decoder's four position answers had collapsed onto one row
(cosine 0.97-0.99) and its answer did not depend on whether the question offered "left or right"
or "top or bottom": the logits matched to three decimals with the pair swapped, after 600
more steps with `--choices-weight` and 150 without any attention loss alike.

`--state-weight W` trains `StateHeads` on the final state of the row that predicts the answer
(or, with `--state-layer K`, on decoder layer K's normed input at that row): which pair of
answers the question offers, the asked object's image halves, and the count.

`--read-weight W` trains `ReadHeads` on the attention output of the bind layer at that row: the
binding read itself, which must carry the asked object's image halves out of its tokens.
`--count-read-weight W` does the same for a count question's count, and `--count-aux-weight W`
makes each object patch's visual token name how many objects share its colour and its shape,
so that the binding read of the counted objects holds the count (``AuxHeads``).

`--v2v-weight W` pushes the vision tower's CLS attention at the layer V2V ranks and clusters by
onto the objects' patches (`v2v_object_loss`): the tower's half of DUET, as `--attn-weight` is
the LLM's.

`--count-weight W` and `--point-weight W` each supervise one head of the last prompt token
(`train_reduce.head_attention_loss`, which says why each target is what it is). Count: equal
shares on the first token and on each counted object's centroid patch (the shipped model
answered "one" or "two" to nearly every count question, 57 % on validation). Point: all of it on
the question's copy of a position answer (the full-token model's answer barely depended on
which pair was offered). `--count-exist` gives the count head existence questions as well: "is
there a red circle ?" counts red circles, and "no" puts the whole target on the first token, so
the head's output says "none" outright (existence answers were 84 % on test with the
conjunction of colour and shape left to the binding read). `--count-spread` spreads each counted
object's share over the patches it covers (`counted_patches`): the tower marks about five
patches per object rather than its centroid, and keys that tell an object's size can meet this
target where no key singled out the centroid (it did not raise count answers: EVAL.md, *Reading*).

`--early-drop P` makes another share P of them let only a random 1/4 or 1/2 of the patch tokens
into the LLM (`early_drop_plan`), so that the model reads objects from part of their patches, as
it must after any reduction before the LLM.
`--object-drop P` does the same in another share P of the steps with 1/8, 1/4 or 1/2 of them,
drawing the patches objects cover first (`object_drop_plan`). A random subset is spread over the
grid, but every reduction before the LLM keeps the salient patches (the shipped model's V2V at 64
tokens keeps every patch of the asked object) and renumbers their positions: whole objects then
sit at new relative positions, which the uniform draw never showed.

`--late-drop P` makes a share P of the full-token steps lose visual tokens late: from a random
layer in [L/2, L) a random 0, 1/4 or 1/2 of them survive, chosen at random (`late_drop_plan`).
A decoder that only ever saw all 576 tokens in every layer answers from them late, and every
in-LLM method (DUET's last stage keeps none) takes them away there. The drop ranks by nothing,
so it favours no method's choice of tokens.

Validation accuracy is exact match of the greedy answer, computed in one teacher-forced forward
pass: greedy decoding emits "answer</s>" exactly when the argmax at every answer position is the
answer token, so the two are the same test.

Everything needed to continue lives in the run folder (`state.pt`: model, heads, optimizer, step,
data position, RNG, best accuracy; `train.log`; `metrics.jsonl`) and a run resumes from it by
default. Whenever validation accuracy improves, the model and processor are exported as a
standard HF folder to `<run>/best`, and to `--export` when it beats the model already there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging as hf_logging

from . import clips as clips_module
from . import data
from .budget import Plan, ReductionConfig, Stage, plan
from .checkpoint import TinyLlavaSpec, build_model, build_processor, load_widened, store_half
from .engine import DuetLlava, salient_positions
from .train_reduce import (EARLY_DROP, OBJECT_DROP, Marks, Supervision, absent_marks, counting_targets, marked_rows,
                           reduced_loss, row_targets, supervised_losses)


@dataclass
class TrainConfig:
    """Training knobs; every field is a command-line flag (underscores -> dashes)."""

    out: str = "runs/duet-llava-tiny"
    export: str = ""  # also export the best model here (the shipped one is assets/duet-llava-tiny)
    steps: int = 20000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_frac: float = 0.1  # lr at the end of the final decay
    warmup: int = 200
    decay_frac: float = 0.2  # last fraction of `steps` decays linearly: extending --steps keeps lr flat
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 1.0
    aux_min_coverage: float = 0.3  # a patch is labelled with an object covering >= this fraction
    position_weight: float = 0.0  # > 0: auxiliary heads also read which image half each object patch's object is in
    count_aux_weight: float = 0.0  # > 0: auxiliary heads also read how many objects share each object patch's colour / shape
    centre_per_object: bool = False  # the centre head also ranks each object's patches: its centroid patch first (AuxHeads)
    attn_weight: float = 0.0  # > 0: supervise the salient rows' attention at the first stage layer (query_attention_loss)
    bind_weight: float = 0.0  # > 0: supervise the last prompt token's attention at --bind-layer (query_attention_loss)
    bind_layer: int = -1  # the decoder layer binding is supervised at; -1: L/4
    ask_weight: float = 0.0  # > 0: supervise the last prompt token's attention at --ask-layer onto the question's object words
    ask_layer: int = 0
    choices_weight: float = 0.0  # > 0: supervise the last prompt token's attention at --ask-layer onto the offered answers
    lookup_weight: float = 0.0  # > 0: supervise each object word's layer-0 attention onto the objects it names
    absent_weight: float = 0.0  # > 0: on existence questions, the last prompt token at --bind-layer onto the first token for "no" (absent_marks)
    count_weight: float = 0.0  # > 0: on count questions, one head's attention of the last prompt token (head_attention_loss)
    count_layer: int = 2
    count_head: int = 0
    count_exist: bool = False  # the count head also counts an existence question's matches (none: all on the first token)
    count_spread: bool = False  # the count head's target spreads each counted object's share over its patches (counted_patches)
    point_weight: float = 0.0  # > 0: on position questions, one head of the last prompt token onto the answer word it offers
    point_layer: int = 2
    point_head: int = 1
    v2v_weight: float = 0.0  # > 0: push the tower's CLS attention at V2V's scoring layer onto object patches (v2v_object_loss)
    state_weight: float = 0.0  # > 0: the last prompt token's state names the offered pair, the asked object's halves and the count (StateHeads)
    state_layer: int = -1  # the state StateHeads read: -1 the final one, K >= 0 decoder layer K's normed input
    read_weight: float = 0.0  # > 0: the bind layer's attention output at the answer row names the asked object's halves (ReadHeads)
    count_read_weight: float = 0.0  # > 0: the bind layer's attention output at that row names a count question's count
    pre_steps: int = 300  # vision pre-stage: auxiliary loss only, decoder not run
    pre_crops: int = 0  # > 0: the pre-stage trains on windows of this many patches a side (see crop_batch)
    curriculum_steps: int = 500  # one more object allowed per this many steps after the pre-stage
    eval_every: int = 250
    eval_samples: int = 256
    save_every: int = 50
    log_every: int = 10
    threads: int = 1
    seed: int = 0
    init_from: str = ""  # start a new run from an exported model folder (e.g. the shipped one)
    init_parts: str = "all"  # what --init-from loads: "all", or "vision" (tower + projector; a fresh decoder)
    init_vision_from: str = ""  # then replace the tower + projector with this exported model's
    redraw_answers: str = ""  # comma-separated answer words whose output rows are redrawn after --init-from (redraw_rows)
    reduction: str = "none"
    budget: int = 192
    late_drop: float = 0.0  # share of full-token answer steps that drop visual tokens late (late_drop_plan)
    early_drop: float = 0.0  # share of full-token answer steps in which a random part of the visual tokens enters the LLM (early_drop_plan)
    object_drop: float = 0.0  # share of full-token answer steps in which the object patches, then random others, enter the LLM (object_drop_plan)
    clip_every: int = 0  # > 0: every this many steps (after the pre-stage) train on a batch of moving clips
    clip_frames: int = 3  # clips have 2..clip_frames frames
    count_share: float = 0.0  # share of each image batch given to count questions with answers even over one..three (count_samples)


# The shipped model: LLaVA-1.5 geometry, 12 decoder layers (stage layers 6/9 for DUET, 3/6/9 for
# PyramidDrop) and widths chosen so one batch-8 step takes seconds on one CPU core.
SHIPPED_SPEC = TinyLlavaSpec(
    vision_hidden=128, vision_layers=4, vision_heads=4, vision_mlp=512,
    text_hidden=64, text_layers=12, text_heads=4, text_kv_heads=2, text_mlp=192,
    words=data.vocabulary(),
)
VISION_PARTS = ("model.vision_tower.", "model.multi_modal_projector.")
SPEC_FLAGS = ("vision_hidden", "vision_layers", "vision_heads", "vision_mlp",
              "text_hidden", "text_layers", "text_heads", "text_kv_heads", "text_mlp", "rope_theta")


class AuxHeads(nn.Module):
    """Per-visual-token linear classifiers for the auxiliary loss (not part of the exported model).
    With ``position_weight`` > 0 two more, starting small, read the image half of the patch's
    object (left/right, top/bottom), their loss scaled by that weight; with ``count_aux_weight``
    > 0 two more read how many objects share the patch's object's colour and shape.

    Why the counts: a count question's answer is then a property of every patch of every object
    it counts, so the binding read, which averages those patches' values, carries it unchanged
    (``--count-read-weight`` names it there). Counting in the decoder instead needs a head that
    attends to one patch per object; that head's attention settled at twice its optimal loss
    and count answers stayed at the prior. The tower's heads are 32 wide with learned 2D
    positions; the decoder's are 16 wide under rotary positions.

    With ``centre_per_object`` the centre head's loss adds, for each object, a softmax over its
    own patches whose target is its centroid patch. Why: the plain loss averages the few centre
    patches and all others separately, and a head trained so (the shipped one) fires on ~5
    patches per object: precision 0.20 at recall 1.00 on validation scenes, and the centroid
    patch's score beats the best other patch of its object in only 54 % of objects (median
    margin 0.02). A count head needs one marked token per object; a free per-word query on the
    layer-2 keys reached a count-target cross-entropy of 1.8-2.1 against an optimum of 0.86."""

    def __init__(self, width: int, position_weight: float = 0.0, count_aux_weight: float = 0.0,
                 centre_per_object: bool = False):
        super().__init__()
        self.centre_per_object = centre_per_object
        counts = len(data.COUNT_WORDS) + 1
        classes = {"colour": len(data.COLOURS) + 1, "shape": len(data.SHAPES) + 1, "centre": 2, "across": 3,
                   "updown": 3, "colour_count": counts, "shape_count": counts}
        self.weights = {"colour": 1.0, "shape": 1.0, "centre": 1.0}
        if position_weight > 0:
            self.weights |= {"across": position_weight, "updown": position_weight}
        if count_aux_weight > 0:
            self.weights |= {"colour_count": count_aux_weight, "shape_count": count_aux_weight}
        for name in self.weights:
            self.add_module(name, nn.Linear(width, classes[name]))
        for name in ("across", "updown", "colour_count", "shape_count"):
            # Added to trained towers, whose tokens are large (norm ~300): default-size rows started
            # at a CE of ~75 whose gradient, under the global norm clip, crowded out the rest. Zero
            # rows are a saddle when the tokens hold no linear trace of the half (the shipped tower's):
            # no gradient on the rows, so none on the tokens; recall stayed at chance for 400 steps.
            if name in self.weights:
                nn.init.normal_(getattr(self, name).weight, std=1e-3)

    def loss(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """tokens (B, P, width); targets (B, P) class ids. Returns the weighted CE sum and per-head stats."""
        total, stats = tokens.new_zeros(()), {}
        for name, weight in self.weights.items():
            logits = getattr(self, name)(tokens)
            ce = F.cross_entropy(logits.flatten(0, 1), targets[name].flatten(), reduction="none")
            # Objects cover a few % of the patches: averaging background and object patches
            # separately keeps "all background" from being a cheap minimum.
            positive = targets[name].flatten() > 0
            total = total + weight * (ce[~positive].mean() + (ce[positive].mean() if positive.any() else 0.0))
            hits = (logits.argmax(-1) == targets[name]).flatten()[positive]
            stats[f"aux_{name}_recall"] = hits.float().mean().item() if positive.any() else 0.0
            if name == "centre":
                fired = logits.argmax(-1).flatten() == 1
                stats["aux_centre_precision"] = (fired & positive).sum().item() / max(int(fired.sum()), 1)
                if self.centre_per_object:
                    ranked = centre_ranking_loss(logits[..., 1] - logits[..., 0], targets["object"], targets["centre"])
                    total = total + weight * ranked
                    stats["aux_centre_rank_loss"] = ranked.item()
        return total, stats


def centre_ranking_loss(scores: torch.Tensor, objects: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Mean over objects of -log softmax, over the object's own patches, of its centroid patch's
    score. scores, objects (0 background, else 1 + object index), centres (1 on centroid
    patches): (B, P). An object whose patches hold no centroid patch (or a neighbour's) is skipped."""
    terms = []
    for row_scores, row_objects, row_centres in zip(scores, objects, centres):
        for k in row_objects.unique().tolist():
            members = row_objects == k
            hit = (row_centres[members] == 1).nonzero().flatten()
            if k == 0 or len(hit) != 1:
                continue
            terms.append(-torch.log_softmax(row_scores[members], 0)[hit[0]])
    return torch.stack(terms).mean() if terms else scores.new_zeros(())


def count_targets(samples: list[data.Sample]) -> torch.Tensor:
    """Per sample, the index in ``data.COUNT_WORDS`` of a count question's answer, -100 for other kinds."""
    return torch.tensor([len(s.query) - 1 if s.kind == "count" else -100 for s in samples])


def row_heads_loss(heads: nn.Module, names, rows: torch.Tensor, targets: dict[str, torch.Tensor],
                   prefix: str) -> tuple[torch.Tensor, dict]:
    """The summed cross-entropies of the linear heads ``names`` of ``heads`` on ``rows`` (B, width)
    against class ids (-100: not labelled; a head with no labelled row adds 0), and their recalls
    as ``{prefix}_{name}_recall``."""
    total, stats = rows.new_zeros(()), {}
    for name in names:
        labelled = targets[name] != -100
        if not labelled.any():
            continue
        logits = getattr(heads, name)(rows[labelled].float())
        total = total + F.cross_entropy(logits, targets[name][labelled])
        stats[f"{prefix}_{name}_recall"] = (logits.argmax(-1) == targets[name][labelled]).float().mean().item()
    return total, stats


class StateHeads(nn.Module):
    """Linear classifiers on the decoder's state at the last prompt token (not part of the
    exported model): by default the final (normed) state ``lm_head`` reads the answer from; with
    ``layer`` K >= 0 the normed input of decoder layer K, what its attention reads. ``pair``:
    which answers the question offers (0 none, 1 "left or right", 2 "top or bottom"), on every
    question; ``across`` / ``updown``: which image half the asked object lies in, on position
    questions; ``count``: how many objects a count question counts.

    Why: in the shipped decoder the offered pair was linearly readable at the last prompt token
    after layer 1 (probe 1.0, 16 % of the state's norm between the pairs) and faded with depth
    (3 % after the final norm), and the four position rows of ``lm_head`` had collapsed onto one:
    rows only part along features that differ between answers, and those only grow along rows
    that differ. These heads make the final state carry both halves of a position answer, so
    that the answer rows have something to part along.

    Why an early layer: in a model trained with ``--point-weight`` and ``--count-weight`` from the
    shipped one (500 steps), the point head split its attention evenly between the two offered
    words (0.49 / 0.48 on validation) and a ridge probe of the last prompt token's state read
    which of them is the answer at 0.45-0.72 at every layer's input: the bound object's half
    never reached that token. Heads at layer K's input make it arrive before K's attention reads."""

    CLASSES = {"pair": 3, "across": 2, "updown": 2, "count": len(data.COUNT_WORDS)}

    def __init__(self, width: int, layer: int = -1):
        super().__init__()
        self.layer = layer
        for name, classes in self.CLASSES.items():
            self.add_module(name, nn.Linear(width, classes))

    @staticmethod
    def targets(samples: list[data.Sample]) -> dict[str, torch.Tensor]:
        """Class ids per sample; -100 (ignored) for the halves of a question that is not about
        position and for the count of one that is not a count question."""
        pair, across, updown = [], [], []
        for s in samples:
            position = s.kind == "position"
            pair.append(0 if not position else 1 if s.answer in ("left", "right") else 2)
            x, y = s.objects[s.query[0]].centroid if position else (0.0, 0.0)
            across.append(int(x >= data.IMAGE_SIZE / 2) if position else -100)
            updown.append(int(y >= data.IMAGE_SIZE / 2) if position else -100)
        return {"pair": torch.tensor(pair), "across": torch.tensor(across), "updown": torch.tensor(updown),
                "count": count_targets(samples)}

    def loss(self, states: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """states (B, width); the summed cross-entropies (a head with no labelled row adds 0) and recalls."""
        return row_heads_loss(self, self.CLASSES, states, targets, "state")


class ReadHeads(nn.Module):
    """Linear classifiers on the bind layer's attention output (``self_attn``, after ``o_proj``) at
    the row that predicts the answer: which image halves the one object a question asks about lies
    in (not exported). Labelled on every question about a single object, not only position ones.

    Why: the supervised binding read works (bind loss ~0.2: a share of ~0.8 of that row's layer-1
    attention on the asked object), and a ridge probe reads the asked object's left / right and
    top / bottom at 1.00 / 0.98 from its own tokens, but at only 0.85 / 0.68 from that attention
    output in the shipped model (0.92 / 0.83 in its DUET-64 twin): the value path, two 16-wide
    key-value heads trained on colour and shape answers, drops the half on the way. Position
    answers stayed at 58 % after the offered pair was read (pair-swap total variation 0.98).

    The same heads also name a count question's count (``--count-read-weight``, on the same
    layer): its binding read averages the counted objects' patches, which with
    ``--count-aux-weight`` each name how many objects share their colour and shape. On the count
    layer (2) instead, where one head is taught to count centroids, a count read stayed at the
    prior (recall ~0.6 over 500 twin steps)."""

    CLASSES = {"across": 2, "updown": 2, "count": len(data.COUNT_WORDS)}

    def __init__(self, width: int, layer: int, names: tuple[str, ...] = ("across", "updown")):
        super().__init__()
        self.layer, self.names = layer, names
        for name in names:
            self.add_module(name, nn.Linear(width, self.CLASSES[name]))

    @staticmethod
    def targets(samples: list[data.Sample]) -> dict[str, torch.Tensor]:
        """Per sample, 0/1 for the left/right and top/bottom half of its one asked object's mask
        centroid, -100 (ignored) for questions about no or several objects and for a centroid
        closer than ``data.POSITION_MARGIN_PX`` to that centre line, as position questions do;
        the count of a count question (0 for "one"), -100 for other questions."""
        middle, labels = data.IMAGE_SIZE / 2, {"across": [], "updown": []}
        for s in samples:
            centroid = s.objects[s.query[0]].centroid if len(s.query) == 1 else None
            for name, axis in (("across", 0), ("updown", 1)):
                off = centroid is not None and abs(centroid[axis] - middle) >= data.POSITION_MARGIN_PX
                labels[name].append(int(centroid[axis] >= middle) if off else -100)
        return {name: torch.tensor(v) for name, v in labels.items()} | {"count": count_targets(samples)}

    def loss(self, reads: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """reads (B, width); the summed cross-entropies (a head with no labelled row adds 0) and recalls."""
        return row_heads_loss(self, self.names, reads, targets, "read")


def redraw_rows(model, tokenizer, words: list[str], generator: torch.Generator) -> None:
    """Give the output (lm_head) rows of ``words`` their common mean plus fresh noise of the
    matrix's own per-entry spread. Answers the model could not tell apart collapse onto one row
    (the shipped decoder's left / right / top / bottom rows had cosine 0.97-0.99), and that is a
    saddle: the rows only separate along features that differ between the answers, and those
    features only grow along rows that differ. Redrawn rows keep "a position word" and restart
    the rest."""
    ids = tokenizer.convert_tokens_to_ids(words)
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"not in the vocabulary: {[w for w, i in zip(words, ids) if i == tokenizer.unk_token_id]}")
    weight = model.lm_head.weight
    with torch.no_grad():
        rows = weight[ids]
        noise = torch.randn(rows.shape, generator=generator) * weight.std()
        weight[ids] = rows.mean(0) + noise.to(weight.dtype)


def init_grid_positions(model, scale: float = 0.5) -> None:
    """Start the vision tower's learned position embeddings at 2D sine-cosine values of each patch's
    (row, col) (CLS at zero), instead of noise. Shape and position answers need a token to know
    where it and its neighbours are; from random init that takes thousands of steps to appear."""
    table = model.model.vision_tower.embeddings.position_embedding.weight
    vision = model.config.vision_config
    side, width = vision.image_size // vision.patch_size, table.shape[1]
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    freqs = 1.0 / 100 ** (torch.arange(width // 4) / (width // 4))
    parts = [f(axis.flatten()[:, None] * freqs) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, 1)
    with torch.no_grad():
        table.zero_()
        table[1:, : grid.shape[1]] = scale * grid


# ----------------------------------------------------------------------------- batches
def conversation(question: str, answer: str | None = None, n_images: int = 1) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    turns = [{"role": "user", "content": content}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def counted_patches(sample: data.Sample, spread: bool) -> tuple[list[int], list[float] | None]:
    """(patches, masses) of the objects ``sample``'s question counts: their centroid patches (masses
    None: one each), or with ``spread`` every patch each object's mask touches, with the share of
    that mask the patch holds (each object's masses sum to 1)."""
    if not spread:
        return [sample.objects[i].centre_patch() for i in sample.query], None
    patches, masses = [], []
    for i in sample.query:
        coverage = data.patch_coverage(sample.objects[i].mask).reshape(-1)
        touched = np.nonzero(coverage)[0]
        patches += touched.tolist()
        masses += (coverage[touched] / coverage[touched].sum()).tolist()
    return patches, masses


def encode(processor, samples: list[data.Sample], min_coverage: float,
           clips: list[list] | None = None, counted_kinds: tuple[str, ...] = ("count",),
           count_spread: bool = False) -> dict[str, torch.Tensor]:
    """Processor inputs for the full conversations, answer-only labels and per-patch targets.
    With ``clips`` (frames per sample) the prompts are multi-image and there are no patch targets.
    ``centres`` lists, for questions of ``counted_kinds``, the centroid patches of the objects the
    question counts (an existence question answered "no": none); None for other questions. With
    ``count_spread`` it lists every patch they touch and ``centre_masses`` each one's mass
    (``counted_patches``)."""
    tok = processor.tokenizer
    counts = [len(c) for c in clips] if clips else [1] * len(samples)
    full = [processor.apply_chat_template(conversation(s.question, s.answer, n)) for s, n in zip(samples, counts)]
    prompts = [processor.apply_chat_template(conversation(s.question, n_images=n), add_generation_prompt=True)
               for s, n in zip(samples, counts)]
    images = clips if clips else [s.image for s in samples]
    batch = processor(images=images, text=full, padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    lengths = batch["attention_mask"].sum(1).tolist()
    for row, (text, prompt) in enumerate(zip(full, prompts)):
        ids, prompt_ids = tok(text)["input_ids"], tok(prompt)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"the prompt does not tokenize as a prefix of the conversation: {text!r}")
        n_answer = len(ids) - len(prompt_ids)  # the image expands inside the prompt, not here
        end = lengths[row]
        labels[row, end - n_answer:end] = batch["input_ids"][row, end - n_answer:end]
    if not clips:
        targets = [data.patch_labels(s.objects, min_coverage) for s in samples]
        for name in data.PATCH_TARGETS:
            batch[name] = torch.from_numpy(np.stack([t[name].reshape(-1) for t in targets]))
    batch["labels"] = labels
    # the row that predicts the answer word, counted from the end: it survives every token reduction
    batch["answer_from_end"] = (batch["attention_mask"] == 0).sum(1) + (labels != -100).sum(1) + 1
    if not clips:
        batch["state"] = StateHeads.targets(samples)
        batch["read"] = ReadHeads.targets(samples)
    batch["query"] = [data.query_patches(s) for s in samples]
    counted = [counted_patches(s, count_spread) if s.kind in counted_kinds else (None, None) for s in samples]
    batch["centres"] = [patches for patches, _ in counted]
    batch["centre_masses"] = [masses for _, masses in counted] if count_spread else None
    batch["absent"] = [s.answer == "no" if s.kind == "exist" else None for s in samples]
    prompt_ids = [batch["input_ids"][row, : lengths[row] - int((labels[row] != -100).sum())] for row in range(len(samples))]
    object_words = torch.tensor([i for i in tok.convert_tokens_to_ids(data.object_words()) if i != tok.unk_token_id])
    batch["asked"] = [torch.nonzero(torch.isin(ids, object_words)).flatten().tolist()  # the prompt's colour/shape words
                      for ids in prompt_ids]
    batch["named"] = [[data.word_patches(s, word) for word in tok.convert_ids_to_tokens(batch["input_ids"][row, at])]
                      for row, (s, at) in enumerate(zip(samples, batch["asked"]))]
    choices = torch.tensor(tok.convert_tokens_to_ids(list(data.CHOICE_WORDS)))
    batch["offered"] = [torch.nonzero(torch.isin(ids, choices)).flatten().tolist() for ids in prompt_ids]
    batch["pointed"] = [[at for at in offered if tok.convert_ids_to_tokens(int(ids[at])) == s.answer]
                        if s.kind == "position" else None
                        for s, ids, offered in zip(samples, prompt_ids, batch["offered"])]
    image_token = tok.convert_tokens_to_ids("<image>")
    batch["salient"] = [  # for DUET training: the T2V query rows of each prompt
        salient_positions(tok, image_token, prompt, s.question, ids)[0] for s, prompt, ids in zip(samples, prompts, prompt_ids)
    ]
    return batch


def crop_batch(cfg: TrainConfig, first: int, batch: dict, samples: list[data.Sample]):
    """Four patch-aligned windows of ``pre_crops`` x ``pre_crops`` patches per scene, each around
    one of its objects: (pixels (4B, 3, w, w), patch indices (4B, w*w) into the 24 x 24 grid,
    per-patch targets cut from the full scene's)."""
    side, window, patch = data.IMAGE_SIZE // data.PATCH_SIZE, cfg.pre_crops, data.PATCH_SIZE
    rng = np.random.default_rng([cfg.seed, first, 1])
    pixels, indices, targets = [], [], {name: [] for name in data.PATCH_TARGETS}
    offsets = torch.arange(window)
    for row, sample in enumerate(samples):
        for _ in range(4):
            obj = sample.objects[rng.integers(len(sample.objects))]
            r, c = int(obj.centre[1]) // patch, int(obj.centre[0]) // patch
            r0 = int(np.clip(r - rng.integers(1, window - 1), 0, side - window))
            c0 = int(np.clip(c - rng.integers(1, window - 1), 0, side - window))
            pixels.append(batch["pixel_values"][row, :, r0 * patch:(r0 + window) * patch, c0 * patch:(c0 + window) * patch])
            rows, cols = torch.meshgrid(offsets + r0, offsets + c0, indexing="ij")
            indices.append((rows * side + cols).flatten())
            for name, values in targets.items():
                values.append(batch[name][row].view(side, side)[r0:r0 + window, c0:c0 + window].reshape(-1))
    return torch.stack(pixels), torch.stack(indices), {k: torch.stack(v) for k, v in targets.items()}


def window_tokens(model, pixels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens of image windows: the stock tower's modules, with each window patch
    given the position embedding of the patch it was cut from (CLS keeps its own), so what the
    tower learns on windows is what it computes on whole images, at a tenth of the tokens."""
    tower = model.model.vision_tower
    emb = tower.embeddings
    table = emb.position_embedding.weight
    x = emb.patch_embedding(pixels.to(table.dtype)).flatten(2).transpose(1, 2) + table[1 + indices]
    cls = (emb.class_embedding + table[0]).expand(len(x), 1, -1)
    h = tower.pre_layrnorm(torch.cat([cls, x], 1))
    n_layers = model.config.vision_config.num_hidden_layers
    for layer in tower.encoder.layers[: model.config.vision_feature_layer % (n_layers + 1)]:
        h = layer(h, None)
    return model.model.multi_modal_projector(h[:, 1:])


def visual_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens (B, 576, d_text): what the decoder sees in place of <image>."""
    return torch.stack(model.model.get_image_features(pixel_values=pixel_values).pooler_output)


def forward_losses(model, heads: AuxHeads, batch: dict, with_answer: bool, engine: DuetLlava,
                   duet: Plan | None = None, supervised: dict[str, Supervision] | None = None,
                   generator: torch.Generator | None = None, state_heads: StateHeads | None = None,
                   v2v: bool = False, read_heads: dict[str, ReadHeads] | None = None):
    """(answer loss or None, auxiliary loss, {name: supervised loss or None}, aux stats) for
    one batch. ``duet`` runs the answer forward with DUET's reductions under that plan (SPEC §2
    Training), or with a ``late_drop_plan`` whose random stage draws from ``generator``.
    ``supervised`` names the attentions scored by ``query_attention_loss`` (see
    ``supervised_attention``); with ``state_heads`` the dict also holds ``state``, their loss on
    the final state of the row that predicts the answer, each of ``read_heads`` (name: heads)
    its loss on its layer's attention output at that row, and with ``v2v`` ``v2v``
    (``v2v_object_loss``). A clip batch (no patch targets) has none of these."""
    supervised = supervised or {}
    read_heads = read_heads or {}
    if with_answer and "colour" in batch and (state_heads is not None or v2v or read_heads):
        final, before, hooks = [], [], []
        reads = {name: [] for name in read_heads}
        if state_heads is not None and state_heads.layer < 0:
            hooks.append(engine.lm.norm.register_forward_hook(lambda _module, _args, output: final.append(output)))
        elif state_heads is not None:  # layer K's input, normed as its attention reads it
            read = engine.lm.layers[state_heads.layer]
            hooks.append(read.register_forward_pre_hook(
                lambda _module, args, kwargs: final.append(read.input_layernorm(args[0] if args else
                                                                                kwargs["hidden_states"])),
                with_kwargs=True))
        for name, h in read_heads.items():
            hooks.append(engine.lm.layers[h.layer].self_attn.register_forward_hook(
                lambda _module, _args, output, into=reads[name]: into.append(output[0])))
        if v2v:  # the input of the layer whose CLS attention V2V ranks by (engine.reduce)
            scored = engine.vision.encoder.layers[engine.feature_index - 1]
            hooks.append(scored.register_forward_pre_hook(
                lambda _module, args, kwargs: before.append(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        try:
            loss, aux, attention, stats = forward_losses(model, heads, batch, with_answer, engine, duet, supervised,
                                                         generator)
        finally:
            for hook in hooks:
                hook.remove()
        row_heads = {"state": (state_heads, final, batch["state"])} if state_heads is not None else {}
        row_heads |= {name: (h, reads[name], batch["read"]) for name, h in read_heads.items()}
        for name, (h, captured, targets) in row_heads.items():
            rows = captured[-1].shape[1] - batch["answer_from_end"]
            attention[name], head_stats = h.loss(captured[-1][torch.arange(len(rows)), rows], targets)
            stats |= head_stats
        if v2v:
            attention["v2v"], share = v2v_object_loss(engine, before[0], batch["colour"] > 0)
            stats["v2v_object_share"] = share
        return loss, aux, attention, stats
    if "colour" not in batch:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
        return out.loss, out.loss.new_zeros(()), {}, {}
    targets = {name: batch[name] for name in data.PATCH_TARGETS}
    if not with_answer:
        aux, stats = heads.loss(visual_tokens(model, batch["pixel_values"]), targets)
        return None, aux, {}, stats
    if duet is not None:
        loss, _, every_patch, attention = reduced_loss(engine, duet, batch["input_ids"], batch["pixel_values"],
                                                       batch["labels"], batch["salient"], batch["query"],
                                                       supervised, batch["asked"], batch["named"], generator,
                                                       batch["offered"], batch["centres"], batch["pointed"],
                                                       batch["colour"] > 0, batch["absent"], batch["centre_masses"])
        aux, stats = heads.loss(every_patch, targets)
        return loss, aux, attention, stats
    captured = {}

    def grab(index):
        def hook(_module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    layers = {s.layer for s in supervised.values()}
    hooks = [engine.lm.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
    finally:
        for hook in hooks:
            hook.remove()
    tokens = out.image_hidden_states.view(len(batch["input_ids"]), -1, out.image_hidden_states.shape[-1])
    aux, stats = heads.loss(tokens, targets)
    attention = {}
    if supervised:
        ids = batch["input_ids"]
        is_visual = ids == engine.image_token_id
        on_query = [torch.zeros(engine.n_patches, dtype=torch.bool).index_fill_(0, torch.tensor(sorted(patches)), True)
                    if patches else None for patches in batch["query"]]
        present = batch["attention_mask"].bool()
        pos = torch.arange(ids.shape[1]).expand(len(ids), -1)
        lookups = [(b, torch.tensor(at), torch.zeros(engine.n_patches, dtype=torch.bool).index_fill_(
                        0, torch.tensor(sorted(p), dtype=torch.long), True))
                   for b in range(len(ids)) for at, p in zip(batch["asked"][b], batch["named"][b])]
        counted = counting_targets([None if patches is None else [0] + torch.nonzero(is_visual[b]).flatten()[patches].tolist()
                                    for b, patches in enumerate(batch["centres"])], present, batch["centre_masses"])
        marks = Marks([torch.tensor(r) for r in batch["salient"]], is_visual, present, on_query,
                      marked_rows(batch["asked"], present), lookups, marked_rows(batch["offered"], present), counted,
                      row_targets(batch["pointed"], present), absent_marks(batch["absent"], on_query, is_visual, present))
        for index, (h, rope) in captured.items():
            rope = tuple(r.expand(len(ids), -1, -1) for r in rope)  # the stock forward shares one row
            attention |= supervised_losses(engine, index, h, rope, pos, supervised, marks)
    return out.loss, aux, attention, stats


def v2v_object_loss(engine: DuetLlava, before: torch.Tensor, on_object: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(-log of the CLS attention share on object patches, mean over images; that share) at the
    layer V2V scores with, from that layer's input ``before`` (B, 1 + P, d) by
    ``engine.cls_scores``, as ``engine.reduce`` does. ``on_object`` (B, P) marks the patches an object covers. V2V keeps
    and clusters by this attention before the LLM sees a token, and nothing else trains it: a
    tower taught on object windows by per-patch heads alone (`pos-scratch2`) lost 21 % of its
    full-token accuracy at VisionZip 64, where the shipped tower lost 7 %."""
    share = (engine.cls_scores(before)[1] * on_object).sum(1)
    return -share.clamp_min(1e-6).log().mean(), share.mean().item()


LATE_DROP_KEEPS = (0.0, 0.25, 0.5)


def late_drop_plan(engine: DuetLlava, generator: torch.Generator) -> Plan:
    """Full tokens up to a random layer in [L/2, L), from there a random 0, 1/4 or 1/2 of them,
    chosen at random (``--late-drop``). A decoder trained only on full sequences leans on the
    visual tokens in every layer (the last prompt token's attention on them is 0.39-0.98 in layers
    9-11 of the ``ask-fresh`` run), so removing them late, as every in-LLM method does, breaks its
    answers; this teaches it that late visual tokens may be gone, without any method's ranking."""
    layer = int(torch.randint(engine.n_layers // 2, engine.n_layers, (1,), generator=generator))
    keep = LATE_DROP_KEEPS[int(torch.randint(len(LATE_DROP_KEEPS), (1,), generator=generator))]
    stage = Stage(layer, round(keep * engine.n_patches), "random", layer)
    return Plan("late-drop", engine.n_patches, engine.n_layers, engine.n_patches, stages=(stage,))


EARLY_DROP_KEEPS = (0.25, 0.5)


def early_drop_plan(engine: DuetLlava, generator: torch.Generator) -> Plan:
    """A random 1/4 or 1/2 of the patch tokens, chosen at random, enter the LLM (``--early-drop``).
    Why: a full-token model (`cp-full`, 1000 steps from the shipped one) kept 97.4 % of its
    validation accuracy at PyramidDrop 64 but 71.0 % at VisionZip 64 (shape answers 96 -> 44 %):
    it had only ever read an object from all of its patches, and a reduction before the LLM
    leaves it a few kept or merged ones. Like the late drop, this ranks by nothing."""
    return subset_plan(EARLY_DROP, EARLY_DROP_KEEPS, engine, generator)


OBJECT_DROP_KEEPS = (0.125, 0.25, 0.5)


def object_drop_plan(engine: DuetLlava, generator: torch.Generator) -> Plan:
    """1/8, 1/4 or 1/2 of the patch tokens enter the LLM, the patches objects cover drawn first
    (``--object-drop``). Why: at DUET 64 the shipped tower keeps every patch of the asked object,
    and still shape answers fell from 95 to 84 % on validation (94 % with the prompt's original
    position ids): the decoder had never read whole objects packed into a shorter sequence. The
    marks are the scene's masks, no method's ranking."""
    return subset_plan(OBJECT_DROP, OBJECT_DROP_KEEPS, engine, generator)


def subset_plan(method: str, keeps: tuple[float, ...], engine: DuetLlava, generator: torch.Generator) -> Plan:
    """A plan that lets one of ``keeps`` (shares of the patches, drawn from ``generator``) into the LLM."""
    keep = keeps[int(torch.randint(len(keeps), (1,), generator=generator))]
    return Plan(method, round(keep * engine.n_patches), engine.n_layers, engine.n_patches)


def stage_layer(engine: DuetLlava) -> int:
    """The first DUET stage layer (L/2): where T2V first ranks the visual tokens."""
    return plan(ReductionConfig("duet", 64), engine.n_layers, engine.n_patches).stages[0].layer


def bind_layer(cfg: TrainConfig, n_layers: int) -> int:
    """The decoder layer where the last prompt token finds the asked object: ``--bind-layer``, L/4 by default."""
    return n_layers // 4 if cfg.bind_layer < 0 else cfg.bind_layer


def supervised_attention(cfg: TrainConfig, engine: DuetLlava) -> dict[str, Supervision]:
    """The attentions the trainer supervises: ``attn``, the T2V score at the first stage layer (all
    salient rows); ``bind``, the last prompt token at ``bind_layer``, which has to find the asked
    object early enough for later layers to read its attributes; ``ask``, the last prompt token at
    ``ask_layer`` onto the question's colour and shape words, so that it holds what to look for;
    ``choices``, the same token and layer onto the answers a position question offers;
    ``lookup``, each colour and shape word at layer 0 onto the objects it names; ``absent``, the
    last prompt token at ``bind_layer`` on existence questions, scored over all tokens, onto the
    asked object or, when there is none, the first token (``train_reduce.absent_marks``); ``count``, head
    ``count_head`` of the last prompt token at ``count_layer`` onto the first token and the
    counted objects' centroids, on count questions; ``point``, head ``point_head`` of the same
    token at ``point_layer`` onto the question's own copy of a position question's answer
    (``train_reduce.head_attention_loss`` has both targets)."""
    chosen = {}
    if cfg.attn_weight > 0:
        chosen["attn"] = Supervision(stage_layer(engine), False)
    if cfg.bind_weight > 0:
        chosen["bind"] = Supervision(bind_layer(cfg, engine.n_layers), True)
    if cfg.ask_weight > 0:
        chosen["ask"] = Supervision(cfg.ask_layer, True, "words")
    if cfg.choices_weight > 0:
        chosen["choices"] = Supervision(cfg.ask_layer, True, "choices")
    if cfg.lookup_weight > 0:
        chosen["lookup"] = Supervision(0, False, "named")
    if cfg.absent_weight > 0:
        chosen["absent"] = Supervision(bind_layer(cfg, engine.n_layers), True, "absent")
    if cfg.count_weight > 0:
        chosen["count"] = Supervision(cfg.count_layer, True, "count", cfg.count_head)
    if cfg.point_weight > 0:
        chosen["point"] = Supervision(cfg.point_layer, True, "point", cfg.point_head)
    return chosen


@torch.no_grad()
def evaluate(model, processor, cfg: TrainConfig) -> dict:
    """Exact-match accuracy of greedy answers on the first `eval_samples` validation samples."""
    model.eval()
    kinds: dict[str, list[int]] = {kind: [0, 0] for kind in data.KINDS}
    for start in range(0, cfg.eval_samples, cfg.batch_size * 2):
        samples = [data.sample(cfg.seed, "val", i)
                   for i in range(start, min(cfg.eval_samples, start + cfg.batch_size * 2))]
        batch = encode(processor, samples, cfg.aux_min_coverage)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        predicted = logits[:, :-1].argmax(-1)
        labels = batch["labels"][:, 1:]
        correct = ((predicted == labels) | (labels == -100)).all(1)
        for s, ok in zip(samples, correct.tolist()):
            kinds[s.kind][0] += ok
            kinds[s.kind][1] += 1
    model.train()
    total = sum(n for _, n in kinds.values())
    return {"val_acc": sum(c for c, _ in kinds.values()) / total,
            **{f"val_{kind}": c / n for kind, (c, n) in kinds.items() if n}}


def prior_accuracy(cfg: TrainConfig) -> float:
    """Accuracy of always answering the most common answer of each question kind on the
    validation subset: the chance level a model that ignores the image can reach."""
    answers: dict[str, dict[str, int]] = {}
    for i in range(cfg.eval_samples):
        s = data.sample(cfg.seed, "val", i)
        counts = answers.setdefault(s.kind, {})
        counts[s.answer] = counts.get(s.answer, 0) + 1
    return sum(max(c.values()) for c in answers.values()) / cfg.eval_samples


# ----------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = cfg.steps * (1 - cfg.decay_frac)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1.0, cfg.steps - decay_start))
    return cfg.lr * (1 - (1 - cfg.min_lr_frac) * progress)


CLIP_INDEX_BASE = 10_000_000  # clip batches draw training samples far from the image batches' indices


COUNT_INDEX_BASE = 20_000_000  # extra count questions draw scenes far from the other batches' indices
COUNT_SCAN = 10_000  # indices each step may look through for them
EVEN_COUNTS = data.COUNT_WORDS[:3]


def count_samples(cfg: TrainConfig, step: int, n: int, max_objects: int) -> list[data.Sample]:
    """n count questions whose answers are drawn evenly from EVEN_COUNTS (those max_objects allows).
    In the natural mix ~60 % of count answers are "one" and ~10 % "three", which lets a model score
    well on counts without telling two from three. Each step scans its own block of indices, so a
    resumed run draws the same questions."""
    rng = np.random.default_rng([cfg.seed, step])
    wanted = EVEN_COUNTS[:max_objects]
    index, end, found = COUNT_INDEX_BASE + step * COUNT_SCAN, COUNT_INDEX_BASE + (step + 1) * COUNT_SCAN, []
    for answer in rng.choice(wanted, n):
        while True:
            if index >= end:
                raise RuntimeError(f"no count question answered {answer!r} in step {step}'s block of indices")
            sample = data.sample(cfg.seed, "train", index, max_objects=max_objects, kind="count")
            index += 1
            if sample.answer == answer:
                found.append(sample)
                break
    return found


def clip_step(step: int, cfg: TrainConfig) -> bool:
    return cfg.clip_every > 0 and step >= cfg.pre_steps and step % cfg.clip_every == cfg.clip_every - 1


def clip_batch(cfg: TrainConfig, first: int, max_objects: int) -> tuple[list[data.Sample], list[list]]:
    """Half a batch of moving clips (2..clip_frames frames, half the images of a batch per frame
    pair) from training samples whose answer survives motion (clips.VIDEO_KINDS); the moving
    object is the queried one (the first object for a "no") and slides 28 px per frame in one of
    four directions."""
    rng = np.random.default_rng([cfg.seed, first])
    samples, clips, index = [], [], CLIP_INDEX_BASE + first
    while len(samples) < max(1, cfg.batch_size // 2):
        sample = data.sample(cfg.seed, "train", index, max_objects=max_objects)
        index += 1
        if sample.kind not in clips_module.VIDEO_KINDS:
            continue
        step = [(28, 0), (-28, 0), (0, 28), (0, -28)][rng.integers(4)]
        frames = int(rng.integers(2, cfg.clip_frames + 1))
        samples.append(sample)
        clips.append(clips_module.moving_clip(sample, frames, step))
    return samples, clips


def max_objects_at(step: int, cfg: TrainConfig) -> int:
    if step < cfg.pre_steps:
        return data.MAX_OBJECTS
    return min(data.MAX_OBJECTS, 1 + max(0, step - cfg.pre_steps) // cfg.curriculum_steps)


# ----------------------------------------------------------------------------- saving
def export(model, processor, folder: Path, info: dict) -> None:
    """Save model + processor as a standard HF folder (weights stored as float16,
    ``checkpoint.store_half``), replacing `folder` in one rename so a reader never sees a
    half-written checkpoint."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    store_half(staging)
    processor.save_pretrained(staging)
    (staging / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    retired = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


def exported_accuracy(folder: Path, info: dict) -> float:
    """Validation accuracy of the model already in `folder` on the same validation subset (same
    seed, size and data vocabulary), or -1: a new run never replaces a better shipped model with
    its early, worse ones, and a model scored on other data is not compared."""
    path = folder / "training.json"
    if not path.exists():
        return -1.0
    old = json.loads(path.read_text())
    same_subset = all(old.get(k) == info[k] for k in ("data_seed", "val_samples", "vocabulary"))
    return old.get("val_acc", -1.0) if same_subset else -1.0


def export_info(cfg: TrainConfig, run: Path, step: int, next_index: int, result: dict) -> dict:
    """training.json of an exported model: where it came from and how it scored."""
    return {"step": step, "train_samples_seen": next_index, "data_seed": cfg.seed, "val_samples": cfg.eval_samples,
            "vocabulary": data.vocabulary(), "run": str(run), "config": asdict(cfg), **result}


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def parse_args(argv: list[str]) -> tuple[TrainConfig, dict, bool]:
    parser = argparse.ArgumentParser(prog="python -m model train", description=__doc__.split("\n\n")[0])
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "init_parts":
            parser.add_argument(flag, choices=("all", "vision"), default=f.default,
                                help="what --init-from loads (vision: tower + projector, the decoder starts fresh)")
        elif f.name == "reduction":
            parser.add_argument(flag, choices=("none", "duet"), default=f.default,
                                help="token reduction in the training forward (duet: V2V + T2V at --budget)")
        elif f.name == "late_drop":
            parser.add_argument(flag, type=float, default=f.default,
                                help="share of full-token steps that keep a random 0, 1/4 or 1/2 of the visual "
                                     "tokens from a random layer in [L/2, L) on")
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    for name in SPEC_FLAGS:
        default = getattr(SHIPPED_SPEC, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help="model geometry (ignored when resuming: the run's spec is kept)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue from <out>/state.pt when it exists (default)")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    spec = {name: args.pop(name) for name in SPEC_FLAGS}
    return TrainConfig(**args), spec, resume


def check(cfg: TrainConfig, spec: TinyLlavaSpec) -> None:
    if not 0 <= cfg.late_drop <= 1 or (cfg.late_drop and cfg.reduction != "none"):
        raise ValueError("--late-drop is a share of full-token steps (0..1) and needs --reduction none")
    if min(cfg.early_drop, cfg.object_drop) < 0 or cfg.late_drop + cfg.early_drop + cfg.object_drop > 1 or (
            (cfg.early_drop or cfg.object_drop) and cfg.reduction != "none"):
        raise ValueError("--early-drop and --object-drop are shares of full-token steps (with --late-drop at most 1 "
                         "together) and need --reduction none")
    if cfg.clip_every and cfg.reduction != "none":
        raise ValueError("clip batches train with full tokens only (the batched DUET forward is single-image)")
    if cfg.redraw_answers and not cfg.init_from:
        raise ValueError("--redraw-answers restarts rows of a trained model: it needs --init-from")
    if cfg.init_vision_from and (not cfg.init_from or cfg.init_parts != "all"):
        raise ValueError("--init-vision-from puts a tower under a trained decoder: it needs --init-from "
                         "with --init-parts all")
    if cfg.pre_crops and not 3 <= cfg.pre_crops <= spec.image_size // spec.patch_size:
        raise ValueError("--pre-crops must be 0 (whole images) or a window of 3..24 patches")
    if not 0 <= cfg.count_share < 1:
        raise ValueError("--count-share is a share of each image batch, in [0, 1)")
    if cfg.clip_every and cfg.clip_frames < 2:
        raise ValueError("--clip-frames must be at least 2")
    if max(cfg.bind_layer, cfg.ask_layer, cfg.count_layer, cfg.point_layer) >= spec.text_layers // 2:
        raise ValueError("--bind-layer, --ask-layer, --count-layer and --point-layer must come before the first "
                         "stage layer (L/2)")
    if cfg.state_layer >= spec.text_layers // 2:
        raise ValueError("--state-layer must be -1 (the final state) or come before the first stage layer (L/2)")
    if not (0 <= cfg.count_head < spec.text_heads and 0 <= cfg.point_head < spec.text_heads):
        raise ValueError(f"--count-head and --point-head must name one of the decoder's {spec.text_heads} heads")
    if (cfg.count_exist or cfg.count_spread) and not cfg.count_weight:
        raise ValueError("--count-exist and --count-spread change the count head's target: they need --count-weight")
    if cfg.count_weight and cfg.point_weight and (cfg.count_layer, cfg.count_head) == (cfg.point_layer, cfg.point_head):
        raise ValueError("--count-weight and --point-weight supervise the same head: give them different heads")
    if spec.text_layers < 12 or spec.text_layers % 4:
        raise ValueError("text layers must be a multiple of 4 and >= 12 (stage layers at L/4, L/2, 3L/4)")
    if min(cfg.batch_size, cfg.steps, cfg.eval_samples, cfg.curriculum_steps, cfg.save_every,
           cfg.eval_every, cfg.log_every, cfg.warmup) < 1:
        raise ValueError("batch size, steps and intervals must be positive")


# ----------------------------------------------------------------------------- main loop
def train_main(argv: list[str]) -> int:
    cfg, spec_fields, resume = parse_args(argv)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"
    state = torch.load(state_path, weights_only=False) if resume and state_path.exists() else None
    spec = TinyLlavaSpec(**(state["spec"] if state else {**asdict(SHIPPED_SPEC), **spec_fields}))
    check(cfg, spec)

    processor = build_processor(spec.words, spec.image_size, spec.patch_size)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, processor).train()
    heads = AuxHeads(spec.text_hidden, cfg.position_weight, cfg.count_aux_weight, cfg.centre_per_object)
    state_heads = StateHeads(spec.text_hidden, cfg.state_layer) if cfg.state_weight > 0 else None
    read_heads = {}
    if cfg.read_weight > 0:
        read_heads["read"] = ReadHeads(spec.text_hidden, bind_layer(cfg, spec.text_layers))
    if cfg.count_read_weight > 0:
        read_heads["count_read"] = ReadHeads(spec.text_hidden, bind_layer(cfg, spec.text_layers), ("count",))
    engine = DuetLlava(model, processor, "training")
    duet = plan(ReductionConfig("duet", cfg.budget), engine.n_layers, engine.n_patches) if cfg.reduction == "duet" else None
    supervised = supervised_attention(cfg, engine)
    weights = {name: getattr(cfg, f"{name}_weight") for name in [*supervised, "state", *read_heads, "v2v"]}
    extra_heads = {"state_heads": state_heads, **{f"{name}_heads": h for name, h in read_heads.items()}}
    params = [*model.parameters(), *heads.parameters(),
              *(p for h in extra_heads.values() if h is not None for p in h.parameters())]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, next_index, best_acc = 0, 0, -1.0
    init_grid_positions(model)
    if state:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        for key, module in extra_heads.items():
            if module is not None:
                module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step, next_index, best_acc = state["step"], state["next_index"], state["best_acc"]
        torch.set_rng_state(state["torch_rng"])
    elif cfg.init_from:
        from transformers import LlavaForConditionalGeneration

        # Runs do not outlive a machine; the shipped folder does, so a new session can go on from it.
        source = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
        if cfg.init_parts == "vision":
            model.load_state_dict({k: v for k, v in source.state_dict().items() if k.startswith(VISION_PARTS)},
                                  strict=False)
        else:  # text widths (--text-hidden, --text-heads, ...) above the source's widen its decoder
            load_widened(source, model)
            spec = replace(spec, text_norm_eps=model.config.text_config.rms_norm_eps)  # a resumed run rebuilds from spec
        if cfg.init_vision_from:
            tower = LlavaForConditionalGeneration.from_pretrained(cfg.init_vision_from, dtype=torch.float32).state_dict()
            model.load_state_dict({k: v for k, v in tower.items() if k.startswith(VISION_PARTS)}, strict=False)
        if cfg.redraw_answers:
            redraw_rows(model, processor.tokenizer, cfg.redraw_answers.split(","),
                        torch.Generator().manual_seed(cfg.seed))

    log_file = open(run / "train.log", "a")
    metrics_file = open(run / "metrics.jsonl", "a")

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{'resumed at step ' + str(step) if state else 'new run'}: {n_params / 1e6:.2f} M params "
        f"({n_params * 4 / 2**20:.1f} MB fp32), spec {asdict(spec) | {'words': len(spec.words)}}")
    log(f"config {asdict(cfg)}; prior (majority answer per kind) accuracy {prior_accuracy(cfg):.3f}")

    def checkpoint() -> None:
        save_state(state_path, model=model.state_dict(), heads=heads.state_dict(),
                   **{key: None if module is None else module.state_dict() for key, module in extra_heads.items()},
                   optimizer=optimizer.state_dict(), step=step, next_index=next_index, best_acc=best_acc,
                   torch_rng=torch.get_rng_state(), spec=asdict(spec), config=asdict(cfg))

    counted_kinds = ("count", "exist") if cfg.count_exist else ("count",)
    drops = {name: (share, make) for name, share, make in (("late_drop", cfg.late_drop, late_drop_plan),
                                                          ("early_drop", cfg.early_drop, early_drop_plan),
                                                          ("object_drop", cfg.object_drop, object_drop_plan)) if share}
    window: dict[str, list[float]] = {}
    last_result = None
    started = time.perf_counter()
    while step < cfg.steps:
        k = max_objects_at(step, cfg)
        if clip_step(step, cfg):
            samples, clips = clip_batch(cfg, next_index, k)
        else:
            extra = round(cfg.count_share * cfg.batch_size) if step >= cfg.pre_steps else 0
            samples = [data.sample(cfg.seed, "train", i, max_objects=k)
                       for i in range(next_index, next_index + cfg.batch_size - extra)]
            samples += count_samples(cfg, step, extra, k)
            clips = None
        batch = encode(processor, samples, cfg.aux_min_coverage, clips, counted_kinds, cfg.count_spread)
        if step < cfg.pre_steps and cfg.pre_crops:
            pixels, indices, targets = crop_batch(cfg, next_index, batch, samples)
            answer_loss, attention = None, {}
            aux_loss, stats = heads.loss(window_tokens(model, pixels, indices), targets)
        else:
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same draws on resume
            dropping = drops and clips is None and step >= cfg.pre_steps
            draw = float(torch.rand((), generator=generator)) if dropping else 1.0
            chosen, edge = None, 0.0
            for name, (share, _) in drops.items():  # consecutive intervals of [0, 1), one per drop
                edge += share
                if draw < edge:
                    chosen = name
                    break
            answer_loss, aux_loss, attention, stats = forward_losses(
                model, heads, batch, with_answer=step >= cfg.pre_steps, engine=engine,
                duet=drops[chosen][1](engine, generator) if chosen else duet, supervised=supervised,
                generator=generator, state_heads=state_heads, v2v=cfg.v2v_weight > 0, read_heads=read_heads)
            stats |= {name: float(name == chosen) for name in drops}
        loss = cfg.aux_weight * aux_loss + (answer_loss if answer_loss is not None else 0.0)
        for name, value in attention.items():
            if value is not None:
                loss = loss + weights[name] * value
                stats[f"{name}_loss"] = value.item()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        next_index += cfg.batch_size

        stats |= {"aux_loss": aux_loss.item(), "step_s": time.perf_counter() - started}
        if answer_loss is not None:
            stats["answer_loss"] = answer_loss.item()
        for name, value in stats.items():
            window.setdefault(name, []).append(value)
        started = time.perf_counter()
        if step % cfg.log_every == 0:
            means = {name: sum(v) / len(v) for name, v in window.items()}
            log(f"step {step} objects<={k} lr {lr:.2e} " + " ".join(f"{n} {v:.3f}" for n, v in means.items()))
            metrics_file.write(json.dumps({"step": step, "lr": lr, "max_objects": k, **means}) + "\n")
            metrics_file.flush()
            window = {}
        if step > cfg.pre_steps and step % cfg.eval_every == 0 or step == cfg.steps:  # no answers to score before
            result = last_result = evaluate(model, processor, cfg)
            improved = result["val_acc"] > best_acc
            best_acc = max(best_acc, result["val_acc"])
            exported = []
            if improved:
                info = export_info(cfg, run, step, next_index, result)
                exported.append(run / "best")
                if cfg.export and result["val_acc"] > exported_accuracy(Path(cfg.export), info):
                    exported.append(Path(cfg.export))
                for folder in exported:
                    export(model, processor, folder, info)
            log(f"eval step {step} " + " ".join(f"{n} {v:.3f}" for n, v in result.items())
                + (f" (new best, exported to {', '.join(map(str, exported))})" if exported else ""))
            metrics_file.write(json.dumps({"step": step, **result}) + "\n")
            metrics_file.flush()
            checkpoint()
            started = time.perf_counter()
        elif step % cfg.save_every == 0:
            checkpoint()
    checkpoint()
    # The last weights too, whatever their score: a twin trained with DUET is judged at its own
    # budget, not by the full-token validation that picks "best". Re-running a finished run's
    # command only writes this folder.
    # The loop's last evaluation is at the final step; a finished run re-run scores once here.
    final_result = last_result if last_result is not None else evaluate(model, processor, cfg)
    export(model, processor, run / "final", export_info(cfg, run, step, next_index, final_result))
    log(f"done at step {step}; best validation accuracy {best_acc:.3f}; last weights in {run / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
