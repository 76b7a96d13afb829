"""Train a tiny DUET-LLaVA on synthetic scenes from a recipe: ``python -m model train --recipe NAME``.

A recipe (``recipes/NAME.toml``) names the model's shape, the folder it starts from (``parent``;
none: from scratch), where the result goes (``export``) and a chain of stages, each a
``StageConfig`` with one ``objective``:

- **patches**: the vision tower and projector learn per-patch labels (``AuxHeads``) on W x W-patch
  windows cut around objects (``windows = W``, ``batches.windows``); the decoder does not run.
- **clip**: the tower's pooled CLS output learns to match its scene's caption against in-batch and
  hard-negative captions (``clip``), with the per-patch labels beside it (``aux_weight``).
- **lm**: the whole model on full scenes, cross-entropy on the answer (a one-word answer, or a
  caption for the share ``captions`` of a batch asked "describe the image ."), through the same
  decoder loop inference uses (``model.decoder.run``) with the stage's token reduction
  (``reduction``, ``budget``) applied as at inference; DUET ranks by every prompt row after the
  image, as the authors' training code does.

``freeze`` names the parts that do not learn in a stage ("tower", "projector", "decoder"); LLaVA
freezes its CLIP tower after pre-training, and so do the recipes. No loss touches an attention
map: nothing pushes the CLS attention V2V, VisionZip and HiRED rank by, or the text-to-image
attention T2V, FastV, PyramidDrop and FitPrune rank by, toward the objects; ``losses`` names what
each stage optimises, and ``training.json`` records it. So the shipped model favours no method's
ranking.

A run lives in ``<out>/<stage>/`` (``state.pt`` every ``save_every`` steps, ``train.log``,
``final/``); re-running the command resumes where it stopped and skips finished stages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging as hf_logging

from .. import decoder
from ..budget import ReductionConfig, plan
from ..checkpoint import TinyLlavaSpec, build_model, build_processor, store_half
from ..device import Timer
from ..engine import DuetLlava
from . import captions, scenes
from .batches import encode, windows
from .clip import Clip, batch_texts, retrieval

RECIPES = Path(__file__).resolve().parent / "recipes"
ROOT = Path(__file__).resolve().parents[2]
HEADS = {"colour": len(scenes.COLOURS) + 1, "shape": len(scenes.SHAPES) + 1, "centre": 2, "across": 3, "updown": 3}
OBJECTIVES = ("patches", "clip", "lm")
PARTS = ("tower", "projector", "decoder")


@dataclass
class StageConfig:
    name: str
    steps: int
    objective: str = "lm"  # one of OBJECTIVES
    freeze: list[str] = field(default_factory=list)  # parts (PARTS) that do not learn
    lr: float = 1e-3
    batch_size: int = 8
    warmup: int = 100
    min_lr_frac: float = 0.1  # cosine decay to this share of lr
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    windows: int = 8  # the patches objective: windows of this many patches a side
    curriculum: int = 0  # > 0: scenes hold at most 1 + step // curriculum objects (up to 6)
    captions: float = 0.0  # lm: the share of a batch asked for the caption instead of a question
    negatives: int = 7  # clip: hard-negative captions per scene
    reduction: str = "full"  # a method of model.budget, applied in the training forward
    budget: int = 576
    aux_weight: float = 1.0
    eval_every: int = 500
    eval_samples: int = 256
    save_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"stage {self.name}: objective {self.objective!r} is not one of {OBJECTIVES}")
        if unknown := set(self.freeze) - set(PARTS):
            raise ValueError(f"stage {self.name}: cannot freeze {sorted(unknown)}; parts: {PARTS}")

    def losses(self) -> list[str]:
        """What this stage optimises, in words (``training.json``)."""
        patches = f"per-patch labels from the object masks ({', '.join(HEADS)}) on the projected patches"
        weighted = [f"{self.aux_weight} x {patches}"] if self.aux_weight else []
        if self.objective == "patches":
            return [f"{patches}, on {self.windows} x {self.windows}-patch windows"]
        if self.objective == "clip":
            return [f"symmetric InfoNCE between the tower's pooled CLS output and its caption, in-batch "
                    f"and {self.negatives} hard-negative captions per scene", *weighted]
        said = ["answer cross-entropy"] if self.captions < 1 else []
        return said + (["caption cross-entropy"] if self.captions else []) + weighted


@dataclass
class Recipe:
    name: str
    export: str  # folder the last stage's model is copied to, relative to the repository
    parent: str  # folder the first stage starts from ("": a fresh model of ``model``'s shape)
    model: dict = field(default_factory=dict)  # TinyLlavaSpec fields
    stages: list[StageConfig] = field(default_factory=list)

    @classmethod
    def load(cls, name: str) -> "Recipe":
        """A recipe by name (``recipes/NAME.toml``) or by the path of a .toml file."""
        path = Path(name) if name.endswith(".toml") else RECIPES / f"{name}.toml"
        if not path.exists():
            known = sorted(p.stem for p in RECIPES.glob("*.toml"))
            raise FileNotFoundError(f"no recipe {name!r}; recipes: {', '.join(known)}")
        raw = tomllib.loads(path.read_text())
        allowed = {f.name for f in fields(StageConfig)}
        for stage in raw.get("stage", []):
            if unknown := set(stage) - allowed:
                raise ValueError(f"recipe {name}: unknown stage keys {sorted(unknown)}")
        return cls(path.stem, raw["export"], raw.get("parent", ""), raw.get("model", {}),
                   [StageConfig(**stage) for stage in raw["stage"]])


class AuxHeads(nn.Module):
    """Linear classifiers of each projected patch token (B, P, d). Background and object patches
    are averaged apart: objects cover a few % of the patches, so "all background" is no cheap minimum."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in HEADS.items()})

    def forward(self, tokens: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        total, stats = tokens.new_zeros(()), {}
        for name, head in self.heads.items():
            logits, target = head(tokens).flatten(0, 1), targets[name].flatten()
            ce = F.cross_entropy(logits, target, reduction="none")
            positive = target > 0
            total = total + ce[~positive].mean() + (ce[positive].mean() if positive.any() else 0.0)
            stats[f"{name}_recall"] = (logits.argmax(-1) == target)[positive].float().mean().item()
        return total, stats


def answer_forward(engine: DuetLlava, batch: dict, cfg: StageConfig):
    """(answer loss, per-sequence exact match (B,), every patch projected (B, P, d), the decoder's
    ``Output``) with the stage's reduction, through ``decoder.run``. A frozen tower's states
    carry no graph."""
    ids, labels = batch["input_ids"].to(engine.device), batch["labels"].to(engine.device)
    real = batch["attention_mask"].to(engine.device).bool()
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("training batches must be right-padded")
    p = plan(ReductionConfig(cfg.reduction, cfg.budget, query="text"), engine.n_layers, engine.n_patches)
    with torch.set_grad_enabled(torch.is_grad_enabled() and tower_learns(engine)):
        hidden = engine.vision_states(batch["pixel_values"])
    visual = engine.reduce(hidden, p, Timer(engine.device))
    batch_size, n = len(ids), visual.tokens_per_frame[0]
    every_patch = (visual.features.view(batch_size, n, -1) if p.k1 is None
                   else engine.projector(hidden[engine.feature_index][:, 1:]))
    is_image = ids == engine.image_token_id
    keep = ~is_image | (is_image.long().cumsum(1) - 1 < n)
    ids, labels, real = (t[keep].view(batch_size, -1) for t in (ids, labels, real))
    is_visual = ids == engine.image_token_id
    h = engine.lm.embed_tokens(ids).masked_scatter(is_visual[..., None], visual.features.view(batch_size, n, -1))
    index = torch.arange(ids.shape[1], device=ids.device).expand(batch_size, -1)
    prompt = real & (labels == -100)
    salient = torch.zeros_like(is_visual)
    new_index = keep.long().cumsum(1) - 1
    for b, rows in enumerate(batch["salient"]):
        salient[b, new_index[b, torch.tensor(rows, device=ids.device)]] = True
    queries = {"salient": salient, "text": prompt & (index > index.masked_fill(~is_visual, -1).amax(1, keepdim=True)),
               "last": index == prompt.sum(1, keepdim=True) - 1, "all": real}
    rows = decoder.Rows.build(is_visual, index, queries)
    out = decoder.run(engine.lm, h, rows, p, engine.apply_rope, mask=engine.attention_mask)
    logits = engine.lm_head(engine.lm.norm(out.hidden))[:, :-1].float()
    targets = labels.gather(1, out.rows.origin)[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    correct = ((logits.argmax(-1) == targets) | (targets == -100)).all(1)
    return loss, correct, every_patch, out


def tower_learns(engine: DuetLlava) -> bool:
    return any(p.requires_grad for p in engine.vision.parameters())


def lr_at(step: int, cfg: StageConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def scene_batch(cfg: StageConfig, step: int) -> list[scenes.Sample]:
    """The step's training scenes; in an lm stage, the share ``captions`` of them (drawn per
    scene) asks for the caption instead of the scene's question."""
    most = min(scenes.MAX_OBJECTS, 1 + step // cfg.curriculum) if cfg.curriculum else scenes.MAX_OBJECTS
    first = step * cfg.batch_size
    batch = [scenes.sample(cfg.seed, "train", i, max_objects=most) for i in range(first, first + cfg.batch_size)]
    if cfg.objective != "lm" or not cfg.captions:
        return batch
    asked = np.random.default_rng([cfg.seed, step, 1]).random(len(batch)) < cfg.captions
    return [captions.as_caption(s) if a else s for s, a in zip(batch, asked)]


@torch.no_grad()
def evaluate(engine: DuetLlava, cfg: StageConfig, clip: Clip | None = None) -> dict:
    """Exact-match accuracy on the first ``eval_samples`` validation questions, under the stage's
    reduction, and on as many validation captions when the stage learns captions. Teacher-forced:
    greedy decoding emits "answer</s>" exactly when the argmax at every answer position is the
    answer token, so this is greedy accuracy in one forward pass. A clip stage reports zero-shot
    caption retrieval instead (the true caption among itself and 7 hard negatives)."""
    engine.model.eval()
    val = [scenes.sample(cfg.seed, "val", i) for i in range(cfg.eval_samples)]
    if cfg.objective == "clip":
        hits = []
        for start in range(0, len(val), 16):
            chunk = val[start:start + 16]
            pixels = encode(engine.processor, chunk)["pixel_values"]
            pooled = engine.vision(pixels.to(engine.device)).pooler_output
            hits += retrieval(clip, engine.processor.tokenizer, pooled, chunk, np.random.default_rng([cfg.seed, start]))
        engine.model.train()
        return {"val_retrieval": sum(hits) / len(hits)}
    by_kind: dict[str, list[bool]] = {}
    asked = val + ([captions.as_caption(s) for s in val] if cfg.captions else [])
    for start in range(0, len(asked), 16):
        samples = asked[start:start + 16]
        _, correct, _, _ = answer_forward(engine, encode(engine.processor, samples), cfg)
        for s, ok in zip(samples, correct.tolist()):
            by_kind.setdefault(s.kind, []).append(ok)
    engine.model.train()
    every = [ok for kind, oks in by_kind.items() if kind != "caption" for ok in oks]
    return {"val_acc": sum(every) / len(every), **{f"val_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())}}


def init_grid_positions(model, scale: float = 0.5) -> None:
    """Start the tower's learned position embeddings at 2D sine-cosine values of each patch's
    (row, col), CLS at zero: shape and position labels need a token to know where it is."""
    table = model.model.vision_tower.embeddings.position_embedding.weight
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    freqs = 1.0 / 100 ** (torch.arange(table.shape[1] // 4) / (table.shape[1] // 4))
    grid = torch.cat([f(axis.flatten()[:, None] * freqs) for axis in (rows, cols) for f in (torch.sin, torch.cos)], 1)
    with torch.no_grad():
        table.zero_()
        table[1:, : grid.shape[1]] = scale * grid


def export(engine: DuetLlava, folder: Path, info: dict) -> None:
    """A standard HF folder (weights stored as float16, ``checkpoint.store_half``), swapped in
    with one rename so a reader never sees a half-written checkpoint."""
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    engine.model.save_pretrained(staging)
    store_half(staging)
    engine.processor.save_pretrained(staging)
    (staging / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(folder)


def start_model(recipe: Recipe, source: Path | None, run: Path) -> DuetLlava:
    """The previous stage's model (or the recipe's parent); without one, a fresh model of the
    recipe's shape, saved to ``run/init`` first so it loads as every checkpoint does."""
    if source is None:
        source = run / "init"
        torch.manual_seed(recipe.stages[0].seed)
        spec = TinyLlavaSpec(**recipe.model, words=captions.vocabulary())
        processor = build_processor(spec.words, spec.image_size, spec.patch_size)
        model = build_model(spec, processor)
        init_grid_positions(model)
        model.save_pretrained(source)
        processor.save_pretrained(source)
    return DuetLlava.load(source, device="cpu")


def trainable(engine: DuetLlava, cfg: StageConfig) -> list[nn.Parameter]:
    """The stage's learning parameters of the model; frozen parts get ``requires_grad = False``
    (and the rest True), so a frozen tower runs without a graph (``tower_learns``)."""
    parts = {"tower": engine.vision, "projector": engine.projector, "decoder": [engine.lm, engine.lm_head]}
    if cfg.objective != "lm":  # the decoder does not run
        parts["decoder"] = []
    chosen = []
    for name in PARTS:
        modules = parts[name] if isinstance(parts[name], list) else [parts[name]]
        for module in modules:
            module.requires_grad_(name not in cfg.freeze)
            if name not in cfg.freeze:
                chosen += list(module.parameters())
    return chosen


def stage_loss(engine: DuetLlava, heads: AuxHeads, clip: Clip | None, cfg: StageConfig, step: int):
    """(loss, the aux loss, stats) of one training step."""
    samples = scene_batch(cfg, step)
    batch = encode(engine.processor, samples)
    rng = np.random.default_rng([cfg.seed, step])
    if cfg.objective == "patches":
        pixels, patches, targets = windows(batch, samples, cfg.windows, rng)
        hidden = engine.vision_states(pixels, patches=patches)
        aux, stats = heads(engine.projector(hidden[engine.feature_index][:, 1:]), targets)
        return aux, aux, stats
    if cfg.objective == "clip":
        out = engine.vision(batch["pixel_values"].to(engine.device), output_hidden_states=True)
        aux, stats = heads(engine.projector(out.hidden_states[engine.feature_index][:, 1:]), batch)
        texts = clip.text_embeddings(engine.processor.tokenizer, batch_texts(samples, rng, cfg.negatives))
        contrastive, clip_stats = clip.loss(clip.image_embeddings(out.pooler_output), texts, len(samples))
        return contrastive + cfg.aux_weight * aux, aux, stats | clip_stats | {"clip_loss": contrastive.item()}
    answer, correct, every_patch, _ = answer_forward(engine, batch, cfg)
    aux, stats = heads(every_patch, batch) if cfg.aux_weight else (answer.new_zeros(()), {})
    return (answer + cfg.aux_weight * aux, aux,
            stats | {"answer_loss": answer.item(), "train_acc": correct.float().mean().item()})


def train_stage(engine: DuetLlava, cfg: StageConfig, folder: Path, log) -> tuple[dict, float, Clip | None]:
    """Run one stage to ``cfg.steps`` (resuming from ``folder/state.pt``); returns its last
    evaluation, its wall time in seconds, summed over every session that ran it, and the clip
    stage's text encoder and projections (None for other stages)."""
    torch.manual_seed(cfg.seed)
    model = engine.model.train()
    heads = AuxHeads(engine.projector.linear_2.out_features)
    clip = Clip(len(engine.processor.tokenizer), engine.vision.config.hidden_size) if cfg.objective == "clip" else None
    params = trainable(engine, cfg) + list(heads.parameters()) + (list(clip.parameters()) if clip else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, result, seconds, state_path = 0, {}, 0.0, folder / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        if clip:
            clip.load_state_dict(state["clip"])
        optimizer.load_state_dict(state["optimizer"])
        step, result, seconds = state["step"], state["result"], state["seconds"]
        log(f"{cfg.name}: resumed at step {step}")
    started = session = time.perf_counter()
    while step < cfg.steps:
        loss, aux, stats = stage_loss(engine, heads, clip, cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        if step % 10 == 0:
            log(f"{cfg.name} step {step} lr {lr_at(step - 1, cfg):.2e} aux {aux.item():.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in stats.items())
                + f" {(time.perf_counter() - started) / 10:.2f} s/step")
            started = time.perf_counter()
        last = step == cfg.steps
        if cfg.objective != "patches" and (step % cfg.eval_every == 0 or last):
            result = evaluate(engine, cfg, clip)
            log(f"{cfg.name} eval step {step} " + " ".join(f"{k} {v:.3f}" for k, v in result.items()))
        if step % cfg.save_every == 0 or last:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "step": step,
                        "clip": clip.state_dict() if clip else None,
                        "optimizer": optimizer.state_dict(), "result": result,
                        "seconds": seconds + time.perf_counter() - session}, tmp)
            os.replace(tmp, state_path)
            started = time.perf_counter()
    return result, seconds + time.perf_counter() - session, clip


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m model train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help=f"a recipe in {RECIPES.relative_to(ROOT)}")
    parser.add_argument("--out", help="run folder (default: runs/<recipe>)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    recipe = Recipe.load(args.recipe)
    run = Path(args.out or ROOT / "runs" / recipe.name)
    run.mkdir(parents=True, exist_ok=True)
    log_file = open(run / "train.log", "a")

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    source = ROOT / recipe.parent if recipe.parent else None
    spent = {}
    for cfg in recipe.stages:
        final = run / cfg.name / "final"
        if not final.exists():
            (run / cfg.name).mkdir(exist_ok=True)
            engine = start_model(recipe, source, run)
            result, seconds, clip = train_stage(engine, cfg, run / cfg.name, log)
            if clip:
                torch.save(clip.state_dict(), run / cfg.name / "clip.pt")
            export(engine, final, {"recipe": recipe.name, "stage": cfg.name, "config": asdict(cfg),
                                   "losses": cfg.losses(), "wall_s": round(seconds), **result})
        spent[cfg.name] = json.loads((final / "training.json").read_text())["wall_s"]
        source = final
    last = recipe.stages[-1]
    engine = DuetLlava.load(source, device="cpu")  # as stored: the accuracy recorded is the shipped weights'
    result = evaluate(engine, last)
    info = {"recipe": recipe.name, "parent": recipe.parent or None, "model": recipe.model,
            "stages": [asdict(s) | {"losses": s.losses()} for s in recipe.stages], "wall_s": spent,
            "threads": args.threads, "vocabulary": captions.vocabulary(), "data_seed": last.seed,
            "val_samples": last.eval_samples, "val_reduction": {"method": last.reduction, "budget": last.budget,
                                                                "query": "text"}, **result}
    export(engine, ROOT / recipe.export, info)
    log(f"recipe {recipe.name} done: {ROOT / recipe.export} ({json.dumps(info['wall_s'])} s)")
    return 0
