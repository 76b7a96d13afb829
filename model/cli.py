"""Command line: ``python -m model answer ...`` (SPEC §5)."""

from __future__ import annotations

import argparse
import json
import sys

from .budget import METHODS, POSITIONS, QUERIES, VIDEO_LLAVA_DUET, ReductionConfig

DEFAULT_BUDGET = 192
VIDEO_FRAMES = 8  # Video-LLaVA samples 8 frames per clip


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def add_reduction_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="duet")
    parser.add_argument("--budget", type=int, help=f"average visual tokens per LLM layer (default {DEFAULT_BUDGET}; "
                        "with --video and DUET: the Video-LLaVA preset, 160 + 32 tokens per frame; on "
                        "Qwen2.5-VL with DUET or VisionZip: the authors' 540 + 100 tokens per image)")
    parser.add_argument("--k1", type=int, help="V2V dominant tokens per frame, CLS counted on LLaVA, none on Qwen2.5-VL "
                        "(default: solved from budget)")
    parser.add_argument("--k2", type=int, help="V2V contextual (merged) tokens per frame")
    parser.add_argument("--dominant-share", type=float, help="Qwen2.5-VL: V2V dominant tokens as a share of each "
                        "image's tokens (the authors' run_inference.py: 0.65); --k1 wins")
    parser.add_argument("--contextual-share", type=float, help="Qwen2.5-VL: V2V contextual tokens as a share of each "
                        "image's tokens (the authors' run_inference.py: 0.05); --k2 wins")
    parser.add_argument("--cluster-width", type=int, default=4,
                        help="DUET's merge pool holds cluster_width x k2 of the best non-dominant patches")
    parser.add_argument("--stage-layers", type=_ints, help="comma-separated T2V/PDrop stage layers")
    parser.add_argument("--stage-ratios", type=_floats, help="comma-separated keep ratios, one per stage layer")
    parser.add_argument("--fastv-k", type=int, help="FastV drop layer K")
    parser.add_argument("--positions", choices=POSITIONS, default=None,
                        help="position ids after a reduction: renumbered (DUET, PyramidDrop, VisionZip) or the "
                             "full prompt's (FastV); default: the method's own")
    parser.add_argument("--query", choices=QUERIES, default=None,
                        help="rows that rank visual tokens inside the LLM; default: the method's own "
                             "(DUET salient, PyramidDrop and FastV last)")


def reduction_from_args(args: argparse.Namespace, video: bool = False,
                        backbone_preset: dict | None = None) -> ReductionConfig:
    """The reduction the flags ask for. A DUET video run with no budget or split given takes the
    official Video-LLaVA settings (``budget.VIDEO_LLAVA_DUET``); its nominal budget is their
    per-frame average over 32 layers, (16 * 192 + 8 * 96) / 32 = 120. ``backbone_preset``: the
    loaded backbone's own settings for such a run (``preset``; Qwen2.5-VL: the authors' scripts)."""
    preset = {}
    unset = all(v is None for v in (args.budget, args.k1, args.k2, args.dominant_share, args.contextual_share))
    if video and args.method == "duet" and unset:
        preset = dict(VIDEO_LLAVA_DUET, budget=120)
    if backbone_preset and unset:
        preset = backbone_preset
    settings = dict(
        method=args.method, budget=args.budget or DEFAULT_BUDGET, k1=args.k1, k2=args.k2,
        cluster_width=args.cluster_width, stage_layers=args.stage_layers,
        stage_ratios=args.stage_ratios, fastv_k=args.fastv_k, positions=args.positions, query=args.query,
        dominant_share=args.dominant_share, contextual_share=args.contextual_share,
    )
    settings.update({k: v for k, v in preset.items() if k != "query" or args.query is None})
    return ReductionConfig(**settings)


def cmd_answer(args: argparse.Namespace) -> int:
    from transformers.utils import logging

    from .engine import DuetLlava
    from .inputs import check_question, load_image
    from .trace import attach_views
    from .video import read_frames

    logging.disable_progress_bar()
    video = args.video is not None
    reduction = reduction_from_args(args, video)
    check_question(args.question)  # before anything loads; the engine checks again with the tokenizer
    if video:
        frames = read_frames(args.video, args.frames).frames
    else:
        frames = [load_image(args.image)]
    engine = DuetLlava.load(args.model, device=args.device)
    if not video and engine.backbone.kept_short_side_px:  # a backbone that reads more than 336 px
        frames = [load_image(args.image, short_side=engine.backbone.kept_short_side_px)]
    reduction = reduction_from_args(args, video, engine.backbone.preset(args.method, video))
    trace = engine.answer(frames, args.question, reduction, max_new_tokens=args.max_new_tokens)
    for warning in trace["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(attach_views(trace, frames)) if args.json else trace["answer"])
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from .checkpoint import TinyLlavaSpec, build_random_checkpoint

    spec = TinyLlavaSpec(text_layers=args.layers)
    print(build_random_checkpoint(args.out, spec, seed=args.seed))
    return 0


def _delegated(name: str):
    """Subcommands with their own argument parsers (imported lazily: they pull in more)."""
    if name == "bench":
        from .bench import bench_main

        return bench_main
    if name == "eval":
        from .lab.eval import eval_main

        return eval_main
    if name == "probe":
        from .lab.probe import probe_main

        return probe_main
    if name == "fit-fitprune":
        from .fitprune import fit_main
        from .lab.scenes import calibration_items

        return lambda argv: fit_main(argv, calibration_items)
    if name == "train-speed":
        from .lab.train_speed import speed_main

        return speed_main
    if name == "train":
        from .lab.trainer import train_main

        return train_main
    if name == "lmms-task":
        from .lab.lmms_task import task_main

        return task_main
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and (delegate := _delegated(argv[0])):
        return delegate(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m model", description="DUET-LLaVA token reduction")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{answer,tiny,bench,eval,fit-fitprune,probe,train,train-speed,lmms-task}")
    answer = commands.add_parser("answer", help="answer a question about an image or a video")
    answer.add_argument("--model", help="checkpoint folder or hub id (default: the shipped model)")
    answer.add_argument("--device", default="auto", help="auto, cpu or cuda")
    source = answer.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file")
    source.add_argument("--video", help="a video file: frames sampled uniformly, one image each")
    answer.add_argument("--frames", type=int, default=VIDEO_FRAMES, help="frames sampled from --video")
    answer.add_argument("--question", required=True)
    answer.add_argument("--max-new-tokens", type=int, default=16)
    answer.add_argument("--json", action="store_true",
                        help="print the full trace as one JSON object, each frame's view inline")
    add_reduction_args(answer)
    answer.set_defaults(run=cmd_answer)
    tiny = commands.add_parser("tiny", help="save a tiny random LLaVA checkpoint (for trying the CLI and tests)")
    tiny.add_argument("out")
    tiny.add_argument("--layers", type=int, default=32, help="decoder layers")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_tiny)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
