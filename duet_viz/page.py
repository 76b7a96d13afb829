"""The page: layout, examples and the wiring of every event to ``ui.App``.

Three pieces: the inputs column (``controls``), the outputs column (``views``) and ``wire``,
which binds the events; ``build_demo`` puts them together behind one queue, beside the trace
browser's tab (``browser.py``), which opens uploaded traces without running the model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from model.backbones.qwen2_5_vl import AUTHORS_CONTEXTUAL_SHARE, AUTHORS_DOMINANT_SHARE
from model.budget import DUET_PUBLISHED, METHODS, PRESET_BUDGETS, ReductionConfig
from model.engine import DuetLlava
from model.video import MAX_NUM_FRAMES

from . import figures
from .browser import Browser, browser_tab
from .limits import Limits
from .ui import (CACHE_MAX_AGE_S, CACHE_SWEEP_S, DEFAULTS, MAX_NEW_TOKENS, MODEL_WORK, PRESET, SHARES, App, full_tokens,
                 method_choices, pool_width_max)
from .widgets import UploadedImage, WholeNumber

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLES = [  # synthetic scenes from the test split (model.data) + scikit-image photos
    ("scene-shapes.png", "what color is the star ?"),
    ("scene-position.png", "is the blue circle on the left or right ?"),
    ("scene-count.png", "how many orange objects are there ?"),
    ("astronaut.jpg", "what is the woman holding ?"),
    ("chelsea.jpg", "what animal is this ?"),
    ("coffee.jpg", "what color is the cup ?"),
]
VIDEO_EXAMPLES = [  # clips written by model.video.write_clip from the scene generator
    ("clip-moving.webm", "what color is the star ?"),
]
POSITION_CHOICES = [("each method's own", "method"), ("renumbered (contiguous)", "contiguous"),
                    ("original (full prompt's positions)", "original")]
# Budget radio: (label, value). The DUET authors publish LLaVA-1.5's dominant/contextual split only
# for some presets; the label says where ours is our own extrapolation. Values stay the plain numbers.
BUDGET_CHOICES = [(str(b) if b in DUET_PUBLISHED else f"{b} (DUET split not published)", str(b))
                  for b in PRESET_BUDGETS] + [("custom", "custom")]
LAYER_JS = figures.layer_js("layer-view")
CSS = "#layer-view {min-height: 440px} .duet-header {margin-bottom: 0}"


def budget_choices(engine: DuetLlava) -> list[tuple[str, str]]:
    """The budget radio's choices. Where each image has its own grid (Qwen2.5-VL) the numbers are
    per image and the split is the authors' 540 : 100 at any budget; the backbone's own preset
    (the authors' absolute counts) comes first."""
    if full_tokens(engine) is not None:
        return BUDGET_CHOICES
    preset = engine.backbone.preset("duet", False)
    return ([(f"authors' preset: {preset['k1']} + {preset['k2']} tokens", PRESET),
             (f"authors' shares: {AUTHORS_DOMINANT_SHARE:.0%} + {AUTHORS_CONTEXTUAL_SHARE:.0%} of the image's tokens",
              SHARES)] +
            [(str(b), str(b)) for b in PRESET_BUDGETS] + [("custom", "custom")])


def counts_cls(engine: DuetLlava) -> bool:
    """Whether k1 counts a CLS token on this backbone (LLaVA) or plain tokens (Qwen2.5-VL)."""
    return engine.plan(ReductionConfig("duet", PRESET_BUDGETS[-1])).cls_token


def header(engine: DuetLlava) -> str:
    n = full_tokens(engine)
    grid = (f"{engine.grid[0]}×{engine.grid[1]} = {n} patches per image" if n is not None else
            f"each image its own grid of merged tokens, as many as its size gives (at most {engine.n_patches}); "
            "budgets count tokens per image")
    return (f"## DUET-Viz\nWhich image patches DUET-VLM merges (V2V) and which visual tokens survive each LLM "
            f"layer (T2V), next to VisionZip, FastV, PyramidDrop, HiRED, FitPrune and the full model.  \n"
            f"**Model** `{engine.name}` · **device** `{engine.device}` · **dtype** "
            f"`{str(engine.dtype).replace('torch.', '')}` · {engine.n_layers} LLM layers · {grid}")


def controls(engine: DuetLlava, image_examples, video_examples) -> SimpleNamespace:
    """The inputs column: image / video tabs, question, method, budget, comparisons, advanced knobs,
    Run, and the examples (one click loads and runs them)."""
    d, c = DEFAULTS, SimpleNamespace()
    with gr.Tabs() as c.tabs:
        with gr.Tab("Image", id="image") as c.image_tab:
            c.image = UploadedImage(type="filepath", label="Image", sources=["upload", "clipboard"], height=300)
        with gr.Tab("Video", id="video", visible=engine.takes_video) as c.video_tab:
            c.video = gr.Video(label="Video (mp4, webm, avi; ≤ 120 s)", sources=["upload"], include_audio=True,
                               height=300)
            c.num_frames = gr.Slider(1, MAX_NUM_FRAMES, value=d["num_frames"], step=1,
                                     label="Frames sampled uniformly (budget applies per frame)")
    c.question = gr.Textbox(label="Question", value=EXAMPLES[0][1], max_lines=3)
    c.method = gr.Radio(method_choices(METHODS, full_tokens(engine)), value=d["method"], label="Method")
    per_image = full_tokens(engine) is None
    with gr.Row():
        c.budget = gr.Radio(budget_choices(engine), value=d["budget"],
                            label="Visual-token budget per image (avg per LLM layer; the preset: absolute counts; "
                            "the shares: every method matched to DUET's average on this image)"
                            if per_image else "Visual-token budget (avg per LLM layer)")
        c.custom_budget = WholeNumber(value=d["custom_budget"], precision=0, minimum=1, maximum=engine.n_patches,
                                      label="Custom budget", visible=False)
    c.compare = gr.CheckboxGroup(method_choices(METHODS, full_tokens(engine)), value=d["compare"],
                                 label="Compare with (same input and budget, default knobs)")
    with gr.Accordion("Advanced (applies to the selected method)", open=False):
        with gr.Row():
            c.k1 = WholeNumber(label="k1 dominant, CLS counted (blank: auto)" if counts_cls(engine) else
                               "k1 dominant tokens per image, no CLS (blank: auto)", precision=0, minimum=0)
            c.k2 = WholeNumber(label="k2 contextual tokens (blank: auto)", precision=0, minimum=0)
        c.cluster_width = gr.Slider(0, pool_width_max(engine), value=d["cluster_width"], step=1,
                                    label="V2V pool width (DUET merges the width x k2 best other patches)")
        with gr.Row():
            n = engine.n_layers
            c.stage_layers = gr.Textbox(value="", label="Stage layers", placeholder=f"auto, e.g. {n // 2},{3 * n // 4}")
            c.stage_ratios = gr.Textbox(value="", label="Keep ratios", placeholder="auto, e.g. 0.5,0.0")
        c.salient = gr.Textbox(value="", label="Salient words override (blank: automatic)",
                               placeholder="e.g. color triangle")
        c.positions = gr.Radio(POSITION_CHOICES, value=d["positions"],
                               label="Position ids after a reduction (all methods compared)")
        c.max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=d["max_new_tokens"], step=1, label="Max new tokens")
    c.run = gr.Button("Run", variant="primary")
    c.example_sets = [("image", gr.Examples([[str(p), q] for p, q in image_examples], inputs=[c.image, c.question],
                                            label="Image examples (click to load and run)"))]
    if video_examples:
        c.example_sets.append(("video", gr.Examples([[str(p), q] for p, q in video_examples],
                                                    inputs=[c.video, c.question],
                                                    label="Video examples (click to load and run)")))
    return c


def views(n_layers: int, n_patches: int | None) -> SimpleNamespace:
    """The outputs column: answers, the model note, latency, the cluster map and layer view with
    their sliders, per-frame views, tokens per layer and the downloads."""
    v = SimpleNamespace()
    v.answers = gr.Dataframe(headers=figures.ANSWER_HEADERS, label="Answers", interactive=False, wrap=True,
                             elem_id="answers",
                             column_widths=["14%", "10%", "14%", "62%"])
    v.model_note = gr.Markdown(elem_id="model-note")
    v.latency = gr.Dataframe(headers=figures.LATENCY_HEADERS, label="Latency", interactive=False)
    v.timing_note = gr.Markdown()
    v.salient_used = gr.Markdown()
    # Every method from the start: if Gradio drops this session's state (its store is bounded),
    # the overlay and the views still take the method and say "press Run".
    v.shown = gr.Radio(method_choices(METHODS, n_patches), label="Show maps for", visible=False)
    with gr.Row():
        v.clusters = gr.Plot(label="V2V cluster map", elem_id="cluster-map")
        with gr.Column():
            v.layer_view = gr.Plot(label="Layer view", elem_id="layer-view")
            v.layer = gr.Slider(0, n_layers - 1, value=n_layers // 2, step=1, label="LLM layer",
                                elem_id="layer-slider")
    v.frame = gr.Slider(0, 1, value=0, step=1, label="Frame", visible=False, elem_id="frame-slider")
    v.frame_grid = gr.Plot(label="Visual tokens kept per frame and layer", visible=False)
    v.strip = gr.Gallery(label="Frame strip at this layer (updates when the slider is released)", columns=8,
                         height=160, visible=False)
    v.pyramid = gr.Plot(label="Tokens per layer")
    with gr.Row():
        v.trace_file = gr.File(label="Trace (JSON)")
        with gr.Column():
            v.png_button = gr.Button("Overlay at this layer as PNG")
            v.png_file = gr.File(label="Overlay (PNG)")
    return v


def wire(app: App, c: SimpleNamespace, v: SimpleNamespace, state, mode) -> None:
    c.budget.change(lambda b: gr.Number(visible=b == "custom"), c.budget, c.custom_budget, api_visibility="private")
    c.image_tab.select(lambda: "image", None, mode, api_visibility="private")
    c.video_tab.select(lambda: "video", None, mode, api_visibility="private")
    run_inputs = [c.image, c.question, c.method, c.budget, c.custom_budget, c.compare, c.k1, c.k2, c.cluster_width,
                  c.stage_layers, c.stage_ratios, c.salient, c.max_new_tokens, v.layer, c.video, c.num_frames,
                  c.positions, mode]
    run_outputs = [state, v.shown, v.clusters, v.layer_view, v.pyramid, v.answers, v.latency, v.timing_note,
                   v.trace_file, v.salient_used, v.frame, v.frame_grid, v.strip, v.model_note]
    c.run.click(app.run, run_inputs, run_outputs, api_name="run", concurrency_id=MODEL_WORK)
    for kind, examples in c.example_sets:  # an example click fills the inputs, opens its tab and runs
        examples.load_input_event.then(
            lambda kind=kind: (kind, gr.Tabs(selected=kind)), None, [mode, c.tabs], api_visibility="private",
        ).then(app.run, run_inputs, run_outputs, api_visibility="private", concurrency_id=MODEL_WORK)
    for control in (v.shown, v.frame):
        control.change(app.render, [state, v.shown, v.layer, v.frame], [v.clusters, v.layer_view],
                       api_visibility="private")
    v.layer.change(None, v.layer, None, js=LAYER_JS)
    v.layer.release(app.refresh_strip, [state, v.shown, v.layer], v.strip, api_visibility="private")
    v.png_button.click(app.overlay, [state, v.shown, v.layer, v.frame], v.png_file, api_name="overlay")


def build_demo(engine: DuetLlava, cache_examples: str = "lazy", limits: Limits | None = None) -> gr.Blocks:
    """The page, its queue set up. ``cache_examples``: "eager" computes the examples' results in
    the background at start-up, "lazy" on their first click; either way later clicks answer from
    the cache. ``limits``: a public deployment's (``python app.py``; launch the demo with
    ``duet_viz.limits.launch_options``); None leaves per-client limits off."""
    if cache_examples not in ("eager", "lazy"):
        raise ValueError(f"cache_examples must be 'eager' or 'lazy', not {cache_examples!r}")
    limits = limits or Limits().shared_address()
    app = App(engine, runs_per_minute=limits.runs_per_minute)
    image_examples = [(ASSETS / name, q) for name, q in EXAMPLES if (ASSETS / name).exists()]
    video_examples = [(ASSETS / name, q) for name, q in VIDEO_EXAMPLES
                      if (ASSETS / name).exists() and engine.takes_video]
    app.register_examples(image_examples + video_examples, eager=cache_examples == "eager")
    with gr.Blocks(title="DUET-Viz", delete_cache=(CACHE_SWEEP_S, CACHE_MAX_AGE_S)) as demo:
        gr.Markdown(header(engine), elem_classes="duet-header")
        state, mode = gr.State(), gr.State("image")
        with gr.Tabs():
            with gr.Tab("Run a model", id="run"):
                with gr.Row():
                    with gr.Column(scale=4, min_width=320):
                        c = controls(engine, image_examples, video_examples)
                    with gr.Column(scale=7):
                        v = views(engine.n_layers, full_tokens(engine))
            with gr.Tab("Browse traces", id="traces"):
                browser_tab(Browser(workdir=app.workdir.name), None, uploads=True)
        wire(app, c, v, state, mode)
    # api_open=False: Gradio's /gradio_api/run/<api_name> would run these events outside the queue.
    return demo.queue(api_open=False, max_size=limits.queue_size, default_concurrency_limit=1)
