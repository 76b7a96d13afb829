"""The Gradio app: run DUET-LLaVA and its baselines on one input, then explore the traces.

The model runs once per click of *Run*; everything after that (switching the method shown,
moving the layer slider, downloads) works from the traces kept in a bounded server-side cache. The layer
slider does not even reach Python: every layer is a hidden trace of the layer figure and a few
lines of JavaScript flip their visibility.

Every event that decodes an input or runs the model shares one concurrency group ("model", one at
a time) behind one queue, and the queue is the only way in (``api_open=False``; the HTTP-level
limits are in :mod:`duet_viz.limits`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import tempfile
import threading
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from model.budget import DUET_PUBLISHED, METHODS, PRESET_BUDGETS, ReductionConfig
from model.engine import DuetLlava
from model.inputs import MAX_IMAGE_BYTES, InputError, check_question, check_upload, load_image, whole_number
from model.video import DEFAULT_NUM_FRAMES, MAX_NUM_FRAMES, MAX_VIDEO_BYTES, read_frames

from . import figures
from .limits import Limits, RateLimit

log = logging.getLogger(__name__)
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
MAX_NEW_TOKENS = 64
MODEL_WORK = "model"  # the concurrency group of every event that decodes an input or runs the model
# Gradio's cache sweep (uploads and files sent out): every 2 minutes, files older than 15 minutes.
CACHE_SWEEP_S, CACHE_MAX_AGE_S = 120, 900
# What the controls show on page load; also the settings example results are cached for.
DEFAULTS = dict(method="duet", budget="64", custom_budget=96, compare=["full"], k1=None, k2=None, cluster_width=4,
                stage_layers="", stage_ratios="", salient="", max_new_tokens=16, num_frames=DEFAULT_NUM_FRAMES,
                positions="method")
# Position ids after a reduction. "method": each method as its code runs it (DUET, PyramidDrop and
# VisionZip renumber the shorter sequence, FastV keeps the survivors' ids); the others force one
# layout on every compared method.
POSITION_CHOICES = [("each method's own", "method"), ("renumbered (contiguous)", "contiguous"),
                    ("original (full prompt's positions)", "original")]
# Budget radio: (label, value). The DUET authors publish the dominant/contextual split only for
# some presets; the label says where ours is our own extrapolation. Values stay the plain numbers.
BUDGET_CHOICES = [(str(b) if b in DUET_PUBLISHED else f"{b} (DUET split not published)", str(b))
                  for b in PRESET_BUDGETS] + [("custom", "custom")]
METHOD_NAMES = {"full": "Full (576)", "duet": "DUET", "visionzip": "VisionZip", "fastv": "FastV",
                "pyramiddrop": "PyramidDrop", "hired": "HiRED", "fitprune": "FitPrune"}

# Runs in the browser on every slider move: show heatmap trace `layer` (trace 0 is the image).
LAYER_JS = """
(layer) => {
  const plot = document.querySelector('#layer-view .js-plotly-plot');
  if (!plot || !window.Plotly || !plot.data) return;
  const visible = plot.data.map((t, i) => i === 0 || i - 1 === layer);
  const meta = plot.layout.meta || {};
  return window.Plotly.update(plot, {visible: visible},
    {'title.text': `${meta.method || ''} · layer ${layer}: ${(meta.counts || [])[layer]} visual tokens survive`});
}
"""
CSS = "#layer-view {min-height: 440px} .duet-header {margin-bottom: 0}"


def gpu_task(fn):
    """``spaces.GPU`` on Hugging Face ZeroGPU hardware (the package is present there and the
    decorator is a no-op unless ZeroGPU is active); the function itself everywhere else."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=120)(fn)


class UploadedImage(gr.Image):
    """gr.Image that hands the upload over unopened (as a file path): gr.Image would open it
    with PIL first (a ``data:`` URL it even decodes in full, whatever its size) and fail on a bad
    file with a generic error, while model.inputs.load_image checks bytes, geometry and format
    before decoding and says what is wrong. A ``data:`` URL never gets here as such: the guard
    (:mod:`duet_viz.limits`) stores it as an upload first, and the queue only accepts paths in the
    upload folder."""

    is_template = True  # rendered by the stock image component

    def preprocess(self, payload):
        return None if payload is None else payload.path


class WholeNumber(gr.Number):
    """gr.Number (precision 0) that refuses NaN and infinities in words: gr.Number's own
    preprocess fails on them with Python's "cannot convert float NaN to integer"."""

    is_template = True  # rendered by the stock number component

    def preprocess(self, payload):
        if isinstance(payload, float) and not math.isfinite(payload):
            raise gr.Error(f"“{self.label}” must be a whole number (got {payload}).")
        return super().preprocess(payload)


@contextmanager
def shown_to_user():
    """An InputError raised inside becomes a gr.Error: Gradio shows its message as it is."""
    try:
        yield
    except InputError as error:
        raise gr.Error(str(error)) from None


def _ints(text: str) -> tuple[int, ...] | None:
    text = (text or "").strip()
    return tuple(int(v) for v in text.replace(" ", "").split(",")) if text else None


def _floats(text: str) -> tuple[float, ...] | None:
    text = (text or "").strip()
    return tuple(float(v) for v in text.replace(" ", "").split(",")) if text else None


def _optional_int(value, label: str, high: int) -> int | None:
    return None if value in (None, "") else whole_number(value, label, 0, high)


def fingerprint(source) -> str:
    """Content hash of an upload (file path) or a pasted image (PIL), so a repeated input is found
    whatever temp path it arrived under."""
    digest = hashlib.sha256()
    if isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    else:
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


_GLIBC = _glibc()
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_heap_growth() -> None:
    """Serve large blocks (activations) from mmap, so freeing them returns them to the OS. glibc
    otherwise raises its mmap threshold after the first large frees and carves later activations
    out of per-thread heaps that fragment; the server's RSS then creeps up request after request
    (measured with ``python -m duet_viz.load``, BENCHMARKS.md)."""
    if _GLIBC is not None:
        _GLIBC.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def release_memory() -> None:
    """Hand freed heap pages back to the OS after a model run (glibc's malloc_trim)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def _no_progress(*args, **kwargs) -> None:
    return None


SHARED = "examples"  # owner of the pinned example results, which every session may reuse
MAX_RESULT_BYTES = 256 * 2**20
SESSION_SHARE = 0.25  # of the result cache's entries and bytes that one session's results may hold
# Python's dicts, lists and floats of a trace take several times its JSON text: at most 5.2 times
# (tracemalloc, the shipped model's traces of every method on an image and a 16-frame clip).
TRACE_BYTES_PER_JSON_BYTE = 6


def result_bytes(frames: list[Image.Image], trace_json: str) -> int:
    """What a result holds in memory: its kept frames, its traces and their JSON text."""
    pixels = sum(f.width * f.height * len(f.getbands()) for f in frames)
    return pixels + (1 + TRACE_BYTES_PER_JSON_BYTE) * len(trace_json)


def session_of(request: gr.Request | None) -> str | None:
    """The visitor's session (None for a call from Python, outside a request)."""
    return None if request is None else request.session_hash


def client_of(request: gr.Request | None) -> str | None:
    return None if request is None or request.client is None else request.client.host


class App:
    """Callbacks bound to one loaded engine.

    Results live in a bounded LRU keyed by run id (the session state holds only the key), so
    memory and the files written for downloads stay flat however many sessions come and go: at
    most ``max_results`` entries and ``max_result_bytes`` (:func:`result_bytes`), of which one
    session's results hold at most ``session_share``, so one visitor cannot flush the others'.
    A request whose input bytes and settings match a result *of the same session* reuses it
    instead of running the model again ("cached" in the timing note); results are private to
    their session. The examples' results at the default settings are the exception: shared by
    every session and pinned, computed once (at start-up with ``cache_examples="eager"``, on first
    click with "lazy") and never evicted, so clicking an example answers at once.
    ``runs_per_minute`` limits the model runs of one client address (None: no limit).
    """

    def __init__(self, engine: DuetLlava, max_results: int = 32, max_result_bytes: int = MAX_RESULT_BYTES,
                 session_share: float = SESSION_SHARE, runs_per_minute: int | None = None):
        self.engine = engine
        self.max_results, self.max_result_bytes, self.session_share = max_results, max_result_bytes, session_share
        self.results: OrderedDict[str, dict] = OrderedDict()
        self.memo: dict[tuple[str | None, str], str] = {}  # (owner, request fingerprint) -> result key
        self.example_requests: set[str] = set()  # fingerprints of the examples at the default settings
        self.runs = RateLimit(runs_per_minute, 60)
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()  # one model run at a time (start-up warm-up vs. requests)
        self.workdir = tempfile.TemporaryDirectory(prefix="duet-viz-")
        self.run_models = gpu_task(self._run_models)
        bound_heap_growth()

    def owner(self, request: str | None, session: str | None) -> str | None:
        return SHARED if request in self.example_requests else session

    def remember(self, result: dict, request: str | None = None, session: str | None = None) -> str:
        key = uuid.uuid4().hex[:16]
        owner = self.owner(request, session)
        traces = list(result["traces"].values())
        trace_json = json.dumps(traces if len(traces) > 1 else traces[0], indent=1)
        entry = {**result, "trace_json": trace_json, "request": request, "owner": owner, "pinned": owner == SHARED,
                 "bytes": result_bytes(result["frames"], trace_json)}
        with self.lock:
            self.results[key] = entry
            if request is not None:
                self.memo[(owner, request)] = key
            own = [k for k, r in self.results.items() if r["owner"] == owner and not r["pinned"] and k != key]
            self._evict(own, self.session_share * self.max_result_bytes - entry["bytes"],
                        max(1, math.floor(self.session_share * self.max_results)) - 1)
            anyone = [k for k, r in self.results.items() if not r["pinned"] and k != key]
            self._evict(anyone, self.max_result_bytes - entry["bytes"], self.max_results - 1)
        return key

    def _evict(self, keys: list[str], max_bytes: float, max_count: int) -> None:
        """Forget the least recently used of ``keys`` (oldest first) until the rest fit."""
        total, count = sum(self.results[k]["bytes"] for k in keys), len(keys)
        for old in keys:
            if total <= max_bytes and count <= max_count:
                return
            evicted = self.results.pop(old)
            total, count = total - evicted["bytes"], count - 1
            self.memo.pop((evicted["owner"], evicted["request"]), None)
            for path in Path(self.workdir.name).glob(f"*{old}*"):
                path.unlink(missing_ok=True)

    def recall(self, key: str | None) -> dict:
        with self.lock:
            if key not in self.results:
                raise gr.Error("No result to show: press Run (results of old sessions expire).")
            self.results.move_to_end(key)
            return self.results[key]

    def lookup(self, request: str, session: str | None) -> str | None:
        with self.lock:
            key = self.memo.get((self.owner(request, session), request))
            if key is not None:
                self.results.move_to_end(key)
            return key

    # --------------------------------------------------------------------- model runs
    def reduction(self, method, budget, k1, k2, cluster_width, stage_layers, stage_ratios, salient,
                  positions=DEFAULTS["positions"]) -> ReductionConfig:
        n_patches = self.engine.n_patches
        with shown_to_user():
            k1, k2 = _optional_int(k1, "k1", n_patches), _optional_int(k2, "k2", n_patches)
            cluster_width = whole_number(cluster_width, "The V2V pool width", 0, max(self.engine.grid))
        try:
            return ReductionConfig(
                method=method, budget=int(budget), k1=k1, k2=k2,
                cluster_width=cluster_width, stage_layers=_ints(stage_layers),
                stage_ratios=_floats(stage_ratios),
                salient_words=tuple(salient.split()) if salient and salient.strip() else None,
                positions=None if positions == "method" else positions,
            )
        except ValueError as error:
            raise gr.Error(f"Invalid settings: {error}") from None

    def configs(self, method, budget_choice, custom_budget, compare, k1, k2, cluster_width, stage_layers,
                stage_ratios, salient, positions=DEFAULTS["positions"]) -> list[ReductionConfig]:
        """The selected method's config first, then each method to compare with at default knobs."""
        with shown_to_user():
            budget = whole_number(custom_budget if budget_choice == "custom" else budget_choice,
                                  "The budget (visual tokens)", 1, self.engine.n_patches)
        primary = self.reduction(method, budget, k1, k2, cluster_width, stage_layers, stage_ratios, salient, positions)
        others = [m for m in (compare or []) if m != method]
        return [primary] + [ReductionConfig(m, int(budget), salient_words=primary.salient_words,
                                            positions=primary.positions) for m in others]

    def request(self, source, use_video: bool, question: str, configs, max_new_tokens: int, num_frames: int) -> str:
        """Fingerprint of everything a result depends on."""
        settings = (use_video, question, [repr(c) for c in configs], int(max_new_tokens),
                    int(num_frames) if use_video else None)
        return hashlib.sha256(f"{fingerprint(source)}|{settings!r}".encode()).hexdigest()

    def result_for(self, source, use_video, question, configs, max_new_tokens, num_frames,
                   progress=_no_progress, visitor: gr.Request | None = None) -> tuple[str, bool]:
        """(result key, whether it was cached): the kept result of this exact request for this
        session (or the shared one of an example), or a new run."""
        with shown_to_user():
            check_upload(source, *(("video", MAX_VIDEO_BYTES) if use_video else ("image", MAX_IMAGE_BYTES)))
        request = self.request(source, use_video, question, configs, max_new_tokens, num_frames)
        key = self.lookup(request, session_of(visitor))
        if key is not None:
            return key, True
        self.check_run_rate(client_of(visitor))
        with shown_to_user():
            if use_video:
                progress(0, desc="Decoding the video")
                frames = read_frames(source, int(num_frames)).frames
            else:
                frames = [load_image(source)]
        traces = self.run_models(frames, question, configs, int(max_new_tokens), progress)
        return self.remember({"traces": traces, "frames": frames}, request, session_of(visitor)), False

    def check_run_rate(self, client: str | None) -> None:
        wait = 0 if client is None else self.runs.wait_s(client)
        if wait:
            raise gr.Error(f"Too many runs from your address: try again in {math.ceil(wait)} s "
                           "(the examples and results you already have are not limited).")

    def example_request(self, path: Path, question: str) -> tuple:
        """Arguments of ``result_for`` for an example at the default settings."""
        d = DEFAULTS
        configs = self.configs(d["method"], d["budget"], d["custom_budget"], d["compare"], d["k1"], d["k2"],
                               d["cluster_width"], d["stage_layers"], d["stage_ratios"], d["salient"], d["positions"])
        use_video = path.suffix not in (".png", ".jpg", ".jpeg")
        return str(path), use_video, check_question(question, self.engine.tokenizer), configs, d["max_new_tokens"], \
            d["num_frames"]

    def register_examples(self, examples: list[tuple[Path, str]], eager: bool) -> threading.Thread | None:
        """Pin the examples' default-settings results; with ``eager`` compute them now, in a
        background thread (returned) so the server starts at once."""
        requests = [self.example_request(path, q) for path, q in examples]
        self.example_requests |= {self.request(*args) for args in requests}
        if not eager:
            return None

        def warm():
            for args in requests:
                try:
                    self.result_for(*args)
                except Exception:  # a broken example must not stop the others or the server
                    log.exception("caching example %s failed", args[0])

        thread = threading.Thread(target=warm, name="cache-examples", daemon=True)
        thread.start()
        return thread

    def run(self, image, question, method, budget_choice, custom_budget, compare, k1, k2, cluster_width,
            stage_layers, stage_ratios, salient, max_new_tokens, layer, video=None,
            num_frames=DEFAULT_NUM_FRAMES, positions=DEFAULTS["positions"], mode="image",
            visitor: gr.Request = None, progress=gr.Progress()):
        """The *Run* button (and an example click): check everything a visitor sent, then answer
        from this session's kept results or run the model."""
        use_video = video is not None and (mode == "video" or image is None)
        if image is None and not use_video:
            raise gr.Error("Upload an image or a video (or click an example) first.")
        with shown_to_user():
            question = check_question(question, self.engine.tokenizer)
            max_new_tokens = whole_number(max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS)
            num_frames = whole_number(num_frames, "The number of frames", 1, MAX_NUM_FRAMES)
        configs = self.configs(method, budget_choice, custom_budget, compare, k1, k2, cluster_width, stage_layers,
                               stage_ratios, salient, positions)
        key, cached = self.result_for(video if use_video else image, use_video, question, configs, max_new_tokens,
                                      num_frames, progress, visitor)
        progress(1.0, desc="Drawing")
        result = self.recall(key)
        traces, frames = result["traces"], result["frames"]
        shown = gr.Radio(choices=[(METHOD_NAMES[m], m) for m in traces], value=method, visible=len(traces) > 1)
        used = " ".join(f"`{s['token']}`" for s in traces[method]["salient"])
        salient_text = f"Salient text tokens that ranked the visual tokens: {used}" if traces[method]["t2v"] else ""
        many = len(frames) > 1
        frame = gr.Slider(0, len(frames) - 1, value=0, step=1, visible=True) if many else gr.Slider(value=0, visible=False)
        grid = figures.frames_by_layers(traces[method]) if many else None
        return (key, shown, *self.render(key, method, layer, 0), *self.summary(key, cached), salient_text, frame,
                gr.Plot(grid, visible=many), gr.Gallery(self.strip(key, method, layer) if many else None, visible=many))

    def _run_models(self, frames, question, configs, max_new_tokens, progress) -> dict[str, dict]:
        """All model work of one request (the one function that needs the GPU)."""
        traces = {}
        with self.model_lock:
            try:
                for i, cfg in enumerate(configs):
                    progress(i / len(configs), desc=f"Running {METHOD_NAMES[cfg.method]} ({i + 1}/{len(configs)})")
                    traces[cfg.method] = self._answer(frames, question, cfg, max_new_tokens)
            finally:
                release_memory()
        return traces

    def _answer(self, frames: list[Image.Image], question: str, cfg: ReductionConfig, max_new_tokens: int) -> dict:
        try:
            return self.engine.answer(frames, question, cfg, max_new_tokens=max_new_tokens)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise gr.Error("Out of GPU memory: try a smaller budget or fewer methods to compare.") from None
        except Exception as error:  # a failed run must not take the server down
            log.exception("run failed")
            raise gr.Error(f"The model run failed: {type(error).__name__}: {error}") from None

    # --------------------------------------------------------------------- views
    def _pick(self, key, method, layer, frame=0):
        result = self.recall(key)
        if method not in result["traces"]:
            raise gr.Error(f"No {method} run in this result.")
        trace = result["traces"][method]
        with shown_to_user():
            frame = whole_number(frame or 0, "The frame", 0, len(result["frames"]) - 1)
            layer = whole_number(layer, "The LLM layer", 0, len(trace["visual_tokens_per_layer"]) - 1)
        return trace, result["frames"], frame, layer

    def render(self, key, method, layer, frame=0):
        trace, frames, frame, layer = self._pick(key, method, layer, frame)
        view = figures.layer_view(trace, frames[frame], frame=frame, layer=layer)
        counts = trace["visual_tokens_per_frame_layer"][frame] if len(frames) > 1 else trace["visual_tokens_per_layer"]
        view.update_layout(meta={"method": trace["method"], "counts": counts})
        return figures.cluster_map(trace, frames[frame], frame=frame), view

    def strip(self, key, method, layer):
        """Every frame's overlay at ``layer``, for the frame strip."""
        trace, frames, _, layer = self._pick(key, method, layer)
        counts = trace["visual_tokens_per_frame_layer"]
        return [(figures.overlay_png(trace, image, frame=f, layer=layer), f"frame {f}: {counts[f][layer]} tokens")
                for f, image in enumerate(frames)]

    def summary(self, key, cached=False):
        result = self.recall(key)
        traces = list(result["traces"].values())
        answers, latency = figures.answer_rows(traces), figures.latency_rows(traces)
        device = traces[0]["device"]
        note = (f"Timings on **{device}** ({traces[0]['dtype']}), one run each (the first run after start-up includes warm-up); "
                "speed-up = full prefill time / method prefill time.")
        if cached:
            source = (" of this example, computed once for every visitor" if result["pinned"] else
                      ": you ran this input with these settings before in this session")
            note += f"  \n**Cached result**{source}; the model was not run again."
        path = Path(self.workdir.name) / f"trace-{'-'.join(t['method'] for t in traces)}-{key}.json"
        path.write_text(result["trace_json"])
        return figures.tokens_per_layer(traces), answers, latency, note, str(path)

    def refresh_strip(self, key, method, layer):
        if key is None or len(self.recall(key)["frames"]) == 1:
            return gr.skip()
        return self.strip(key, method, layer)

    def overlay(self, key, method, layer, frame=0):
        """The overlay PNG to download; a result keeps only its latest one on disk, so the files
        stay bounded by the result cache however many layers and frames a visitor asks for."""
        trace, frames, frame, layer = self._pick(key, method, layer, frame)
        for old in Path(self.workdir.name).glob(f"overlay-*-{key}.png"):
            old.unlink(missing_ok=True)
        path = Path(self.workdir.name) / f"overlay-{method}-frame{frame}-layer{layer}-{key}.png"
        figures.overlay_png(trace, frames[frame], frame=frame, layer=layer).save(path)
        return str(path)


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
    video_examples = [(ASSETS / name, q) for name, q in VIDEO_EXAMPLES if (ASSETS / name).exists()]
    app.register_examples(image_examples + video_examples, eager=cache_examples == "eager")
    d = DEFAULTS
    n_layers = engine.n_layers
    header = (f"## DUET-Viz\nWhich image patches DUET-VLM merges (V2V) and which visual tokens survive each LLM "
              f"layer (T2V), next to VisionZip, FastV, PyramidDrop, HiRED, FitPrune and the full model.  \n"
              f"**Model** `{engine.name}` · **device** `{engine.device}` · **dtype** "
              f"`{str(engine.dtype).replace('torch.', '')}` · {n_layers} LLM layers · "
              f"{engine.grid[0]}×{engine.grid[1]} = {engine.n_patches} patches per image")
    with gr.Blocks(title="DUET-Viz", delete_cache=(CACHE_SWEEP_S, CACHE_MAX_AGE_S)) as demo:
        gr.Markdown(header, elem_classes="duet-header")
        state = gr.State()
        mode = gr.State("image")
        with gr.Row():
            with gr.Column(scale=4, min_width=320):
                with gr.Tabs() as tabs:
                    with gr.Tab("Image", id="image") as image_tab:
                        image = UploadedImage(type="filepath", label="Image", sources=["upload", "clipboard"],
                                              height=300)
                    with gr.Tab("Video", id="video") as video_tab:
                        video = gr.Video(label="Video (mp4, webm, avi; ≤ 120 s)", sources=["upload"],
                                         include_audio=True, height=300)
                        num_frames = gr.Slider(1, MAX_NUM_FRAMES, value=d["num_frames"], step=1,
                                               label="Frames sampled uniformly (budget applies per frame)")
                question = gr.Textbox(label="Question", value=EXAMPLES[0][1], max_lines=3)
                method = gr.Radio([(METHOD_NAMES[m], m) for m in METHODS], value=d["method"], label="Method")
                with gr.Row():
                    budget = gr.Radio(BUDGET_CHOICES, value=d["budget"],
                                      label="Visual-token budget (avg per LLM layer)")
                    custom_budget = WholeNumber(value=d["custom_budget"], precision=0, minimum=1,
                                                maximum=engine.n_patches, label="Custom budget", visible=False)
                compare = gr.CheckboxGroup([(METHOD_NAMES[m], m) for m in METHODS], value=d["compare"],
                                           label="Compare with (same input and budget, default knobs)")
                with gr.Accordion("Advanced (applies to the selected method)", open=False):
                    with gr.Row():
                        k1 = WholeNumber(label="k1 dominant, CLS counted (blank: auto)", precision=0, minimum=0)
                        k2 = WholeNumber(label="k2 contextual tokens (blank: auto)", precision=0, minimum=0)
                    cluster_width = gr.Slider(0, max(engine.grid), value=d["cluster_width"], step=1,
                                              label="V2V pool width (DUET merges the width x k2 best other patches)")
                    with gr.Row():
                        stage_layers = gr.Textbox(label="Stage layers", placeholder=f"auto, e.g. {n_layers // 2},{3 * n_layers // 4}")
                        stage_ratios = gr.Textbox(label="Keep ratios", placeholder="auto, e.g. 0.5,0.0")
                    salient = gr.Textbox(label="Salient words override (blank: automatic)",
                                         placeholder="e.g. color triangle")
                    positions = gr.Radio(POSITION_CHOICES, value=d["positions"],
                                         label="Position ids after a reduction (all methods compared)")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=d["max_new_tokens"], step=1,
                                               label="Max new tokens")
                run = gr.Button("Run", variant="primary")
                example_sets = [
                    ("image", gr.Examples([[str(p), q] for p, q in image_examples], inputs=[image, question],
                                          label="Image examples (click to load and run)"))]
                if video_examples:
                    example_sets.append(("video", gr.Examples([[str(p), q] for p, q in video_examples],
                                                              inputs=[video, question],
                                                              label="Video examples (click to load and run)")))
            with gr.Column(scale=7):
                answers = gr.Dataframe(headers=figures.ANSWER_HEADERS, label="Answers", interactive=False,
                                       wrap=True, column_widths=["14%", "10%", "14%", "62%"])
                latency = gr.Dataframe(headers=figures.LATENCY_HEADERS, label="Latency", interactive=False)
                timing_note = gr.Markdown()
                salient_used = gr.Markdown()
                # Every method from the start: if Gradio drops this session's state (its store is
                # bounded), the overlay and the views still take the method and say "press Run".
                shown = gr.Radio([(METHOD_NAMES[m], m) for m in METHODS], label="Show maps for", visible=False)
                with gr.Row():
                    clusters = gr.Plot(label="V2V cluster map")
                    with gr.Column():
                        layer_view = gr.Plot(label="Layer view", elem_id="layer-view")
                        layer = gr.Slider(0, n_layers - 1, value=n_layers // 2, step=1, label="LLM layer",
                                          elem_id="layer-slider")
                frame = gr.Slider(0, 1, value=0, step=1, label="Frame", visible=False, elem_id="frame-slider")
                frame_grid = gr.Plot(label="Visual tokens kept per frame and layer", visible=False)
                strip = gr.Gallery(label="Frame strip at this layer (updates when the slider is released)",
                                   columns=8, height=160, visible=False)
                pyramid = gr.Plot(label="Tokens per layer")
                with gr.Row():
                    trace_file = gr.File(label="Trace (JSON)")
                    with gr.Column():
                        png_button = gr.Button("Overlay at this layer as PNG")
                        png_file = gr.File(label="Overlay (PNG)")

        budget.change(lambda b: gr.Number(visible=b == "custom"), budget, custom_budget, api_visibility="private")
        image_tab.select(lambda: "image", None, mode, api_visibility="private")
        video_tab.select(lambda: "video", None, mode, api_visibility="private")
        run_inputs = [image, question, method, budget, custom_budget, compare, k1, k2, cluster_width, stage_layers,
                      stage_ratios, salient, max_new_tokens, layer, video, num_frames, positions, mode]
        run_outputs = [state, shown, clusters, layer_view, pyramid, answers, latency, timing_note, trace_file,
                       salient_used, frame, frame_grid, strip]
        run.click(app.run, run_inputs, run_outputs, api_name="run", concurrency_id=MODEL_WORK)
        for kind, examples in example_sets:  # an example click fills the inputs, opens its tab and runs
            examples.load_input_event.then(
                lambda kind=kind: (kind, gr.Tabs(selected=kind)), None, [mode, tabs], api_visibility="private",
            ).then(app.run, run_inputs, run_outputs, api_visibility="private", concurrency_id=MODEL_WORK)
        for control in (shown, frame):
            control.change(app.render, [state, shown, layer, frame], [clusters, layer_view], api_visibility="private")
        layer.change(None, layer, None, js=LAYER_JS)
        layer.release(app.refresh_strip, [state, shown, layer], strip, api_visibility="private")
        png_button.click(app.overlay, [state, shown, layer, frame], png_file, api_name="overlay")
    # api_open=False: Gradio's /gradio_api/run/<api_name> would run these events outside the queue.
    return demo.queue(api_open=False, max_size=limits.queue_size, default_concurrency_limit=1)
