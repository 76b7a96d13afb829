"""The trace browser: runs made elsewhere, looked at without a model.

``python app.py --traces DIR [--compare DIR_B]`` serves it alone (no checkpoint is loaded), and
the normal app has it as its *Browse traces* tab, fed by uploads. It shows what ``traces.py``
read and checked:

- **Documents**: one row per document (task, doc, question, answer, target, correct, method,
  budget, average visual tokens), filtered by wrong only, task and method; picking a row draws
  that document's cluster map, layer view (the slider flips layers in the browser),
  tokens-per-layer, answers and latency with the live run's own figure functions, on the view the
  trace carries. With a second run, the table pairs each document's two answers, the disagreeing
  ones first, and the two runs' pictures stand side by side.
- **Dataset**: per model × method × budget of each run, the accuracy (mean of the documents'
  first metric, where the traces carry scores) with its 95 % interval
  (:func:`model.intervals.score_interval`), the mean visual tokens per layer, and the mean
  keep map (``traces.keep_masks``), downloadable as a PNG of every layer.

Runs are kept server-side under a key (the session state holds only the key): the served folders
pinned, uploads in a bounded LRU of ``max_uploads``. Every event here is light (no model), so it
runs beside the model's events, not in their concurrency group.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from model.inputs import whole_number
from model.intervals import score_interval

from . import figures
from .traces import LIMITS, Group, Run, TraceError, TraceLimits, normalised, paired, response, scan_upload
from .widgets import shown_to_user

log = logging.getLogger(__name__)
SERVED = "served"
ALL = "(all)"
MAX_ROWS = 500  # table rows sent to the page; filters narrow a larger run
ORDER_NOTE = "disagreeing documents first"
KEEP_JS = """
(layer) => {
  const plot = document.querySelector('#keep-map .js-plotly-plot');
  if (!plot || !window.Plotly || !plot.data) return;
  return window.Plotly.update(plot, {visible: plot.data.map(t => t.meta === layer)},
    {'title.text': `Mean keep map · LLM layer ${layer}: share of documents in which each patch survives`});
}
"""
VIEW_IDS = ("trace-view-a", "trace-view-b")
SINGLE_HEADERS = ["task", "doc", "question", "answer", "target", "correct", "method", "budget", "avg tokens"]
PAIR_HEADERS = ["task", "doc", "question", "target", "A answer", "A correct", "B answer", "B correct", "agree",
                "A avg tokens", "B avg tokens"]
DATASET_HEADERS = ["run", "model", "method", "budget", "documents", "scored", "accuracy", "95 % interval",
                   "avg visual tokens"]


def mark(score: float | None) -> str:
    if score is None:
        return ""
    return "✓" if score == 1 else "✗" if score == 0 else f"{score:.2f}"


def doc_order(entry) -> tuple:
    return (entry.task, int(entry.doc) if entry.doc.isdigit() else 0, entry.doc, entry.key)


class Browser:
    """Callbacks of the trace browser (module docstring)."""

    def __init__(self, limits: TraceLimits = LIMITS, max_uploads: int = 32, workdir: str | None = None):
        """``workdir``: where the PNGs go (the normal app passes its own work folder, which its
        stop removes); by default a temporary folder of its own."""
        self.limits, self.max_uploads = limits, max_uploads
        self.runs: OrderedDict[str, tuple[Run, Run | None]] = OrderedDict()
        self.lock = threading.Lock()
        self.own_workdir = None if workdir else tempfile.TemporaryDirectory(prefix="duet-viz-traces-")
        self.workdir = Path(workdir or self.own_workdir.name)

    def serve(self, a: Run, b: Run | None = None) -> str:
        """Pin the folders given on the command line; every session sees them."""
        with self.lock:
            self.runs[SERVED] = (a, b)
        return SERVED

    def pair(self, key: str | None) -> tuple[Run, Run | None]:
        with self.lock:
            if key not in self.runs:
                raise gr.Error("No traces to show: upload trace files (uploads of old sessions expire).")
            self.runs.move_to_end(key)
            return self.runs[key]

    # ---------------------------------------------------------------------------- uploads
    def open_upload(self, files_a, files_b):
        """Two uploads (B optional) as a run pair; the key of the pair in the LRU."""
        if not files_a:
            raise gr.Error("Upload one or more trace files (.json, with their .jpg views if they are sidecars).")
        try:
            a = scan_upload([str(f) for f in files_a], self.limits)
            b = scan_upload([str(f) for f in files_b], self.limits) if files_b else None
        except TraceError as error:
            raise gr.Error(str(error)) from None
        a.name = "upload"
        if b is not None:
            b.name = "upload"
        key = uuid.uuid4().hex[:16]
        with self.lock:
            self.runs[key] = (a, b)
            while len(self.runs) > self.max_uploads + (SERVED in self.runs):
                oldest = next(k for k in self.runs if k != SERVED)
                del self.runs[oldest]
                for path in self.workdir.glob(f"*{oldest}*"):
                    path.unlink(missing_ok=True)
        return key

    # ---------------------------------------------------------------------------- the run pair
    def show(self, key):
        """Everything that depends on the run pair alone: the summary, the filters' choices, the
        table, the B-side visibility and the dataset view."""
        a, b = self.pair(key)
        tasks = sorted({e.task for run in (a, b) if run for e in run.entries.values() if e.task})
        methods = sorted({e.method for run in (a, b) if run for e in run.entries.values()})
        table, keys = self.rows(key, False, ALL, ALL, False)
        compare = b is not None
        accuracy, tokens, keep, n_layers = self.dataset(key)
        return (
            self.summary(a, b), gr.Dropdown(choices=[ALL, *tasks], value=ALL),
            gr.Dropdown(choices=[ALL, *methods], value=ALL), gr.Checkbox(visible=compare, value=False),
            table, keys, gr.Plot(visible=compare), gr.Plot(visible=compare),
            accuracy, tokens, keep, gr.Slider(0, max(1, n_layers - 1), value=n_layers // 2, step=1),
            gr.Slider(0, max(1, n_layers - 1), value=n_layers // 2, step=1),
        )

    @staticmethod
    def summary(a: Run, b: Run | None) -> str:
        lines = []
        for tag, run in (("A", a), ("B", b)):
            if run is None:
                continue
            groups = ", ".join(f"{g.model} · {g.label}" for g in run.groups.values()) or "no readable trace"
            lines.append(f"**{tag}: {run.name}** — {len(run.entries)} documents ({groups})")
            lines += [f"- refused: {message}" for message in run.refused[:20]]
            if len(run.refused) > 20:
                lines.append(f"- … and {len(run.refused) - 20} more refused")
        if b is not None:
            pairs = paired(a, b)
            disagree = sum(normalised(x.answer) != normalised(y.answer) for _, x, y in pairs)
            lines.append(f"**{len(pairs)} documents in both runs, {disagree} answered differently** ({ORDER_NOTE}).")
        return "  \n".join(lines)

    def rows(self, key, wrong_only, task, method, disagree_only):
        """(the table, the keys of its rows in order) after the filters."""
        a, b = self.pair(key)

        def keep(entry) -> bool:
            return (task in (ALL, None) or entry.task == task) and (method in (ALL, None) or entry.method == method)

        if b is None:
            entries = sorted((e for e in a.entries.values() if keep(e) and (not wrong_only or e.wrong)), key=doc_order)
            shown = entries[:MAX_ROWS]
            data = [[e.task, e.doc, e.question, e.answer, e.target, mark(e.score), e.method,
                     "—" if e.method == "full" else e.budget, e.avg_tokens] for e in shown]
            return self.table(SINGLE_HEADERS, data, len(entries)), [e.key for e in shown]
        pairs = [(k, x, y) for k, x, y in paired(a, b)
                 if (keep(x) or keep(y)) and (not wrong_only or x.wrong or y.wrong)
                 and (not disagree_only or normalised(x.answer) != normalised(y.answer))]
        shown = pairs[:MAX_ROWS]
        data = [[x.task, x.doc, x.question, x.target or y.target, x.answer, mark(x.score), y.answer, mark(y.score),
                 "yes" if normalised(x.answer) == normalised(y.answer) else "no", x.avg_tokens, y.avg_tokens]
                for _, x, y in shown]
        return self.table(PAIR_HEADERS, data, len(pairs)), [k for k, _, _ in shown]

    @staticmethod
    def table(headers, data, total):
        label = f"Documents ({total})" if total <= MAX_ROWS else f"Documents (the first {MAX_ROWS} of {total}: filter)"
        return gr.Dataframe(value=data or None, headers=headers, label=label)

    # ---------------------------------------------------------------------------- one document
    def pick(self, key, keys, layer, event: gr.SelectData):
        """A table row clicked: that document drawn (frame 0)."""
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        if not keys or not isinstance(row, int) or not 0 <= row < len(keys):
            raise gr.Error("Pick a document in the table.")
        return (keys[row], *self.draw(key, keys[row], layer, 0))

    def draw(self, key, doc, layer, frame=0):
        """The picked document's readouts and pictures, for run A and (when compared) run B."""
        if doc is None:
            raise gr.Error("Pick a document in the table.")
        a, b = self.pair(key)
        with shown_to_user():
            layer = whole_number(layer or 0, "The LLM layer", 0, self.limits.max_layers)
            frame = whole_number(frame or 0, "The frame", 0, self.limits.max_frames)
        try:
            loaded = [run.trace(doc, self.limits) for run in (a, b) if run is not None and doc in run.entries]
        except (TraceError, OSError) as error:
            raise gr.Error(str(error)) from None
        if not loaded:
            raise gr.Error("That document is no longer in these runs: pick another.")
        traces = [t for t, _, _ in loaded]
        n_layers = min(len(t["visual_tokens_per_layer"]) for t in traces)
        n_frames = min(len(t["frames"]) for t in traces)
        layer, frame = min(layer, n_layers - 1), min(frame, n_frames - 1)
        try:
            pictures = [(figures.cluster_map(figures.on_view(t), views[frame], frame=frame),
                         figures.layer_view(figures.on_view(t), views[frame], frame=frame, layer=layer))
                        for t, views, _ in loaded]
            pyramid = figures.tokens_per_layer(traces, [f"{tag}: {t['method']}" for tag, t in zip("AB", traces)])
            answers, latency = figures.answer_rows(traces), figures.latency_rows(traces)
        except Exception as error:  # a trace that passed its checks must still never take the page down
            log.exception("drawing %s failed", doc)
            raise gr.Error(f"This trace could not be drawn ({type(error).__name__}: {error}).") from None
        if len(pictures) == 1:
            pictures.append((None, None))
        first = traces[0]
        notes = [f"{tag}: {note}" for tag, (_, _, note) in zip("AB", loaded) if note]
        target = f" · target **{first['target']}**" if first.get("target") is not None else ""
        header = (f"**{doc}** · {first.get('question', '')}{target}  \n"
                  + "  \n".join(f"{tag}: **{response(t) or figures.NO_ANSWER}** ({t['method']}, {t.get('model', '?')})"
                                + "".join(f" · {name} {value:g}" for name, value in t.get("score", {}).items())
                                for tag, t in zip("AB", traces))
                  + ("  \n" + "  \n".join(notes) if notes else ""))
        return (header, answers, latency, pictures[0][0], pictures[0][1], pictures[1][0], pictures[1][1], pyramid,
                gr.Slider(maximum=n_layers - 1, value=layer),
                gr.Slider(maximum=max(1, n_frames - 1), value=frame, visible=n_frames > 1))

    # ---------------------------------------------------------------------------- dataset view
    def tagged_groups(self, key) -> list[tuple[str, Group]]:
        """(run tag, group) of every dataset group of the run pair, A's first."""
        a, b = self.pair(key)
        return [(tag, g) for tag, run in (("A", a), ("B", b)) if run for g in run.groups.values()]

    def named_maps(self, key) -> list[tuple[str, Group]]:
        return [(f"{tag}: {g.label}", g) for tag, g in self.tagged_groups(key)]

    def dataset(self, key):
        """(accuracy table, mean visual tokens per layer, mean keep maps, layers) of the run pair."""
        groups = self.named_maps(key)
        data = [[tag, g.model, g.method, "—" if g.method == "full" else g.budget, g.docs,
                 len(g.scores), "" if g.accuracy is None else round(g.accuracy, 4), interval(g.scores),
                 round(g.avg_tokens / g.docs, 2)]
                for tag, g in self.tagged_groups(key)]
        if not groups:
            return gr.Dataframe(value=None, headers=DATASET_HEADERS), None, None, 1
        means = [{"method": g.method, "budget": g.budget, "frames": [None] * g.n_frames,
                  "visual_tokens_per_layer": (g.tokens / g.docs).round(2).tolist(),
                  "avg_visual_tokens": g.avg_tokens / g.docs} for _, g in groups]
        tokens = figures.tokens_per_layer(means, [label for label, _ in groups])
        tokens.update_layout(title=dict(text="Mean visual tokens per LLM layer, over the documents"))
        n_layers = max(g.n_layers for _, g in groups)
        keep = figures.keep_map([(label, g.keep_map) for label, g in groups], n_layers // 2)
        return gr.Dataframe(value=data, headers=DATASET_HEADERS), tokens, keep, n_layers

    def keep_png(self, key) -> str:
        """The keep maps of every layer as a PNG; a run pair keeps only its latest on disk."""
        groups = self.named_maps(key)
        if not groups:
            raise gr.Error("No readable trace in these runs.")
        path = self.workdir / f"keep-map-{key}.png"
        figures.keep_map_png([(label, g.keep_map) for label, g in groups]).save(path)
        return str(path)


def browser_tab(browser: Browser, key: str | None, uploads: bool):
    """The browser's components and events, inside the current Blocks: with ``uploads``, two
    file inputs (run A, and run B to compare) feed it; else it shows the served ``key`` on load.
    Returns the load event's (fn, inputs, outputs) for the caller's ``demo.load``."""
    state, keys, picked = gr.State(key), gr.State([]), gr.State()
    if uploads:
        gr.Markdown("Open traces made elsewhere (`python -m model answer --json`, the lmms-eval plugin's "
                    "`traces=DIR`; sidecar `.jpg` views with their traces). No model runs here.")
        with gr.Row():
            files_a = gr.File(label="Run A: trace files", file_count="multiple", file_types=[".json", ".jpg"])
            files_b = gr.File(label="Run B (optional, to compare)", file_count="multiple",
                              file_types=[".json", ".jpg"])
        open_button = gr.Button("Open traces", variant="primary")
    status = gr.Markdown(elem_id="trace-status")
    with gr.Tabs():
        with gr.Tab("Documents", id="documents"):
            with gr.Row():
                wrong_only = gr.Checkbox(label="Wrong only", value=False)
                disagree_only = gr.Checkbox(label="Disagreements only", value=False, visible=False)
                task = gr.Dropdown([ALL], value=ALL, label="Task")
                method = gr.Dropdown([ALL], value=ALL, label="Method")
            table = gr.Dataframe(headers=SINGLE_HEADERS, label="Documents", interactive=False, wrap=True,
                                 max_height=360, elem_id="trace-table")
            header = gr.Markdown(elem_id="trace-picked")
            answers = gr.Dataframe(headers=figures.ANSWER_HEADERS, label="Answers", interactive=False, wrap=True)
            latency = gr.Dataframe(headers=figures.LATENCY_HEADERS, label="Latency (as measured where the run ran)",
                                   interactive=False)
            with gr.Row():
                clusters_a = gr.Plot(label="A: V2V cluster map")
                clusters_b = gr.Plot(label="B: V2V cluster map", visible=False)
            with gr.Row():
                view_a = gr.Plot(label="A: layer view", elem_id=VIEW_IDS[0])
                view_b = gr.Plot(label="B: layer view", elem_id=VIEW_IDS[1], visible=False)
            layer = gr.Slider(0, 1, value=0, step=1, label="LLM layer", elem_id="trace-layer")
            frame = gr.Slider(0, 1, value=0, step=1, label="Frame", visible=False)
            pyramid = gr.Plot(label="Tokens per layer")
        with gr.Tab("Dataset", id="dataset"):
            accuracy = gr.Dataframe(headers=DATASET_HEADERS, label="Accuracy per method × budget", interactive=False)
            tokens = gr.Plot(label="Mean visual tokens per layer")
            keep = gr.Plot(label="Mean keep map", elem_id="keep-map")
            keep_layer = gr.Slider(0, 1, value=0, step=1, label="LLM layer", elem_id="keep-layer")
            with gr.Row():
                png_button = gr.Button("Keep maps of every layer as PNG")
                png_file = gr.File(label="Keep maps (PNG)")
    shown = [status, task, method, disagree_only, table, keys, clusters_b, view_b, accuracy, tokens, keep, keep_layer,
             layer]
    drawn = [header, answers, latency, clusters_a, view_a, clusters_b, view_b, pyramid, layer, frame]
    filters = [state, wrong_only, task, method, disagree_only]
    for control in (wrong_only, task, method, disagree_only):
        control.change(browser.rows, filters, [table, keys], api_visibility="private")
    table.select(browser.pick, [state, keys, layer], [picked, *drawn], api_visibility="private")
    frame.release(browser.draw, [state, picked, layer, frame], drawn, api_visibility="private")
    layer.change(None, layer, None, js=figures.layer_js(*VIEW_IDS))
    keep_layer.change(None, keep_layer, None, js=KEEP_JS)
    png_button.click(browser.keep_png, state, png_file, api_name="keep_map_png")
    if uploads:
        open_button.click(browser.open_upload, [files_a, files_b], state, api_name="open_traces").then(
            browser.show, state, shown, api_visibility="private")
        return None
    return browser.show, state, shown


def interval(scores: list[float]) -> str:
    """The 95 % interval of a group's mean score (:func:`model.intervals.score_interval`), as text."""
    if not scores:
        return ""
    low, high = score_interval(scores)
    return f"{low:.3f}–{high:.3f}"


def build_browser(browser: Browser, key: str, queue_size: int = 32) -> gr.Blocks:
    """The page of ``python app.py --traces DIR``: the browser alone, no model."""
    with gr.Blocks(title="DUET-Viz traces") as demo:
        gr.Markdown("## DUET-Viz · trace browser\nRuns made elsewhere, as their traces recorded them: which patches "
                    "each method merged, kept and discarded, layer by layer. No model is loaded.")
        fn, inputs, outputs = browser_tab(browser, key, uploads=False)
        demo.load(fn, inputs, outputs, api_visibility="private")
    return demo.queue(api_open=False, max_size=queue_size, default_concurrency_limit=4)
