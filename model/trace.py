"""The SPEC §4 trace of one answer: every decision, count, timing and FLOP count, JSON-able."""

from __future__ import annotations

from dataclasses import asdict

from . import flops as F
from .budget import Plan, average
from .prompt import Prompt, per_frame_counts


def build(engine, prompt: Prompt, visual, p: Plan, first, salient: list[int], decoded: tuple[list[int], int], text_len: int,
          ms: dict[str, float], warnings: list[str]) -> dict:
    """The trace of ``engine.answer``: ``first`` is its prefill, ``salient`` the salient rows of
    the reduced input, ``decoded`` the greedy tokens and how many decoding steps made them, ``ms`` the timer's sections,
    ``warnings`` what the user should know about the run (``engine.context_warning``)."""
    frames, generated, steps = visual.frames, *decoded
    n_visual_full = (engine.n_patches + prompt.route.cls_kept) * len(frames)
    lm_cfg, vc = engine.lm.config, engine.model.config.vision_config
    return {
        "model": engine.name,
        "method": p.method,
        "budget": p.budget,
        "question": prompt.question,
        "answer": engine.tokenizer.decode(generated, skip_special_tokens=True).strip(),
        "generated_tokens": len(generated),
        "generated_ids": generated,
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "grid": list(engine.grid),
        "frames": visual.frames,
        "salient": [
            {"position": i, "token": engine.tokenizer.convert_ids_to_tokens(int(prompt.input_ids[0, j]))}
            for i, j in zip(salient, sorted(prompt.salient))
        ],
        "salient_rule": prompt.salient_rule,
        "salient_words": prompt.salient_words,
        "warnings": warnings,
        "plan": {**{k: v for k, v in asdict(p).items() if k != "stages"},
                 "stages": [asdict(s) for s in p.stages]},
        "positions": p.positions,  # position ids after a reduction: "contiguous" (renumbered) or "original"
        "t2v": first.stages,
        "visual_tokens_per_layer": first.counts,
        "visual_tokens_per_frame_layer": per_frame_counts(visual.frames, first.stages, engine.n_layers),
        "avg_visual_tokens": round(average(first.counts), 2),
        "timings_ms": {
            "vision": round(ms.get("vision", 0.0), 3),
            "v2v": round(ms.get("v2v", 0.0), 3),
            "prefill": round(ms["prefill"], 3),
            "decode_per_token": round(ms["decode"] / steps, 3) if steps else 0.0,
            "total": round(ms["total"], 3),
        },
        "flops": {
            "vision": F.vision_flops(len(frames), engine.n_patches + 1, engine.feature_index,
                                     vc.hidden_size, vc.intermediate_size),
            "llm": F.llm_flops(first.tokens_per_layer, lm_cfg.hidden_size, lm_cfg.intermediate_size),
            "llm_full": F.llm_flops([text_len + n_visual_full] * engine.n_layers,
                                    lm_cfg.hidden_size, lm_cfg.intermediate_size),
        },
    }
