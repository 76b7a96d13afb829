"""The app on a tiny random Qwen2.5-VL, served by ``python app.py --model DIR``: a non-square image
draws on its own (h / 28) x (w / 28) grid, budgets are per image, video is refused in words."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duet_viz import figures
from model.budget import ReductionConfig

from .test_app import ARTIFACTS, array, open_page

QUESTION = "what color is the blue square ?"
ROWS, COLS = 10, 15  # the 280 x 420 px wide_image
WIDTH, HEIGHT = figures.VIEW_PX, figures.VIEW_PX * ROWS // COLS  # 336 x 224


@pytest.fixture(scope="module")
def wide_file(wide_image, tmp_path_factory):
    path = tmp_path_factory.mktemp("wide") / "wide.png"
    wide_image.save(path)
    return path


def run(client, path, budget="64", compare=("full",), layer=14, k1=None, k2=None):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), QUESTION, "duet", budget, 96, list(compare), k1, k2, 4, "", "", "",
                          3, layer, None, 1, api_name="/run")


def test_figures_draw_on_the_images_own_grid(qwen_client, qwen_engine, wide_file, wide_image):
    shown, clusters, layer_view, pyramid, answers, _, _, trace_path, *_ = run(qwen_client, wide_file)
    traces = {t["method"]: t for t in json.loads(Path(trace_path).read_text())}
    expected = qwen_engine.answer(wide_image, QUESTION, ReductionConfig("duet", 64), max_new_tokens=3)
    assert traces["duet"]["grid"] == [ROWS, COLS]
    for key in ("frames", "t2v", "visual_tokens_per_layer", "generated_ids"):
        assert traces["duet"][key] == expected[key], key
    assert ["Full", "full"] in shown["choices"]  # no fixed token count per image on Qwen2.5-VL
    assert answers["data"][1][2] == ROWS * COLS

    for figure in (json.loads(clusters["plot"]), json.loads(layer_view["plot"])):
        layout, picture = figure["layout"], figure["data"][0]
        assert layout["xaxis"]["range"] == [0, WIDTH] and layout["yaxis"]["range"] == [HEIGHT, 0]
        source = base64.b64decode(picture["source"].split(",", 1)[1])
        assert Image.open(io.BytesIO(source)).size == (WIDTH, HEIGHT) and picture["dx"] == picture["dy"] == 1
        for heatmap in (t for t in figure["data"] if t["type"] == "heatmap"):
            assert array(heatmap["z"]).shape == (ROWS, COLS)
            assert heatmap["dx"] == heatmap["dy"] == pytest.approx(WIDTH / COLS)

    record = expected["frames"][0]
    kinds = {t["name"]: array(t["z"]).astype(float).flatten() for t in json.loads(clusters["plot"])["data"]
             if t["type"] == "heatmap"}
    assert np.flatnonzero(~np.isnan(kinds["discarded"])).tolist() == sorted(record["discarded"])
    assert np.flatnonzero(~np.isnan(kinds["dominant"])).tolist() == sorted(record["dominant"])
    assert "received attention" in json.dumps(json.loads(clusters["plot"])["data"][1]["customdata"])
    heatmaps = [t for t in json.loads(layer_view["plot"])["data"] if t["type"] == "heatmap"]
    assert len(heatmaps) == qwen_engine.n_layers
    assert np.allclose(array(heatmaps[14]["z"]), np.round(figures.layer_grids(expected)[14], 3))
    assert [array(t["y"]).tolist() for t in json.loads(pyramid["plot"])["data"]] == [
        expected["visual_tokens_per_layer"], [ROWS * COLS] * qwen_engine.n_layers]

    png = qwen_client.predict("duet", 14, 0, api_name="/overlay")
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(pixels, np.asarray(figures.overlay_png(traces["duet"], wide_image, layer=14)))


def test_the_authors_preset_is_absolute_counts_capped_per_image(qwen_client, wide_file):
    trace_path = run(qwen_client, wide_file, budget="preset", compare=(), k2=20)[7]
    trace = json.loads(Path(trace_path).read_text())
    n = ROWS * COLS
    assert (trace["plan"]["k1"], trace["plan"]["k2"]) == (n - 1, 1)  # 540 + 20 capped as the authors cap them
    assert len(trace["frames"][0]["dominant"]) == n - 1


def test_the_authors_shares_match_every_compared_method_on_the_image(qwen_client, wide_file):
    """65 % + 5 % of this image's 150 tokens for DUET; FastV compared at the average DUET reaches."""
    outputs = run(qwen_client, wide_file, budget="shares", compare=("fastv",))
    traces = {t["method"]: t for t in json.loads(Path(outputs[7]).read_text())}
    n, duet = ROWS * COLS, traces["duet"]
    assert (duet["plan"]["k1"], duet["plan"]["k2"]) == (int(0.65 * n), int(0.05 * n))
    assert traces["fastv"]["budget"] == duet["budget"] < n
    rows = outputs[4]["data"]  # the answers table: method, budget, avg visual tokens, answer
    assert [r[:2] for r in rows] == [["duet", duet["budget"]], ["fastv", duet["budget"]]]


def test_video_is_refused_in_words(qwen_client):
    from gradio_client import handle_file

    from duet_viz.page import ASSETS

    with pytest.raises(Exception, match="video is not supported"):
        qwen_client.predict(None, QUESTION, "duet", "64", 96, [], None, None, 4, "", "", "", 2, 0,
                            handle_file(str(ASSETS / "clip-moving.webm")), 4, api_name="/run")


def test_browser_run_on_a_wide_image_draws_the_maps_unsquashed(served_qwen, wide_file):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_page(p)
        page.goto(served_qwen)
        video_tab = page.get_by_role("tab", name="Video").count()
        page.locator("input[type=file][accept*='image']").first.set_input_files(str(wide_file))
        page.get_by_label("Question").fill(QUESTION)
        preset = page.get_by_label("authors' preset: 540 + 100 tokens").count()
        shares = page.get_by_label("authors' shares: 65% + 5% of the image's tokens").count()
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Run").click()
        page.wait_for_selector("#layer-view .js-plotly-plot .heatmaplayer", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "qwen-app-after-run.png"), full_page=True)
        boxes = {}
        for name in ("cluster-map", "layer-view"):
            plot = page.locator(f"#{name} .js-plotly-plot")
            plot.screenshot(path=str(ARTIFACTS / f"qwen-{name}.png"))
            boxes[name] = plot.locator("image").first.bounding_box()
        browser.close()
    assert video_tab == 0 and preset == 1 and shares == 1
    for name, box in boxes.items():  # the picture keeps the grid's 3 : 2 aspect in the page
        assert box["width"] / box["height"] == pytest.approx(COLS / ROWS, rel=0.02), name
