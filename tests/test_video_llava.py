"""The Video-LLaVA adapter on a tiny random VideoLlavaForConditionalGeneration saved to disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.budget import ReductionConfig, plan
from model.checkpoint import TinyLlavaSpec, build_random_video_llava
from model.device import Timer
from model.engine import DuetLlava

QUESTION = "what color is the moving circle ?"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    spec = TinyLlavaSpec(image_size=224, text_layers=8)
    folder = build_random_video_llava(tmp_path_factory.mktemp("video-llava"), spec)
    torch.manual_seed(0)
    return DuetLlava.load(folder, device="cpu")


@pytest.fixture(scope="module")
def clip():
    frames = []
    for t in range(4):
        pixels = np.full((180, 240, 3), 90, np.uint8)
        pixels[60:110, 20 + 40 * t:70 + 40 * t] = (220, 30, 30)  # a red square moving right
        frames.append(Image.fromarray(pixels))
    return frames


def prefill_logits(engine, frames, cfg):
    p = plan(cfg, engine.n_layers, engine.n_patches)
    prompt = engine.prepare(frames, QUESTION)
    with torch.inference_mode():
        visual = engine.encode(prompt, p, Timer(engine.device))
        embeds, rows, salient = engine.llm_inputs(prompt, visual)
        return engine.prefill(embeds, rows, salient, p).logits, prompt


def test_loads_as_video_llava_with_both_towers(engine):
    assert type(engine.model).__name__ == "VideoLlavaForConditionalGeneration"
    assert engine.model.config._attn_implementation == "sdpa"
    assert engine.video_llava and engine.grid == (16, 16)
    assert engine.video_route.tower is engine.model.model.video_tower
    assert engine.image_route.tower is engine.model.model.image_tower


def test_clip_without_reduction_matches_stock_video_forward(engine, clip):
    logits, prompt = prefill_logits(engine, clip, ReductionConfig("full"))
    assert (prompt.input_ids == engine.model.config.video_token_id).sum() == 4 * (256 + 1)  # CLS per frame
    with torch.inference_mode():
        stock = engine.model(input_ids=prompt.input_ids, pixel_values_videos=prompt.pixel_values[None]).logits[0, -1]
    assert (logits - stock).abs().max().item() < 1e-4


def test_single_image_without_reduction_matches_stock_image_forward(engine, clip):
    logits, prompt = prefill_logits(engine, clip[:1], ReductionConfig("full"))
    assert (prompt.input_ids == engine.model.config.image_token_id).sum() == 256
    with torch.inference_mode():
        stock = engine.model(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values).logits[0, -1]
    assert (logits - stock).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["duet", "visionzip", "fastv", "pyramiddrop"])
def test_reduced_clip_keeps_cls_per_frame_and_caches_faithfully(engine, clip, method):
    cfg = ReductionConfig(method, 32)
    trace = engine.answer(clip, QUESTION, cfg, max_new_tokens=6)
    assert len(trace["frames"]) == 4
    for record in trace["frames"]:
        assert record["token_patches"][0] == []  # the frame's CLS token, never merged
        covered = sorted(p for group in record["token_patches"] for p in group)
        assert sorted(covered + record.get("discarded", [])) == list(range(256))  # one token or discarded
    if method in ("duet", "visionzip"):
        assert all(r["n_tokens"] < 257 for r in trace["frames"])
    assert [row[0] for row in trace["visual_tokens_per_frame_layer"]] == [r["n_tokens"] for r in trace["frames"]]
    uncached = engine.answer(clip, QUESTION, cfg, max_new_tokens=6, use_cache=False)
    assert trace["generated_ids"] == uncached["generated_ids"]


def test_the_app_labels_the_full_model_with_video_llavas_patch_count(engine):
    import gradio as gr

    from duet_viz.page import build_demo

    demo = build_demo(engine)  # examples cached lazily: nothing runs
    radios = [b for b in demo.blocks.values() if isinstance(b, gr.Radio) and b.label in ("Method", "Show maps for")]
    assert len(radios) == 2 and engine.n_patches == 256
    assert all(("Full (256)", "full") in radio.choices for radio in radios)
