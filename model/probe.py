"""Linear probes on the visual tokens a checkpoint's decoder reads (EVAL.md, *Reading*).

``python -m model probe --model F``: for every object patch of ``--scenes`` training scenes, take
the projector output (`get_image_features`, what replaces <image>) and fit one multinomial
logistic regression per patch target of `data.patch_labels` (colour, shape, and the image half of
the patch's object: across = left/right, updown = top/bottom). Scenes, not patches, are split
70 / 30 into fit and held-out sets, so an object's patches never sit on both sides. A target the
tokens do not carry scores near the held-out majority share, which is printed beside it.
``--tower-layers`` probes each vision encoder layer too: where along the tower a target is lost.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from . import data

PROBED = ("colour", "shape", "across", "updown")


@torch.no_grad()
def object_patch_features(model, processor, scenes: int, seed: int = 0, tower_layers: bool = False):
    """({where: features (N, d)}, {target: (N,) class ids}, scene index (N,)) over the object patches
    (`data.patch_labels` with coverage >= 0.5) of training scenes 0..scenes-1. ``where`` is
    "projector" (the tokens the decoder reads) and, with ``tower_layers``, "tower 0" (the embeddings
    after the pre-norm) to "tower N" (each vision encoder layer's output)."""
    features, labels, owner = {}, {name: [] for name in PROBED}, []
    for index in range(scenes):
        sample = data.sample(seed, "train", index)
        pixels = processor.image_processor(sample.image, return_tensors="pt")["pixel_values"].to(model.dtype)
        targets = {name: torch.from_numpy(grid.reshape(-1)) for name, grid in
                   data.patch_labels(sample.objects, min_coverage=0.5).items()}
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


def probe(model_path: str, scenes: int = 120, seed: int = 0, tower_layers: bool = False) -> dict:
    """{where: {target: fit_probe result}} for a checkpoint folder."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = LlavaForConditionalGeneration.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    features, labels, owner = object_patch_features(model, processor, scenes, seed, tower_layers)
    torch.manual_seed(seed)
    fit = torch.isin(owner, torch.randperm(scenes)[: int(0.7 * scenes)])
    return {where: {name: fit_probe(x, y, fit) for name, y in labels.items()} for where, x in features.items()}


def probe_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m model probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/duet-llava-tiny")
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower-layers", action="store_true", help="also probe the vision tower's hidden states")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
