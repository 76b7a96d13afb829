"""The Gradio app, launched in-process on loopback: its API and, in Chromium, its page."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duet_viz import figures
from duet_viz.figures import NO_ANSWER
from duet_viz.page import ASSETS
from model.budget import ReductionConfig
from model.engine import DuetLlava

EXAMPLE = ASSETS / "chelsea.jpg"
QUESTION = "what animal is this ?"
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", Path(__file__).resolve().parent.parent / "artifacts"))


def array(value) -> np.ndarray:
    """Plotly JSON stores numpy arrays as typed-array dicts ({dtype, bdata, shape})."""
    if isinstance(value, dict):
        data = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return data.reshape([int(v) for v in str(shape).split(",")]) if shape else data
    return np.asarray(value, dtype=float)


def call_run(client, method="duet", budget="64", compare=("full",), layer=20):
    from gradio_client import handle_file

    return client.predict(handle_file(str(EXAMPLE)), QUESTION, method, budget, 96, list(compare), None, None, 4,
                          "", "", "", 4, layer, None, 8, api_name="/run")


def test_api_run_matches_the_engine_trace(client, engine):
    shown, clusters, layer_view, pyramid, answers, latency, note, trace_path, salient, frame, grid, strip, about = \
        call_run(client)
    assert frame["visible"] is False and grid["visible"] is False and strip["visible"] is False
    with Image.open(EXAMPLE) as image:
        expected = {m: engine.answer(image.convert("RGB"), QUESTION, ReductionConfig(m, 64), max_new_tokens=4)
                    for m in ("duet", "full")}
    served_traces = {t["method"]: t for t in json.loads(Path(trace_path).read_text())}
    for method, trace in expected.items():
        for key in ("answer", "frames", "t2v", "visual_tokens_per_layer", "generated_ids"):
            assert served_traces[method][key] == trace[key], (method, key)
    assert answers["data"] == [["duet", 64, expected["duet"]["avg_visual_tokens"], expected["duet"]["answer"] or NO_ANSWER],
                               ["full", "—", 576.0, expected["full"]["answer"] or NO_ANSWER]]
    assert about == ""  # a checkpoint without the scenes' training.json gets no note
    assert [row[0] for row in latency["data"]] == ["duet", "full"]
    assert shown["value"] == "duet"

    view = json.loads(layer_view["plot"])
    heatmaps = [t for t in view["data"] if t["type"] == "heatmap"]
    assert len(heatmaps) == engine.n_layers
    assert [t["visible"] for t in heatmaps].index(True) == 20
    grids = figures.layer_grids(expected["duet"])
    assert np.allclose(array(heatmaps[20]["z"]), np.round(grids[20], 3))
    record = expected["duet"]["frames"][0]
    for name, patches in (("merged", [p for c in record["clusters"] for p in c["members"]]),
                          ("discarded", record["discarded"]), ("dominant", record["dominant"])):
        kind = next(t for t in json.loads(clusters["plot"])["data"] if t.get("name") == name)
        filled = np.flatnonzero(~np.isnan(array(kind["z"]).astype(float).flatten()))
        assert filled.tolist() == sorted(patches), name
    assert len(record["discarded"]) == 576 - 84 - 68  # 64 preset: CLS + 84 dominant, a pool of 4 x 17
    assert [array(t["y"]).tolist() for t in json.loads(pyramid["plot"])["data"]] == [
        expected["duet"]["visual_tokens_per_layer"], expected["full"]["visual_tokens_per_layer"]]


def test_api_overlay_png_is_the_layer_view_of_the_session_trace(client, engine):
    trace_path = call_run(client, compare=())[7]
    trace = json.loads(Path(trace_path).read_text())
    png = client.predict("duet", 18, 0, api_name="/overlay")
    with Image.open(EXAMPLE) as image:
        expected = np.asarray(figures.overlay_png(trace, image.convert("RGB"), layer=18))
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="nope"), "not in the list of choices"),
    (dict(budget="0"), "not in the list of choices"),
    (dict(budget="custom", custom=0), "less than minimum value 1"),
    (dict(budget="custom", custom=5000), "greater than maximum value 576"),
])
def test_api_rejects_bad_settings_with_a_message(client, kwargs, message):
    from gradio_client import handle_file

    args = dict(method="duet", budget="64", custom=96)
    args.update(kwargs)
    with pytest.raises(Exception, match=message):
        client.predict(handle_file(str(EXAMPLE)), QUESTION, args["method"], args["budget"], args["custom"], [],
                       None, None, 4, "", "", "", 4, 0, None, 8, api_name="/run")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package; .ci/run installs it


def open_page(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
    return browser, browser.new_page(viewport={"width": 1500, "height": 1400})


def test_browser_example_run_and_layer_scrub(served):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_page(p)
        page.goto(served)
        page.get_by_text(QUESTION, exact=True).click()  # an example click loads and runs it
        page.wait_for_selector("#layer-view .js-plotly-plot .heatmaplayer", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "app-after-run.png"), full_page=True)
        page.get_by_role("button", name="Run").click()  # the same request again: served from the cache
        page.get_by_text("Cached result").wait_for(timeout=30_000)
        view = page.locator("#layer-view")
        slider = page.locator("#layer-slider input[type=range]")
        slider.focus()
        page.keyboard.press("ArrowLeft")  # layer 15: all of DUET's V2V tokens, before the first stage drops half
        page.wait_for_timeout(300)
        before = ARTIFACTS / "layer-view-15.png"
        view.screenshot(path=str(before))
        for _ in range(11):
            page.keyboard.press("ArrowRight")
        page.wait_for_timeout(300)
        after = ARTIFACTS / "layer-view-26.png"
        view.screenshot(path=str(after))
        title = page.locator("#layer-view .gtitle").text_content()
        browser.close()
    assert "layer 26: 0 visual tokens survive" in title
    a = np.asarray(Image.open(before).convert("L"), dtype=float)
    b = np.asarray(Image.open(after).convert("L"), dtype=float)
    assert a.shape == b.shape
    changed = np.mean(np.abs(a - b) > 20)
    assert changed > 0.1, f"only {changed:.1%} of the layer view changed when scrubbing 15 -> 26"


CLIP = ASSETS / "clip-moving.webm"


def test_api_video_clip_runs_per_frame_v2v_and_joint_t2v(client, engine):
    from gradio_client import handle_file

    from model.video import read_frames

    out = client.predict(None, "what color is the star ?", "duet", "64", 96, [], None, None, 4, "", "",
                         "", 2, 6, handle_file(str(CLIP)), 4, api_name="/run")
    trace = json.loads(Path(out[7]).read_text())
    expected = engine.answer(read_frames(CLIP, 4).frames, "what color is the star ?",
                             ReductionConfig("duet", 64), max_new_tokens=2)
    for key in ("frames", "t2v", "visual_tokens_per_frame_layer", "generated_ids"):
        assert trace[key] == expected[key], key
    frame, grid, strip = out[9], out[10], out[11]
    assert frame["visible"] and frame["maximum"] == 3
    assert grid["visible"] and strip["visible"] and len(strip["value"]) == 4
    z = array(json.loads(grid["value"]["plot"])["data"][0]["z"])
    assert z.tolist() == expected["visual_tokens_per_frame_layer"]


def test_api_bad_video_is_a_message(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video at all")
    with pytest.raises(Exception, match="could not be read as a video"):
        client.predict(None, QUESTION, "duet", "64", 96, [], None, None, 4, "", "", "", 2, 0,
                       handle_file(str(bad)), 4, api_name="/run")


def test_browser_video_upload_run_and_frame_scrub(served, tmp_path):
    """A user uploads an mp4, asks, runs, then scrubs frames (server) and layers (browser)."""
    from playwright.sync_api import sync_playwright

    from model.video import read_frames, write_clip

    clip = write_clip(tmp_path / "upload.mp4", read_frames(CLIP, 8).frames, fps=4)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_page(p)
        page.goto(served)
        page.get_by_role("tab", name="Video").click()
        page.locator("input[type=file][accept*='video']").set_input_files(str(clip))
        page.get_by_label("Question").fill("what color is the star ?")
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Run").click()
        page.wait_for_selector("#layer-view .js-plotly-plot .heatmaplayer", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "app-video-after-run.png"), full_page=True)
        view = page.locator("#layer-view")
        before = ARTIFACTS / "video-frame-0.png"
        view.screenshot(path=str(before))
        frame = page.locator("#frame-slider input[type=range]")
        frame.focus()
        for _ in range(5):
            page.keyboard.press("ArrowRight")
        page.wait_for_timeout(2500)  # a frame change re-renders on the server (no model run)
        after = ARTIFACTS / "video-frame-5.png"
        view.screenshot(path=str(after))
        browser.close()
    a = np.asarray(Image.open(before).convert("L"), dtype=float)
    b = np.asarray(Image.open(after).convert("L"), dtype=float)
    assert a.shape == b.shape and np.mean(np.abs(a - b) > 20) > 0.005


def test_a_repeated_request_reuses_its_result_without_running_the_model(engine, tmp_path, monkeypatch):
    from duet_viz.ui import App

    app = App(engine)
    args = (QUESTION, "duet", "64", 96, ["full"], None, None, 4, "", "", "", 2, 0)
    first = app.run(str(EXAMPLE), *args)
    assert "Cached result" not in first[7]
    same_bytes = shutil.copy(EXAMPLE, tmp_path / "renamed-upload.jpg")  # another temp path, same file

    def no_model(*a, **k):
        raise AssertionError("the model ran for a request whose result is kept")

    monkeypatch.setattr(app.engine, "answer", no_model)
    again = app.run(same_bytes, *args)
    assert again[0] == first[0] and "Cached result" in again[7]
    with pytest.raises(Exception, match="model ran"):  # any other setting is a new request
        app.run(same_bytes, QUESTION, "duet", "128", *args[3:])


def test_example_results_are_computed_at_start_up_and_never_evicted(engine):
    from duet_viz.ui import DEFAULTS, App

    app = App(engine, max_results=2, session_share=1.0)  # the global bound alone (shares: test_hostile)
    app.register_examples([(EXAMPLE, QUESTION)], eager=True).join()
    pinned = next(iter(app.results))
    for n_tokens in range(1, 4):  # more other results than the cache keeps
        app.run(str(EXAMPLE), QUESTION, "fastv", "64", 96, [], None, None, 4, "", "", "", n_tokens, 0)
    d = DEFAULTS
    out = app.run(str(EXAMPLE), QUESTION, d["method"], d["budget"], d["custom_budget"], d["compare"], d["k1"],
                  d["k2"], d["cluster_width"], d["stage_layers"], d["stage_ratios"], d["salient"],
                  d["max_new_tokens"], 0)
    assert out[0] == pinned and "Cached result" in out[7]
    assert len(app.results) == 3  # two evictable results + the pinned example


def test_browser_video_example_click_opens_the_video_tab_and_runs(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page = open_page(p)
        page.goto(served)
        page.get_by_text("what color is the star ?", exact=True).last.click()  # the video example's row
        page.locator("#frame-slider input[type=range]").wait_for(timeout=60_000)
        page.wait_for_selector("#layer-view .js-plotly-plot .heatmaplayer", timeout=60_000)
        page.wait_for_timeout(500)
        selected = page.get_by_role("tab", name="Video").get_attribute("aria-selected")
        page.screenshot(path=str(ARTIFACTS / "app-video-example.png"), full_page=True)
        browser.close()
    assert selected == "true"


def test_api_positions_choice_reaches_every_compared_method(client, engine):
    from gradio_client import handle_file

    out = client.predict(handle_file(str(EXAMPLE)), QUESTION, "duet", "64", 96, ["visionzip"], None, None, 4, "", "",
                         "", 3, 0, None, 8, "original", api_name="/run")
    traces = {t["method"]: t for t in json.loads(Path(out[7]).read_text())}
    with Image.open(EXAMPLE) as image:
        for method in ("duet", "visionzip"):
            expected = engine.answer(image.convert("RGB"), QUESTION, ReductionConfig(method, 64, positions="original"),
                                     max_new_tokens=3)
            assert traces[method]["generated_ids"] == expected["generated_ids"]
            assert traces[method]["positions"] == "original"


def test_the_api_answers_with_the_image_and_question_alone(client, engine):
    from gradio_client import handle_file

    out = client.predict(handle_file(str(EXAMPLE)), QUESTION, api_name="/run")
    traces = {t["method"]: t for t in json.loads(Path(out[7]).read_text())}
    assert set(traces) == {"duet", "full"} and traces["duet"]["budget"] == 64
    with Image.open(EXAMPLE) as image:
        expected = engine.answer(image.convert("RGB"), QUESTION, ReductionConfig("duet", 64), max_new_tokens=16)
    assert traces["duet"]["generated_ids"] == expected["generated_ids"]
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/run"]["parameters"]
    assert [p["parameter_name"] for p in api if not p["parameter_has_default"]] == ["image"]


def test_the_shipped_models_note_names_its_domain_and_the_words_it_does_not_know(engine):
    from duet_viz.ui import model_note, unknown_words

    shipped = DuetLlava.load(device="cpu")
    assert shipped.training["vocabulary"]
    assert unknown_words(shipped.tokenizer, "what animal is this cat ?") == ["animal", "this", "cat"]
    assert unknown_words(shipped.tokenizer, "what color is the star ?") == []
    note = model_note(shipped, "what animal is this ?")
    assert "synthetic" in note and "**animal**, **this**" in note and "llava-hf/llava-1.5-7b-hf" in note
    assert "never seen" not in model_note(shipped, "what color is the star ?")
    assert model_note(engine, "what animal is this ?") == ""


def test_the_default_comparison_on_the_video_example_warns_that_full_runs_past_the_context_window(engine):
    """The video example at the page's defaults (DUET at 64 beside the full model, 8 frames): the
    full model's 8 x 576 visual tokens pass the checkpoint's 4096 positions, and the page says so
    under the answers, with how many frames would fit."""
    from duet_viz.page import VIDEO_EXAMPLES
    from duet_viz.ui import DEFAULTS, App

    name, question = VIDEO_EXAMPLES[0]
    app = App(engine)
    out = app.run(None, question, video=str(ASSETS / name), mode="video")
    traces = app.recall(out[0])["traces"]
    assert DEFAULTS["compare"] == ["full"] and DEFAULTS["num_frames"] == 8 and set(traces) == {"duet", "full"}
    assert traces["duet"]["warnings"] == [] and len(traces["full"]["warnings"]) == 1
    note = out[-1]
    assert note.startswith("**Warning.** full: this run needs") and "4096 (max_position_embeddings)" in note
    assert "At most 7 frames fit with full." in note
    assert ("Full (576)", "full") in out[1].choices
