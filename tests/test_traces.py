"""Traces made elsewhere, read by the trace browser (duet_viz/traces.py, duet_viz/browser.py):
from the CLI and the lmms-eval plugin, two runs compared, the keep map against a hand-computed
one, and bad files refused with a message."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from duet_viz import figures
from duet_viz.browser import Browser
from duet_viz.traces import TraceLimits, keep_masks, normalised, paired, read_trace, scan_folder, scan_upload
from model.trace import SCHEMA, view_image

from .test_figures import hand_trace
from .test_lmms import ENV, lmms_eval

N_DOCS = 8


def pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=float)


def image_source(figure) -> Image.Image:
    """The picture under a figure (its go.Image data URI)."""
    uri = figure.data[0].source
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


# ------------------------------------------------------------------------------------------- CLI
def test_cli_traces_carry_their_views_and_open_in_the_browser(tiny_checkpoint, image, tmp_path):
    folder = tmp_path / "cli-run"
    folder.mkdir()
    source = tmp_path / "in.png"
    image.save(source)
    for method in ("duet", "fastv"):
        done = subprocess.run([sys.executable, "-m", "model", "answer", "--model", str(tiny_checkpoint), "--image",
                               str(source), "--question", "what color is the circle ?", "--method", method,
                               "--budget", "64", "--max-new-tokens", "2", "--json"],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert done.returncode == 0, done.stderr
        (folder / f"{method}.json").write_text(done.stdout)
    run = scan_folder(folder)
    assert run.refused == [] and sorted(run.entries) == ["duet", "fastv"]
    trace, views, note = run.trace("duet")
    assert trace["schema"] == SCHEMA and "view_jpeg" in trace["frames"][0] and note == ""
    expected = view_image(image, trace["frames"][0]["view_box"])
    # the same picture, up to JPEG's loss (on the fixture's per-pixel noise: compare patch means)
    assert views[0].size == expected.size
    assert np.abs(pixels(views[0].resize((24, 24), Image.BOX)) - pixels(expected.resize((24, 24), Image.BOX))).max() < 8
    browser = Browser()
    key = browser.serve(run)
    header, answers, latency, clusters, layer_view, *_ = browser.draw(key, "duet", 3)
    assert answers == figures.answer_rows([trace]) and latency == figures.latency_rows([trace])
    assert np.array_equal(pixels(image_source(layer_view)), pixels(image_source(figures.layer_view(
        figures.on_view(trace), views[0], layer=3))))
    heatmaps = [t for t in layer_view.data if t.type == "heatmap"]
    assert np.allclose(np.asarray(heatmaps[3].z, dtype=float), np.round(figures.layer_grids(trace)[3], 3))
    merged = next(t for t in clusters.data if t.name == "merged")
    assert sorted(np.flatnonzero(~np.isnan(np.asarray(merged.z, dtype=float).flatten())).tolist()) == sorted(
        p for c in trace["frames"][0]["clusters"] for p in c["members"])



def test_a_qwen_trace_opens_in_the_browser_on_its_own_non_square_grid(qwen_engine, wide_image, tmp_path):
    """A stored view is a square JPEG whatever the image; the browser stretches it back onto the
    trace's 10 x 15 grid, so its picture is the live run's, up to JPEG's loss."""
    from model.budget import ReductionConfig
    from model.trace import attach_views

    live = qwen_engine.answer(wide_image, "what color is the blue square ?", ReductionConfig("duet", 64),
                              max_new_tokens=2)
    (tmp_path / "duet.json").write_text(json.dumps(attach_views(live, [wide_image])))
    trace, views, note = scan_folder(tmp_path).trace("duet")
    assert trace["grid"] == [10, 15] and note == ""
    browser = Browser()
    _, _, _, clusters, layer_view, *_ = browser.draw(browser.serve(scan_folder(tmp_path)), "duet", 14)
    for stored, drawn in ((clusters, figures.cluster_map(live, wide_image)),
                          (layer_view, figures.layer_view(live, wide_image, layer=14))):
        assert image_source(stored).size == image_source(drawn).size == (336, 224)
        assert np.abs(pixels(image_source(stored).resize((15, 10), Image.BOX))
                      - pixels(image_source(drawn).resize((15, 10), Image.BOX))).max() < 8
        assert list(stored.layout.yaxis.range) == [224, 0]


# ------------------------------------------------------------------------------------------- lmms-eval
@pytest.fixture(scope="module")
def lmms_runs(tmp_path_factory):
    """The local synthetic task, answered by the shipped model in full and by DUET at 64, with
    traces (DUET's views as sidecar files), and lmms-eval's own per-sample log of each run."""
    from model.lab.lmms_task import write_task

    base = tmp_path_factory.mktemp("lmms-traces")
    task = write_task(base / "task", "test", N_DOCS)
    runs = {}
    for name, args in (("full", "method=full"), ("duet-64", "method=duet,budget=64,trace_images=sidecar")):
        lmms_eval(task, base / f"log-{name}", f"{args},traces={base / name}", [sys.executable], 1)
        samples = next((base / f"log-{name}").rglob("*samples*.jsonl")).read_text().splitlines()
        runs[name] = (base / name, {row["doc_id"]: row for row in map(json.loads, samples)})
    return runs


def test_lmms_traces_name_their_document_target_and_score_as_the_harness_logs_them(lmms_runs):
    for name, (folder, logged) in lmms_runs.items():
        run = scan_folder(folder)
        assert run.refused == [] and len(run.entries) == N_DOCS, name
        for doc_id, sample in logged.items():
            entry = run.entries[f"duet_synthetic/{doc_id}"]
            assert entry.target == sample["target"]
            assert entry.score == sample["accuracy"]
            scored = sample["filtered_resps"]
            assert entry.answer == (scored[0] if isinstance(scored, list) else scored)
        trace, views, note = run.trace("duet_synthetic/0")
        assert trace["split"] == "test" and note == "" and views[0].size == (336, 336)
        group = next(iter(run.groups.values()))
        assert group.accuracy == pytest.approx(np.mean([s["accuracy"] for s in logged.values()]))
    sidecars = sorted(p.name for p in lmms_runs["duet-64"][0].glob("*.jpg"))
    assert sidecars == sorted(f"duet_synthetic-{i}.f0.jpg" for i in range(N_DOCS))


def test_two_runs_side_by_side_put_the_disagreeing_documents_first(lmms_runs):
    a, b = scan_folder(lmms_runs["full"][0]), scan_folder(lmms_runs["duet-64"][0])
    answers = {k: (a.entries[k].answer, b.entries[k].answer) for k in a.entries}
    differ = {k for k, (x, y) in answers.items() if normalised(x) != normalised(y)}
    assert differ and len(differ) < N_DOCS  # the pair this test needs: some answers differ, some agree
    order = [k for k, _, _ in paired(a, b)]
    assert set(order[:len(differ)]) == differ and len(order) == N_DOCS
    browser = Browser()
    key = browser.serve(a, b)
    table, keys = browser.rows(key, False, "(all)", "(all)", False)
    assert keys == order
    assert [row[8] for row in table.value["data"]] == ["no"] * len(differ) + ["yes"] * (N_DOCS - len(differ))
    _, only_keys = browser.rows(key, False, "(all)", "(all)", True)
    assert set(only_keys) == differ
    header, answers_rows, _, clusters_a, view_a, clusters_b, view_b, pyramid, *_ = browser.draw(key, order[0], 5)
    assert [row[0] for row in answers_rows] == ["full", "duet"]
    assert clusters_a is not None and clusters_b is not None and view_b is not None
    assert "no vision-side merge" in clusters_a.layout.title.text and "dominant" in clusters_b.layout.title.text
    x, y = answers[order[0]]
    assert f"A: **{x}**" in header and f"B: **{y}**" in header
    png = Image.open(browser.keep_png(key))
    assert png.width > 12 * 96  # a tile per layer of the shipped model's 12


# ------------------------------------------------------------------------------------------- keep map
def small_traces() -> list[dict]:
    """Three hand-made 4x4, 4-layer traces of one method (tests/test_figures.hand_trace's geometry)."""
    first = hand_trace()  # layers 0-1: the 8 patches in tokens; layer 2 keeps tokens 0, 2, 4; layer 3 none
    second = hand_trace()
    second["t2v"] = [{"layer": 2, "n_in": 5, "ids_in": list(range(5)), "kept": [1, 3], "scores": [1, 2, 3, 4, 5]},
                     {"layer": 3, "n_in": 2, "ids_in": [1, 3], "kept": [1], "scores": [2, 1]}]
    third = hand_trace()
    record = third["frames"][0]
    record.update(token_patches=[[p] for p in range(16)], n_tokens=16, discarded=[])
    for key in ("dominant", "clusters", "scores", "cls_kept"):
        del record[key]
    third["t2v"] = [{"layer": 1, "n_in": 16, "ids_in": list(range(16)), "kept": list(range(8)), "scores": None}]
    third["visual_tokens_per_layer"] = [16, 8, 8, 8]
    return [first, second, third]


def test_the_keep_map_is_the_share_of_documents_in_which_each_patch_survives(tmp_path):
    # Surviving patches per layer, read off each trace by hand (tokens -> their patches).
    by_hand = [
        [{0, 5, 1, 2, 6, 4, 8, 9}, {0, 5, 1, 2, 6, 4, 8, 9}, {5, 4, 8, 9}, set()],
        [{0, 5, 1, 2, 6, 4, 8, 9}, {0, 5, 1, 2, 6, 4, 8, 9}, {0, 1, 2, 6}, {0}],
        [set(range(16)), set(range(8)), set(range(8)), set(range(8))],
    ]
    expected = np.zeros((4, 16))
    for layers in by_hand:
        for layer, patches in enumerate(layers):
            expected[layer, sorted(patches)] += 1 / 3
    for index, trace in enumerate(small_traces()):
        (tmp_path / f"doc-{index}.json").write_text(json.dumps(trace))
    run = scan_folder(tmp_path)
    assert run.refused == [] and len(run.groups) == 1
    group = next(iter(run.groups.values()))
    assert np.allclose(group.keep_map.reshape(4, 16), expected)
    two_frames = hand_trace()  # a video: frame 1 discards everything, so each patch counts half
    two_frames["frames"].append({**two_frames["frames"][0], "index": 1, "token_offset": 5, "token_patches": [[]] * 5,
                                 "discarded": list(range(16))})
    assert np.allclose(keep_masks(two_frames)[0].flatten(), [0.5 if p in by_hand[0][0] else 0 for p in range(16)])


# ------------------------------------------------------------------------------------------- refusals
def with_view(trace: dict) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (336, 336), (10, 200, 10)).save(buffer, format="JPEG")
    trace["frames"][0]["view_jpeg"] = base64.b64encode(buffer.getvalue()).decode()
    return trace


def broken(edit):
    trace = json.loads(json.dumps(hand_trace()))  # hand_trace shares its lists between calls
    edit(trace)
    return json.dumps(trace)


BAD = {
    "not-json.json": ("{'method': 'duet'", "not valid JSON"),
    "array.json": ("[1, 2, 3]", "a JSON object is expected"),
    "deep.json": ("[" * 400 + "]" * 400, "nested more than 16 levels"),
    "empty.json": ("", "empty"),
    "not-a-trace.json": (json.dumps({"results": {"duet_synthetic": {}}}), "not a DUET-Viz trace"),
    "patch-out-of-grid.json": (broken(lambda t: t["frames"][0]["discarded"].append(16)), "discarded"),
    "stage-past-the-model.json": (broken(lambda t: t["t2v"][0].update(layer=9)), "t2v stage's layer"),
    "newer-schema.json": (broken(lambda t: t.update(schema=SCHEMA + 1)), "newer than this browser"),
    "escaping-view.json": (broken(lambda t: t["frames"][0].update(view_file="../../etc/passwd.jpg")), "bare name"),
    "nan-timing.json": (broken(lambda t: t["timings_ms"].update(prefill=float("nan"))), "timings_ms.prefill"),
    "short-scores.json": (broken(lambda t: t["frames"][0].update(scores=[0.1])), "one number per patch"),
    "bad-grid.json": (broken(lambda t: t.update(grid=[4, "4"])), "grid"),
}


def test_bad_trace_files_are_refused_with_a_reason_and_the_others_open(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(with_view(hand_trace())))
    for name, (content, _) in BAD.items():
        (folder / name).write_text(content)
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps(hand_trace()))
    (folder / "link.json").symlink_to(outside)
    limit = (folder / "good.json").stat().st_size + 1000
    (folder / "huge.json").write_text(json.dumps(hand_trace()) + " " * limit)
    run = scan_folder(folder, TraceLimits(max_trace_bytes=limit))
    assert list(run.entries) == ["good"]
    for name, (_, reason) in BAD.items():
        message = next((m for m in run.refused if name in m), None)
        assert message is not None and reason in message, (name, message)
    assert "link.json: outside the trace folder; refused." in run.refused
    assert any("huge.json file is too large" in m for m in run.refused)
    with pytest.raises(Exception, match="outside the trace folder"):
        read_trace(folder / ".." / "secret.json", folder)
    trace, views, note = run.trace("good")
    assert views[0].getpixel((100, 100))[1] > 150 and note == ""


def test_a_trace_without_views_opens_on_a_grey_canvas_and_says_so(tmp_path):
    old = hand_trace()  # schema 1: no schema field, no view
    (tmp_path / "old.json").write_text(json.dumps(old))
    missing = hand_trace()
    missing.update(schema=SCHEMA)
    missing["frames"][0]["view_file"] = "missing.f0.jpg"
    (tmp_path / "sidecar.json").write_text(json.dumps(missing))
    run = scan_folder(tmp_path)
    _, views, note = run.trace("old")
    assert "carries no view of frame 0 (schema 1)" in note and "grey canvas" in note
    assert views[0].getpixel((5, 5)) == (128, 128, 128)
    assert "(missing.f0.jpg) is not beside the trace" in run.trace("sidecar")[2]


def test_an_upload_reads_its_own_files_only_and_refuses_the_rest(tmp_path):
    good = tmp_path / "a" / "good.json"
    good.parent.mkdir()
    good.write_text(json.dumps(with_view(hand_trace())))
    notes = tmp_path / "b" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("hello")
    bad = tmp_path / "c" / "bad.json"
    bad.parent.mkdir()
    bad.write_text("[" * 100 + "]" * 100)
    run = scan_upload([str(good), str(notes), str(bad)])
    assert list(run.entries) == ["good"]
    assert any("notes.txt" in m and "neither a trace" in m for m in run.refused)
    assert any(m.startswith("bad.json: nested") for m in run.refused)
    with pytest.raises(Exception, match="At most 2 files"):
        scan_upload([str(good)] * 3, TraceLimits(max_upload_files=2))
    with pytest.raises(Exception, match="The upload is too large"):
        scan_upload([str(good)], TraceLimits(max_upload_bytes=good.stat().st_size - 1))
    browser = Browser()
    key = browser.serve(run)
    assert browser.draw(key, "good", 2)[4] is not None
    with pytest.raises(Exception, match="The LLM layer must be a whole number"):
        browser.draw(key, "good", float("nan"))
    with pytest.raises(Exception, match="Upload one or more trace files"):
        Browser().open_upload([], None)
