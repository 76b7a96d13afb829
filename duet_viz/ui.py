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

import hashlib
import json
import logging
import math
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from model.backbones.qwen2_5_vl import AUTHORS_CONTEXTUAL_SHARE, AUTHORS_DOMINANT_SHARE
from model.budget import METHODS, ReductionConfig
from model.engine import DuetLlava
from model.inputs import (MAX_IMAGE_BYTES, InputError, check_encodable, check_question, check_upload, load_image, shown,
                          whole_number)
from model.video import DEFAULT_NUM_FRAMES, MAX_NUM_FRAMES, MAX_VIDEO_BYTES, read_frames

from . import figures
from .memory import (MAX_RESULT_BYTES, SESSION_SHARE, SHARED, bound_heap_growth, fingerprint, release_memory,
                     result_bytes)
from .widgets import _floats, _ints, _optional_int, shown_to_user
from .limits import RateLimit

log = logging.getLogger(__name__)
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
METHOD_NAMES = {"full": "Full", "duet": "DUET", "visionzip": "VisionZip", "fastv": "FastV",
                "pyramiddrop": "PyramidDrop", "hired": "HiRED", "fitprune": "FitPrune"}


PRESET = "preset"  # the budget choice of a backbone's own preset (Qwen2.5-VL: the authors' 540 + 100)
SHARES = "shares"  # Qwen2.5-VL: the authors' 0.65 / 0.05 of each image's tokens, every method matched per image
AUTHORS_SHARES = {"dominant_share": AUTHORS_DOMINANT_SHARE, "contextual_share": AUTHORS_CONTEXTUAL_SHARE}


def full_tokens(engine: DuetLlava) -> int | None:
    """Visual tokens every image gets (576 on LLaVA-1.5, 256 on Video-LLaVA), or None where each
    image has a grid of its own (Qwen2.5-VL: (h / 28) x (w / 28) merged tokens)."""
    return None if engine.grid is None else engine.n_patches


def pool_width_max(engine: DuetLlava) -> int:
    """The widest V2V pool the controls offer: the side of a square grid of the most tokens an
    image gets (LLaVA-1.5: 24, its grid's side)."""
    return math.isqrt(engine.n_patches)


def method_name(method: str, n_patches: int | None) -> str:
    """A method's label; the full model's names its visual tokens per image when every image has
    as many (``full_tokens``)."""
    if method != "full":
        return METHOD_NAMES[method]
    return "Full" if n_patches is None else f"Full ({n_patches})"


def method_choices(methods, n_patches: int | None) -> list[tuple[str, str]]:
    return [(method_name(m, n_patches), m) for m in methods]


def salient_line(trace: dict) -> str:
    """Which words of the question ranked the visual tokens, as words (the tokenizer's pieces,
    such as "▁color" or "Des" + "cribe", joined back), when a stage ranked by them."""
    if not any(stage["query"] == "salient" for stage in trace["t2v"]):
        return ""
    words = " ".join(f"`{w}`" for w in trace["salient_words"])
    if not words:
        return "Only the prompt's last token ranked the visual tokens (no salient word found in the question)."
    return f"Salient words that ranked the visual tokens: {words}, and the prompt's last token."


def warning_lines(traces: dict[str, dict]) -> str:
    """Every compared run's warnings (``engine.context_warning``), one paragraph each."""
    return "  \n".join(f"**Warning.** {w}" for trace in traces.values() for w in trace["warnings"])

# Runs in the browser on every slider move: show heatmap trace `layer` (trace 0 is the image).
def gpu_task(fn):
    """``spaces.GPU`` on Hugging Face ZeroGPU hardware (the package is present there and the
    decorator is a no-op unless ZeroGPU is active); the function itself everywhere else."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=120)(fn)


def _no_progress(*args, **kwargs) -> None:
    return None


def session_of(request: gr.Request | None) -> str | None:
    """The visitor's session (None for a call from Python, outside a request)."""
    return None if request is None else request.session_hash


def client_of(request: gr.Request | None) -> str | None:
    return None if request is None or request.client is None else request.client.host


MAX_SALIENT_CHARS = 200


def salient_override(text) -> tuple[str, ...] | None:
    """The salient-words override as words (None when blank), checked before it is split: an
    8.5 M-word override cost 1.7 GB before any limit read it."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str) or len(text) > MAX_SALIENT_CHARS:
        raise InputError(f"The salient-words override may be at most {MAX_SALIENT_CHARS} characters of text "
                         f"(got {shown(text)}).")
    check_encodable(text, "The salient-words override")
    return tuple(text.split())


def compared(methods) -> list[str]:
    """The methods to compare with, each once, in the order given; anything that is not a method
    name is refused (a list of 300 "full" ran the model 301 times in one request)."""
    if methods is None:
        return []
    if not isinstance(methods, (list, tuple)) or len(methods) > 4 * len(METHODS):
        raise InputError(f"“Compare with” takes a list of methods ({', '.join(METHODS)}).")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"“Compare with” names no method {shown(unknown[0])}; methods: {', '.join(METHODS)}.")
    return list(dict.fromkeys(methods))


def unknown_words(tokenizer, question: str) -> list[str]:
    """The question's words that the tokenizer maps to its unknown token, in order, once each."""
    if tokenizer.unk_token_id is None:
        return []
    encoded = tokenizer(question, return_offsets_mapping=True, add_special_tokens=False)
    words = [question[a:b] for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])
             if token == tokenizer.unk_token_id]
    return list(dict.fromkeys(words))


def model_note(engine: DuetLlava, question: str) -> str:
    """Under the answers, for a model this project trained on its synthetic scenes (its
    training.json lists the scene vocabulary): what it can answer, which of the question's words it
    has never seen, and how to run a real LLaVA. Empty for any other checkpoint."""
    if not (engine.training or {}).get("vocabulary"):
        return ""
    unknown = unknown_words(engine.tokenizer, question)
    unseen = ("  \nWords of this question it has never seen (each reaches it as one unknown token): "
              + ", ".join(f"**{w}**" for w in unknown) + ".") if unknown else ""
    return (f"**About this model.** `{engine.name}` is a small LLaVA trained here from scratch on synthetic "
            "scenes of coloured shapes (circles, squares, triangles, stars). It answers questions about their "
            "colour, shape, count, existence and left / right / top / bottom position, and nothing else: on a "
            f"photo its answers mean nothing.{unseen}  \nFor real images run a real checkpoint on a GPU: "
            "`python app.py --model llava-hf/llava-1.5-7b-hf`.")


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

    ``close`` stops it at any moment (``app.py`` calls it on SIGTERM for every live App): no
    model run starts after it, the one in flight (an example being cached or a visitor's) ends
    at its next method, and the work folder is removed.
    """

    live: "weakref.WeakSet[App]" = weakref.WeakSet()  # every App not yet collected, for a clean stop

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
        self.stopping = threading.Event()  # set by close: no model run starts or goes on to its next method
        self.warming: threading.Thread | None = None  # the thread caching the examples, while it runs
        self.workdir = tempfile.TemporaryDirectory(prefix="duet-viz-")
        self.run_models = gpu_task(self._run_models)
        bound_heap_growth()
        App.live.add(self)

    def close(self, timeout_s: float = 60.0) -> bool:
        """Stop: no model run starts from now on, the one in flight stops before its next method
        (waited for up to ``timeout_s``), example caching ends, and the work folder is removed.
        True when no model work was left running."""
        self.stopping.set()
        deadline = time.monotonic() + timeout_s
        idle = self.model_lock.acquire(timeout=timeout_s)
        if idle:
            self.model_lock.release()
        if self.warming is not None:
            self.warming.join(max(0.0, deadline - time.monotonic()))
            idle = idle and not self.warming.is_alive()
        self.workdir.cleanup()
        return idle

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
            cluster_width = whole_number(cluster_width, "The V2V pool width", 0, pool_width_max(self.engine))
            layers, ratios = _ints(stage_layers, "Stage layers"), _floats(stage_ratios, "Keep ratios")
            salient = salient_override(salient)
        try:
            return ReductionConfig(
                method=method, budget=int(budget), k1=k1, k2=k2,
                cluster_width=cluster_width, stage_layers=layers, stage_ratios=ratios,
                salient_words=salient, positions=None if positions == "method" else positions,
            )
        except ValueError as error:
            raise gr.Error(f"Invalid settings: {error}") from None

    def configs(self, method, budget_choice, custom_budget, compare, k1, k2, cluster_width, stage_layers,
                stage_ratios, salient, positions=DEFAULTS["positions"]) -> list[ReductionConfig]:
        """The selected method's config first, then each method to compare with at default knobs.
        ``PRESET`` (Qwen2.5-VL): the backbone's own settings, the authors' absolute counts for DUET
        and VisionZip (k1 / k2 typed in still win) and their nominal budget for the others.
        ``SHARES`` (Qwen2.5-VL): the authors' shares of each image's tokens for every config; the
        other methods then match DUET's average on the image (``plan_qwen``)."""
        preset = self.presets() if budget_choice == PRESET else {}
        shares = AUTHORS_SHARES if budget_choice == SHARES else {}
        if shares and full_tokens(self.engine) is not None:
            raise gr.Error(f"{self.engine.name} gives every image the same patches: pick a number of visual tokens.")
        if budget_choice == SHARES:
            budget = self.engine.n_patches  # each plan replaces it by what the shares reach on the image
        elif budget_choice == PRESET:
            budget = preset["duet"]["budget"]
            own = preset.get(method, {})
            k1 = own.get("k1") if k1 in (None, "") else k1
            k2 = own.get("k2") if k2 in (None, "") else k2
        else:
            with shown_to_user():
                budget = whole_number(custom_budget if budget_choice == "custom" else budget_choice,
                                      "The budget (visual tokens)", 1, self.engine.n_patches)
        primary = replace(self.reduction(method, budget, k1, k2, cluster_width, stage_layers, stage_ratios, salient,
                                         positions), **shares)
        with shown_to_user():
            others = [m for m in compared(compare) if m != method]
        return [primary] + [ReductionConfig(m, **preset.get(m, {"budget": int(budget)}), **shares,
                                            salient_words=primary.salient_words, positions=primary.positions)
                            for m in others]

    def presets(self) -> dict[str, dict]:
        """Each method's preset on this backbone (``preset``: k1, k2 and the nominal budget), the
        methods without one left out; refused where the backbone has none."""
        found = {m: self.engine.backbone.preset(m, False) for m in METHODS}
        found = {m: settings for m, settings in found.items() if settings}
        if "duet" not in found:
            raise gr.Error(f"{self.engine.name} has no preset budget: pick a number of visual tokens.")
        return found

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
            started = time.monotonic()
            log.info("caching the results of %d examples", len(requests))
            for args in requests:
                if self.stopping.is_set():
                    log.info("example caching stopped")
                    return
                try:
                    self.result_for(*args)
                except Exception:  # a broken example must not stop the others or the server
                    if not self.stopping.is_set():
                        log.exception("caching example %s failed", args[0])
            log.info("cached the results of %d examples in %.1f s", len(requests), time.monotonic() - started)

        self.warming = threading.Thread(target=warm, name="cache-examples", daemon=True)
        self.warming.start()
        return self.warming

    def run(self, image, question, method=DEFAULTS["method"], budget_choice=DEFAULTS["budget"],
            custom_budget=DEFAULTS["custom_budget"], compare=tuple(DEFAULTS["compare"]), k1=None, k2=None,
            cluster_width=DEFAULTS["cluster_width"], stage_layers="", stage_ratios="", salient="",
            max_new_tokens=DEFAULTS["max_new_tokens"], layer=None, video=None, num_frames=DEFAULT_NUM_FRAMES,
            positions=DEFAULTS["positions"], mode="image", visitor: gr.Request = None, progress=gr.Progress()):
        """The *Run* button (and an example click): check everything a visitor sent, then answer
        from this session's kept results or run the model. Through the API only the image (or a
        video) and the question are required; ``layer`` None shows the middle LLM layer."""
        layer = self.engine.n_layers // 2 if layer is None else layer
        use_video = video is not None and (mode == "video" or image is None)
        if image is None and not use_video:
            raise gr.Error("Upload an image or a video (or click an example) first.")
        if use_video and not self.engine.takes_video:
            raise gr.Error(f"{self.engine.name} answers about one image per question here: video is not supported "
                           "(DUET-VLM reduces one image on this backbone). Upload an image instead.")
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
        shown = gr.Radio(choices=method_choices(traces, full_tokens(self.engine)), value=method,
                         visible=len(traces) > 1)
        salient_text = salient_line(traces[method])
        note = "\n\n".join(part for part in (warning_lines(traces), model_note(self.engine, question)) if part)
        many = len(frames) > 1
        frame = gr.Slider(0, len(frames) - 1, value=0, step=1, visible=True) if many else gr.Slider(value=0, visible=False)
        grid = figures.frames_by_layers(traces[method]) if many else None
        return (key, shown, *self.render(key, method, layer, 0), *self.summary(key, cached), salient_text, frame,
                gr.Plot(grid, visible=many), gr.Gallery(self.strip(key, method, layer) if many else None, visible=many),
                note)

    def _run_models(self, frames, question, configs, max_new_tokens, progress) -> dict[str, dict]:
        """All model work of one request (the one function that needs the GPU)."""
        traces = {}
        with self.model_lock:
            try:
                for i, cfg in enumerate(configs):
                    if self.stopping.is_set():
                        raise gr.Error("The app is shutting down: try again in a minute.")
                    progress(i / len(configs), desc=f"Running {method_name(cfg.method, full_tokens(self.engine))} "
                                                   f"({i + 1}/{len(configs)})")
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
        return (figures.cluster_map(trace, frames[frame], frame=frame),
                figures.layer_view(trace, frames[frame], frame=frame, layer=layer))

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
