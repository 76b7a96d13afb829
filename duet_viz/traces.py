"""Trace files made elsewhere (``python -m model answer --json``, the lmms-eval plugin's
``traces=DIR``), read safely: the trace browser (``duet_viz/browser.py``) shows nothing else.

Every file is checked before it is believed, since a hosted browser reads what visitors upload:

- **Where.** Only files under the folders the browser was given, or the files a visitor uploaded:
  each path is resolved (symbolic links followed) and must still lie inside its root; a sidecar
  view (``view_file``) must be a bare file name of the trace's own folder (or of the same upload).
- **How big.** A file's size is checked from the file system before it is opened (a trace at most
  ``max_trace_bytes``, a view ``max_view_bytes``), a folder's traces are counted and summed before
  any is parsed, and JSON nesting is measured on the raw text before ``json.loads`` runs.
- **What.** :func:`check_trace` validates every field the figures read, types and ranges
  (patch ids inside the grid, stage layers inside the model, ...), so a figure cannot fail on a
  trace that passed. A refused file is named with the reason, in words; the others still open.

A folder becomes a :class:`Run`: one :class:`Entry` per document (its table row, and the path
to read the full trace from when it is picked) and, per model × method × budget, the sums the
dataset view needs (:class:`Group`): scores, visual tokens per layer, and the **keep map**: for
each LLM layer and patch position, in how many documents that patch survives there
(:func:`keep_masks`: a patch survives at a layer when a token holding it is alive there, as the
layer view draws it; frames of a video count as equal shares of their document). A trace whose
grid differs from its group's first (another image geometry) is resized onto that grid
(bilinear, so shares stay in [0, 1]).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.inputs import InputError, check_geometry, check_size, check_structure
from model.trace import SCHEMA, VIEW_PX

from . import figures


class TraceError(InputError):
    """A trace file the browser refuses; the message says which file and why, for a person."""


@dataclass(frozen=True)
class TraceLimits:
    max_trace_bytes: int = 8 * 2**20  # one trace file (the shipped model's: ~55 KB with its view)
    max_view_bytes: int = 2 * 2**20  # one frame's view JPEG
    max_depth: int = 16  # JSON nesting (a SPEC §4 trace nests 6 deep)
    max_files: int = 5000  # traces in one folder
    max_folder_bytes: int = 2 * 2**30  # all the traces of one folder together
    max_upload_files: int = 200  # files in one upload (traces and sidecar views)
    max_upload_bytes: int = 64 * 2**20  # all the files of one upload together
    max_grid: int = 128  # patches per side
    max_frames: int = 64
    max_layers: int = 512
    max_text_chars: int = 100_000  # any one string (a question, an answer, a target)


LIMITS = TraceLimits()
STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
SIDECAR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.(jpg|jpeg)")


# ------------------------------------------------------------------------------------------- parsing
def json_depth(content: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (strings skipped), in linear time."""
    bare = np.frombuffer(STRING.sub(b'""', content), dtype=np.uint8)
    steps = np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse(content: bytes, name: str, limits: TraceLimits = LIMITS) -> dict:
    """The checked trace in ``content`` (the bytes of the file called ``name``)."""
    check_size(len(content), f"trace {name}", limits.max_trace_bytes, TraceError)
    if json_depth(content) > limits.max_depth:
        raise TraceError(f"{name}: nested more than {limits.max_depth} levels deep; not a trace.")
    try:
        trace = json.loads(content)
    except (UnicodeDecodeError, ValueError) as error:
        raise TraceError(f"{name}: not valid JSON ({error}).") from None
    try:
        check_trace(trace, limits)
    except TraceError as error:
        raise TraceError(f"{name}: {error}") from None
    return trace


def read_trace(path: Path, root: Path, limits: TraceLimits = LIMITS) -> dict:
    """The checked trace at ``path``, which must lie inside ``root`` (both resolved)."""
    path = inside(path, root)
    check_size(path.stat().st_size, f"trace {path.name}", limits.max_trace_bytes, TraceError)
    return parse(path.read_bytes(), path.name, limits)


def inside(path: Path, root: Path) -> Path:
    """``path`` resolved, if it is a file inside ``root`` (resolved); else a TraceError."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise TraceError(f"{Path(path).name}: outside the trace folder; refused.")
    if not resolved.is_file():
        raise TraceError(f"{Path(path).name}: not found (an upload expires after a while: upload it again).")
    return resolved


# ------------------------------------------------------------------------------------------- schema
def _fail(what: str) -> None:
    raise TraceError(what)


def _number(value, what: str, low: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        _fail(f"{what} must be a finite number{'' if low == -math.inf else f' ≥ {low:g}'}.")
    return value


def _int(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(f"{what} must be a whole number from {low} to {high}.")
    return value


def _ints(value, what: str, low: int, high: int, max_len: int) -> list[int]:
    if not isinstance(value, list) or len(value) > max_len:
        _fail(f"{what} must be a list of at most {max_len} whole numbers.")
    for v in value:
        _int(v, f"every entry of {what}", low, high)
    return value


def _text(value, what: str, limits: TraceLimits, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or len(value) > limits.max_text_chars:
        _fail(f"{what} must be text of at most {limits.max_text_chars} characters.")


def check_trace(trace, limits: TraceLimits = LIMITS) -> None:
    """Refuse (TraceError) anything the browser's figures and tables could not draw as stated."""
    if not isinstance(trace, dict):
        _fail("not a trace (a JSON object is expected).")
    schema = trace.get("schema", 1)
    _int(schema, "schema", 1, 10**6)
    if schema > SCHEMA:
        _fail(f"schema {schema} is newer than this browser's ({SCHEMA}): update DUET-Viz.")
    missing = [k for k in ("method", "budget", "answer", "grid", "frames", "t2v", "visual_tokens_per_layer",
                           "avg_visual_tokens", "timings_ms", "flops") if k not in trace]
    if missing:
        _fail(f"not a DUET-Viz trace (no {', '.join(missing)}).")
    for key in ("method", "answer"):
        _text(trace[key], key, limits)
    for key in ("model", "question", "device", "dtype", "task", "split", "response", "salient_rule"):
        _text(trace.get(key), key, limits, optional=True)
    _number(trace["budget"], "budget", 0)
    _number(trace["avg_visual_tokens"], "avg_visual_tokens", 0)
    if not isinstance(trace.get("doc_id", 0), (int, str)) or isinstance(trace.get("doc_id"), bool):
        _fail("doc_id must be a number or text.")
    _text(str(trace.get("doc_id", "")), "doc_id", limits)
    _text(json.dumps(trace.get("target")), "target", limits)
    score = trace.get("score", {})
    if not isinstance(score, dict) or len(score) > 64:
        _fail("score must be an object of at most 64 metrics.")
    for name, value in score.items():
        _text(name, "a score's name", limits)
        _number(value, f"score {name}")
    for key in ("warnings", "salient_words"):
        words = trace.get(key, [])
        if not isinstance(words, list) or len(words) > 1000:
            _fail(f"{key} must be a list of at most 1000 texts.")
        for word in words:
            _text(word, f"every entry of {key}", limits)
    grid = trace["grid"]
    if not isinstance(grid, list) or len(grid) != 2:
        _fail("grid must be [rows, cols].")
    rows, cols = (_int(v, "grid", 1, limits.max_grid) for v in grid)
    n_patches = rows * cols
    counts = trace["visual_tokens_per_layer"]
    if not isinstance(counts, list) or not counts:
        _fail("visual_tokens_per_layer must list one count per LLM layer.")
    n_layers = len(_ints(counts, "visual_tokens_per_layer", 0, 10**7, limits.max_layers))
    frames = trace["frames"]
    if not isinstance(frames, list) or not 1 <= len(frames) <= limits.max_frames:
        _fail(f"frames must list 1 to {limits.max_frames} frame records.")
    for index, record in enumerate(frames):
        _check_frame(record, f"frame {index}", n_patches, limits)
    if len(frames) > 1:
        per_frame = trace.get("visual_tokens_per_frame_layer")
        if not isinstance(per_frame, list) or len(per_frame) != len(frames):
            _fail("visual_tokens_per_frame_layer must have one row per frame.")
        for row in per_frame:
            if len(_ints(row, "visual_tokens_per_frame_layer", 0, 10**7, limits.max_layers)) != n_layers:
                _fail("visual_tokens_per_frame_layer must have one count per LLM layer in each row.")
    stages = trace["t2v"]
    if not isinstance(stages, list) or len(stages) > n_layers:
        _fail("t2v must list at most one stage per LLM layer.")
    for stage in stages:
        _check_stage(stage, n_layers, limits)
    for key, names in (("timings_ms", ("vision", "v2v", "prefill", "decode_per_token", "total")),
                       ("flops", ("llm", "llm_full"))):
        if not isinstance(trace[key], dict):
            _fail(f"{key} must be an object.")
        for name in names:
            _number(trace[key].get(name), f"{key}.{name}", 0)


def _check_frame(record, what: str, n_patches: int, limits: TraceLimits) -> None:
    if not isinstance(record, dict):
        _fail(f"{what} must be an object.")
    _int(record.get("token_offset"), f"{what}: token_offset", 0, 10**7)
    groups = record.get("token_patches")
    if not isinstance(groups, list) or len(groups) > n_patches + 1:
        _fail(f"{what}: token_patches must list the patches of each token.")
    for patches in groups:
        _ints(patches, f"{what}: token_patches", 0, n_patches - 1, n_patches)
    box = record.get("view_box")
    if not isinstance(box, list) or len(box) != 4:
        _fail(f"{what}: view_box must be [x0, y0, x1, y1].")
    x0, y0, x1, y1 = (_number(v, f"{what}: view_box") for v in box)
    if not (0 < x1 - x0 <= 100_000 and 0 < y1 - y0 <= 100_000):
        _fail(f"{what}: view_box must be a region of positive size.")
    _ints(record.get("discarded", []), f"{what}: discarded", 0, n_patches - 1, n_patches)
    if "dominant" in record:
        if "discarded" not in record:
            _fail(f"{what}: a V2V record needs its discarded patches.")
        _ints(record["dominant"], f"{what}: dominant", 0, n_patches - 1, n_patches)
        if not isinstance(record.get("cls_kept"), bool):
            _fail(f"{what}: cls_kept must be true or false.")
        clusters = record.get("clusters")
        if not isinstance(clusters, list) or len(clusters) > n_patches:
            _fail(f"{what}: clusters must be a list.")
        for cluster in clusters:
            if not isinstance(cluster, dict):
                _fail(f"{what}: every cluster must be an object.")
            _int(cluster.get("centroid"), f"{what}: a cluster's centroid", 0, n_patches - 1)
            _ints(cluster.get("members"), f"{what}: a cluster's members", 0, n_patches - 1, n_patches)
        scores = record.get("scores")
        if not isinstance(scores, list) or len(scores) != n_patches:
            _fail(f"{what}: scores must hold one number per patch.")
        for score in scores:
            _number(score, f"{what}: every score")
    if "view_jpeg" in record:
        _text(record["view_jpeg"], f"{what}: view_jpeg", TraceLimits(max_text_chars=limits.max_view_bytes * 4 // 3 + 4))
    if "view_file" in record:
        name = record["view_file"]
        if not isinstance(name, str) or not SIDECAR_NAME.fullmatch(name):
            _fail(f"{what}: view_file must be the bare name of a .jpg file next to the trace.")


def _check_stage(stage, n_layers: int, limits: TraceLimits) -> None:
    if not isinstance(stage, dict):
        _fail("every t2v stage must be an object.")
    _int(stage.get("layer"), "a t2v stage's layer", 0, n_layers - 1)
    _int(stage.get("n_in"), "a t2v stage's n_in", 0, 10**7)
    _ints(stage.get("kept"), "a t2v stage's kept", 0, 10**7, 10**7)
    _text(stage.get("query"), "a t2v stage's query", limits, optional=True)
    if stage.get("scores") is not None:
        scores = stage["scores"]
        if not isinstance(scores, list):
            _fail("a t2v stage's scores must be a list.")
        for score in scores:
            _number(score, "every t2v score")
        if len(_ints(stage.get("ids_in"), "a t2v stage's ids_in", 0, 10**7, 10**7)) != len(scores):
            _fail("a t2v stage needs one id in ids_in per score.")


# ------------------------------------------------------------------------------------------- views
def decode_view(content: bytes, what: str) -> Image.Image:
    """A stored view as a VIEW_PX square RGB picture (JPEG only; geometry checked first)."""
    try:
        check_structure(content, TraceError)
        with Image.open(io.BytesIO(content), formats=("JPEG",)) as picture:
            check_geometry(*picture.size, what, 4 * VIEW_PX * VIEW_PX, max_side=4 * VIEW_PX, max_aspect=1.01,
                           error=TraceError)
            picture.load()
            rgb = picture.convert("RGB")
    except UnidentifiedImageError:
        raise TraceError(f"The {what} is not a JPEG.") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, TraceError):
            raise
        raise TraceError(f"The {what} is damaged ({error}).") from None
    return rgb if rgb.size == (VIEW_PX, VIEW_PX) else rgb.resize((VIEW_PX, VIEW_PX), Image.BICUBIC)


def views(trace: dict, sidecars: dict[str, Path], limits: TraceLimits = LIMITS) -> tuple[list[Image.Image], str]:
    """(each frame's stored view, a note for the visitor): frames without a view (traces older than
    schema 2) or with a view that cannot be read are drawn on a grey canvas, and the note says so.
    ``sidecars``: the view files the trace may name (bare name -> a path already checked to be in
    its folder or upload)."""
    pictures, problems = [], []
    for index, record in enumerate(trace["frames"]):
        what = f"view of frame {index}"
        try:
            if "view_jpeg" in record:
                data = record["view_jpeg"]
                check_size(len(data) * 3 // 4, what, limits.max_view_bytes, TraceError)
                pictures.append(decode_view(base64.b64decode(data, validate=True), what))
            elif "view_file" in record and record["view_file"] in sidecars:
                path = sidecars[record["view_file"]]
                check_size(path.stat().st_size, what, limits.max_view_bytes, TraceError)
                pictures.append(decode_view(path.read_bytes(), what))
            else:
                missing = record.get("view_file")
                raise TraceError(f"The {what} ({missing}) is not beside the trace." if missing else
                                 f"This trace carries no {what} (schema {trace.get('schema', 1)}).")
        except binascii.Error:
            problems.append(f"The {what} is not valid base64.")
            pictures.append(None)
        except (TraceError, OSError) as error:
            problems.append(str(error))
            pictures.append(None)
    if problems:
        note = " ".join(dict.fromkeys(problems)) + " Its patches are drawn on a grey canvas."
        pictures = [p or Image.new("RGB", (VIEW_PX, VIEW_PX), (128, 128, 128)) for p in pictures]
        return pictures, note
    return pictures, ""


# ------------------------------------------------------------------------------------------- runs
def keep_masks(trace: dict) -> np.ndarray:
    """(layers, rows, cols): the share of the trace's frames in which each patch survives at each
    LLM layer (module docstring)."""
    return np.mean([figures.layer_grids(trace, f) >= 0 for f in range(len(trace["frames"]))], axis=0)


def resized(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-layer maps onto another (rows, cols) grid, bilinear."""
    if masks.shape[1:] == tuple(grid):
        return masks
    rows, cols = grid
    return np.stack([np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((cols, rows), Image.BILINEAR))
                     for m in masks]).clip(0, 1)


def first_score(trace: dict) -> float | None:
    """The document's score: the task's first metric (``model/lmms.py``), None when it has none."""
    return next(iter(trace.get("score", {}).values()), None)


def response(trace: dict) -> str:
    """What was scored: the lmms plugin's response (the answer cut at ``until``), else the answer."""
    return trace.get("response", trace["answer"])


@dataclass
class Entry:
    """One document of a run: its table row, and where to read its trace again."""

    key: str  # matches the same document in another run: task/doc_id, else the file's name
    path: Path
    task: str
    doc: str
    question: str
    answer: str
    target: str
    score: float | None
    method: str
    budget: int
    avg_tokens: float
    group: tuple

    @property
    def wrong(self) -> bool:
        """Not full marks (a binary metric: wrong; a graded one: below 1)."""
        return self.score is not None and self.score < 1


@dataclass
class Group:
    """What the dataset view shows for one model × method × budget of a run."""

    model: str
    method: str
    budget: int
    grid: tuple[int, int]
    n_layers: int
    n_frames: int
    docs: int = 0
    scores: list[float] = field(default_factory=list)
    tokens: np.ndarray | None = None  # sum over documents of the visual tokens per layer
    avg_tokens: float = 0.0  # sum over documents of avg_visual_tokens
    kept: np.ndarray | None = None  # sum over documents of keep_masks, (layers, rows, cols)

    def add(self, trace: dict) -> None:
        self.docs += 1
        counts = np.asarray(trace["visual_tokens_per_layer"], dtype=float)
        masks = resized(keep_masks(trace), self.grid)
        self.tokens = counts if self.tokens is None else self.tokens + counts
        self.kept = masks if self.kept is None else self.kept + masks
        self.avg_tokens += trace["avg_visual_tokens"]
        if first_score(trace) is not None:
            self.scores.append(first_score(trace))

    @property
    def label(self) -> str:
        return "full" if self.method == "full" else f"{self.method} {self.budget}"

    @property
    def keep_map(self) -> np.ndarray:
        return self.kept / self.docs

    @property
    def accuracy(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None


@dataclass
class Run:
    """The traces of one folder (or one upload): documents, refusals, dataset groups."""

    name: str
    entries: dict[str, Entry] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    groups: dict[tuple, Group] = field(default_factory=dict)
    sidecars: dict[Path, dict[str, Path]] = field(default_factory=dict)  # folder -> its view files
    root: Path | None = None

    def add(self, path: Path, root: Path, limits: TraceLimits = LIMITS) -> None:
        """Read, check and index the trace at ``path`` (inside ``root``), or note its refusal."""
        try:
            trace = read_trace(path, root, limits)
            grid, n_layers = tuple(trace["grid"]), len(trace["visual_tokens_per_layer"])
            model, method, budget = trace.get("model", "?"), trace["method"], int(trace["budget"])
            key = (model, method, budget, n_layers)
            doc = trace.get("doc_id")
            entry = Entry(
                key=f"{trace['task']}/{doc}" if "task" in trace and doc is not None else Path(path).stem,
                path=Path(path).resolve(), task=trace.get("task", ""), doc="" if doc is None else str(doc),
                question=trace.get("question", ""), answer=response(trace),
                target="" if trace.get("target") is None else str(trace["target"]), score=first_score(trace),
                method=method, budget=budget, avg_tokens=trace["avg_visual_tokens"], group=key)
            if entry.key in self.entries:
                raise TraceError(f"{Path(path).name}: a second trace of document {entry.key}; the first is shown.")
            self.groups.setdefault(key, Group(model, method, budget, grid, n_layers, len(trace["frames"]))).add(trace)
            self.entries[entry.key] = entry
        except (TraceError, OSError) as error:
            self.refused.append(str(error) if isinstance(error, TraceError) else f"{Path(path).name}: {error}")

    def trace(self, key: str, limits: TraceLimits = LIMITS) -> tuple[dict, list[Image.Image], str]:
        """(the document's checked trace, its frames' views, a note) read again from its file."""
        entry = self.entries[key]
        trace = read_trace(entry.path, self.root or entry.path.parent, limits)
        pictures, note = views(trace, self.sidecars.get(entry.path.parent, {}), limits)
        return trace, pictures, note


def scan_folder(folder: str | Path, limits: TraceLimits = LIMITS) -> Run:
    """Every ``*.json`` trace under ``folder`` (any depth), each checked; their count and bytes are
    bounded before any is read (a folder over the bounds is refused whole, with the reason)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise TraceError(f"{folder}: not a folder.")
    run = Run(name=root.name, root=root)
    paths, total, walked = [], 0, 0
    for path in root.rglob("*"):
        walked += 1
        if walked > limits.max_files * 10:
            raise TraceError(f"{folder}: more than {limits.max_files * 10} files; give the folder of one run.")
        if path.suffix.lower() in (".jpg", ".jpeg") and path.resolve().is_relative_to(root) and path.is_file():
            run.sidecars.setdefault(path.parent.resolve(), {})[path.name] = path.resolve()
        if path.suffix.lower() != ".json":
            continue
        paths.append(path)
        if len(paths) > limits.max_files:
            raise TraceError(f"{folder}: more than {limits.max_files} trace files; give a smaller folder.")
        total += path.stat().st_size if path.is_file() else 0
        if total > limits.max_folder_bytes:
            raise TraceError(f"{folder}: its trace files pass {limits.max_folder_bytes / 2**30:.0f} GB together.")
    for path in sorted(paths):
        run.add(path, root, limits)
    return run


def scan_upload(files: list[str], limits: TraceLimits = LIMITS) -> Run:
    """The uploaded ``files`` (paths in Gradio's upload folder) as a run: the ``.json`` files are
    traces, the ``.jpg`` files the sidecar views they may name; each file is its own root."""
    if len(files) > limits.max_upload_files:
        raise TraceError(f"At most {limits.max_upload_files} files per upload ({len(files)} given).")
    run = Run(name="upload")
    paths = [Path(f) for f in files]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > limits.max_upload_bytes:
        raise TraceError(f"The upload is too large ({total / 2**20:.1f} MB; at most "
                         f"{limits.max_upload_bytes / 2**20:.0f} MB together): serve the folder with --traces.")
    views_by_name = {p.name: p.resolve() for p in paths if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()}
    for path in paths:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            continue
        if path.suffix.lower() != ".json":
            run.refused.append(f"{path.name}: neither a trace (.json) nor a view (.jpg); ignored.")
            continue
        run.sidecars[path.resolve().parent] = views_by_name
        run.add(path, path.parent, limits)
    return run


# ------------------------------------------------------------------------------------------- comparison
def normalised(answer: str) -> str:
    return " ".join(answer.lower().split()).rstrip(".")


def paired(a: Run, b: Run) -> list[tuple[str, Entry, Entry]]:
    """The documents in both runs, those whose answers disagree first (then by key)."""
    keys = [k for k in a.entries if k in b.entries]
    rows = [(k, a.entries[k], b.entries[k]) for k in keys]
    return sorted(rows, key=lambda r: (normalised(r[1].answer) == normalised(r[2].answer), r[0]))
