"""Linear probes on the visual tokens a checkpoint's decoder reads (EVAL.md, *Reading*).

``python -m model probe --model F``: for every object patch of ``--scenes`` training scenes, take
the projector output (`get_image_features`, what replaces <image>) and fit one multinomial
logistic regression per patch target of `scenes.patch_labels` (colour, shape, and the image half of
the patch's object: across = left/right, updown = top/bottom). Scenes, not patches, are split
70 / 30 into fit and held-out sets, so an object's patches never sit on both sides. A target the
tokens do not carry scores near the held-out majority share, which is printed beside it.
``--tower-layers`` probes each vision encoder layer too: where along the tower a target is lost.

``--pair-swap N`` asks the first N validation position questions twice, as generated and with the
offered pair swapped ("on the left or right" <-> "at the top or bottom"), and reports the answer
probability the model puts on the offered pair and how far its distribution over the four
position words moves between the two phrasings (total variation). A model that does not read the
offered pair moves it by ~0 (the model shipped until this flag existed: 0.00 to three decimals).

``--cls-profile N`` profiles the tower's CLS attention on N test scenes, as V2V, VisionZip and
HiRED read it (``DuetLlava.cls_scores``: the feature layer's CLS row, summed over heads, CLS column
dropped), normalised over the 576 patches: its entropy as a share of a uniform map's, the share of
the mass on the top 10 % of patches, the share on object patches (``scenes.object_patches``)
against the share of patches that are object ("enrichment" is their ratio), and the mass the CLS
row keeps on itself.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from . import scenes

PROBED = ("colour", "shape", "across", "updown")


@torch.no_grad()
def object_patch_features(model, processor, n_scenes: int, seed: int = 0, tower_layers: bool = False):
    """({where: features (N, d)}, {target: (N,) class ids}, scene index (N,)) over the object patches
    (`scenes.patch_labels` with coverage >= 0.5) of training scenes 0..n_scenes-1. ``where`` is
    "projector" (the tokens the decoder reads) and, with ``tower_layers``, "tower 0" (the embeddings
    after the pre-norm) to "tower N" (each vision encoder layer's output)."""
    features, labels, owner = {}, {name: [] for name in PROBED}, []
    for index in range(n_scenes):
        sample = scenes.sample(seed, "train", index)
        pixels = processor.image_processor(sample.image, return_tensors="pt")["pixel_values"].to(model.dtype)
        targets = {name: torch.from_numpy(grid.reshape(-1)) for name, grid in
                   scenes.patch_labels(sample.objects, min_coverage=0.5).items()}
        on_object = targets["colour"] > 0
        out = model.model.get_image_features(pixel_values=pixels, output_hidden_states=tower_layers)
        found = {"projector": out.pooler_output[0]}
        if tower_layers:  # the same tower pass's hidden states, CLS dropped
            found |= {f"tower {k}": h[0, 1:] for k, h in enumerate(out.hidden_states)}
        for where, tokens in found.items():
            features.setdefault(where, []).append(tokens.float()[on_object])
        for name in PROBED:
            labels[name].append(targets[name][on_object])
        owner.append(torch.full((int(on_object.sum()),), index))
    return ({where: torch.cat(v) for where, v in features.items()}, {name: torch.cat(v) for name, v in labels.items()},
            torch.cat(owner))


def fit_probe(x: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, steps: int = 300) -> dict:
    """Held-out accuracy of a logistic regression on standardised x, and the held-out majority share."""
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mean) / std
    classes = int(y.max()) + 1
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(layer(x[fit]), y[fit]).backward()
            optimizer.step()
    held = ~fit
    accuracy = (layer(x[held]).argmax(-1) == y[held]).float().mean().item()
    majority = torch.bincount(y[held], minlength=classes).max().item() / int(held.sum())
    return {"accuracy": accuracy, "majority": majority, "held_out": int(held.sum())}


PAIRS = ("on the left or right", "at the top or bottom")


def swap_pair(question: str) -> str:
    """The position question with the other pair of answers offered."""
    for offered, other in (PAIRS, PAIRS[::-1]):
        if offered in question:
            return question.replace(offered, other)
    raise ValueError(f"not a position question: {question!r}")


def offered_words(question: str) -> tuple[str, str]:
    return ("left", "right") if PAIRS[0] in question else ("top", "bottom")


@torch.no_grad()
def pair_swap(model, processor, questions: int, seed: int = 0) -> dict:
    """Offered-pair probability mass for the first ``questions`` validation position questions as
    generated ("asked") and with the pair swapped ("swapped"), the mean total variation between
    the two distributions over the four position words, and the greedy accuracy as asked."""
    from .batches import conversation

    tok = processor.tokenizer
    words = list(scenes.CHOICE_WORDS)
    ids = tok.convert_tokens_to_ids(words)
    mass, moved, correct, index = {"asked": [], "swapped": []}, [], [], 0
    while len(moved) < questions:
        sample = scenes.sample(seed, "val", index)
        index += 1
        if sample.kind != "position":
            continue
        rows = {}
        for name, question in (("asked", sample.question), ("swapped", swap_pair(sample.question))):
            text = processor.apply_chat_template(conversation(question), add_generation_prompt=True)
            inputs = processor(images=sample.image, text=text, return_tensors="pt")
            logits = model(**inputs).logits[0, -1].float()
            probs = logits.softmax(-1)
            rows[name] = probs[ids]
            mass[name].append(sum(probs[ids[words.index(w)]] for w in offered_words(question)).item())
            if name == "asked":
                correct.append(tok.convert_ids_to_tokens(int(logits.argmax())) == sample.answer)
        moved.append(0.5 * (rows["asked"] - rows["swapped"]).abs().sum().item())
    return {"questions": questions, "offered_mass_asked": sum(mass["asked"]) / questions,
            "offered_mass_swapped": sum(mass["swapped"]) / questions,
            "total_variation": sum(moved) / questions, "accuracy": sum(correct) / questions}


@torch.no_grad()
def cls_profile(model_path: str, n_scenes: int, seed: int = 0) -> dict:
    """Mean CLS-attention statistics over test scenes 0..n_scenes-1 (module docstring)."""
    from ..engine import DuetLlava

    engine = DuetLlava.load(model_path, device="cpu")
    rows = []
    for index in range(n_scenes):
        sample = scenes.sample(seed, "test", index)
        pixels = engine.processor.image_processor(sample.image, return_tensors="pt")["pixel_values"]
        hidden = engine.vision_states(pixels)
        scores = engine.cls_scores(hidden[engine.feature_index - 1])[1][0].double()
        heads = engine.vision.config.num_attention_heads
        share = scores / scores.sum()
        objects = sorted(scenes.object_patches(sample, list(range(len(sample.objects)))))
        top = share.topk(len(share) // 10).values.sum()
        rows.append({"entropy": float(-(share * share.clamp_min(1e-30).log()).sum() / torch.log(torch.tensor(len(share)))),
                     "top10_share": float(top), "object_share": float(share[objects].sum()),
                     "object_area": len(objects) / len(share), "cls_self": float(1 - scores.sum() / heads)})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return mean | {"enrichment": mean["object_share"] / mean["object_area"], "scenes": n_scenes}


def load(model_path: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    return (LlavaForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(model_path))


def probe(model_path: str, n_scenes: int = 120, seed: int = 0, tower_layers: bool = False) -> dict:
    """{where: {target: fit_probe result}} for a checkpoint folder."""
    model, processor = load(model_path)
    features, labels, owner = object_patch_features(model, processor, n_scenes, seed, tower_layers)
    torch.manual_seed(seed)
    fit = torch.isin(owner, torch.randperm(n_scenes)[: int(0.7 * n_scenes)])
    return {where: {name: fit_probe(x, y, fit) for name, y in labels.items()} for where, x in features.items()}


def probe_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m model probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/duet-llava-tiny")
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower-layers", action="store_true", help="also probe the vision tower's hidden states")
    parser.add_argument("--pair-swap", type=int, default=0, metavar="N",
                        help="instead: does the answer read the offered pair? (N validation position questions)")
    parser.add_argument("--cls-profile", type=int, default=0, metavar="N",
                        help="instead: the tower's CLS-attention profile on N test scenes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cls_profile:
        result = cls_profile(args.model, args.cls_profile, args.seed)
        print(json.dumps(result) if args.json else
              f"CLS attention over {args.cls_profile} test scenes: entropy {result['entropy']:.3f} of uniform, "
              f"top 10 % of patches hold {result['top10_share']:.3f}, object patches hold {result['object_share']:.3f} "
              f"of the mass on {result['object_area']:.3f} of the area (enrichment {result['enrichment']:.2f}x), "
              f"CLS keeps {result['cls_self']:.3f} on itself")
        return 0
    if args.pair_swap:
        result = pair_swap(*load(args.model), args.pair_swap, args.seed)
        print(json.dumps(result) if args.json else
              f"{args.pair_swap} validation position questions: offered-pair probability "
              f"{result['offered_mass_asked']:.3f} as asked, {result['offered_mass_swapped']:.3f} with the "
              f"pair swapped; total variation between the two over left/right/top/bottom "
              f"{result['total_variation']:.3f}; accuracy as asked {result['accuracy']:.3f}")
        return 0
    results = probe(args.model, args.scenes, args.seed, args.tower_layers)
    if args.json:
        print(json.dumps(results))
        return 0
    held_out = results["projector"][PROBED[0]]["held_out"]
    print(f"held-out linear probe accuracy on {held_out} object patches (majority share)")
    print("| tokens | " + " | ".join(PROBED) + " |")
    print("|---" * (len(PROBED) + 1) + "|")
    for where, by_target in results.items():
        print(f"| {where} | " + " | ".join(f"{r['accuracy']:.3f} ({r['majority']:.3f})" for r in by_target.values()) + " |")
    return 0
