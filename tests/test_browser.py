"""The trace browser in Chromium: ``python app.py --traces A --compare B`` with no model, and
the normal app's *Browse traces* tab fed by an upload. Screenshots go to artifacts/."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from duet_viz.load import start_server
from model.budget import ReductionConfig
from model.engine import DuetLlava
from model.trace import attach_views

from .conftest import free_port
from .test_app import ARTIFACTS, open_page

N_DOCS = 8
ROWS, CELLS = "#trace-table .virtual-row[role=row]", "[role=gridcell]"  # Gradio 6's virtual table


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory):
    """The shipped model on the first synthetic test scenes, full and DUET at 64, one trace per
    scene as the lmms plugin writes them (task, doc id, target, score), views inline."""
    from model.lab.eval import items

    engine = DuetLlava.load(device="cpu")
    base = tmp_path_factory.mktemp("trace-runs")
    for name, cfg in (("full", ReductionConfig("full", 576)), ("duet-64", ReductionConfig("duet", 64))):
        (base / name).mkdir()
        for doc, (sample, images) in enumerate(items("test", N_DOCS, 0, 1)):
            trace = engine.answer(images, sample.question, cfg, max_new_tokens=3)
            trace.update(task="duet_synthetic", split="test", doc_id=doc, target=sample.answer,
                         response=trace["answer"], score={"accuracy": float(trace["answer"] == sample.answer)})
            (base / name / f"duet_synthetic-{doc}.json").write_text(json.dumps(attach_views(trace, images)))
    return base / "full", base / "duet-64"


def answers_of(folder: Path) -> dict[int, str]:
    traces = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    return {t["doc_id"]: t["answer"] for t in traces}


def serve_traces(a: Path, b: Path, port: int) -> subprocess.Popen:
    """``python app.py --traces A --compare B``; $DUET_MODEL names no checkpoint, so the app
    could not even start if it tried to load one."""
    return start_server(None, port, start_timeout_s=120, env={"OMP_NUM_THREADS": "1", "DUET_MODEL": "/nonexistent/checkpoint"},
                        extra=("--traces", str(a), "--compare", str(b)))


def test_browser_two_runs_side_by_side_and_the_dataset_view_without_a_model(run_pair):
    from playwright.sync_api import sync_playwright

    a, b = run_pair
    full, duet = answers_of(a), answers_of(b)
    differ = sorted(d for d in full if full[d] != duet[d])
    assert differ and len(differ) < N_DOCS
    port = free_port()
    server = serve_traces(a, b, port)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser, page = open_page(p)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text(f"{N_DOCS} documents in both runs, {len(differ)} answered differently").wait_for(
                timeout=60_000)
            first = page.locator(ROWS).first
            first.wait_for(timeout=30_000)
            first_doc = int(first.locator(CELLS).nth(1).inner_text())
            page.screenshot(path=str(ARTIFACTS / "traces-table.png"), full_page=True)
            first.locator(CELLS).nth(2).click()
            page.wait_for_selector("#trace-view-b .js-plotly-plot .heatmaplayer", timeout=60_000)
            page.wait_for_timeout(800)
            picked = page.locator("#trace-picked").inner_text()
            page.screenshot(path=str(ARTIFACTS / "traces-side-by-side.png"), full_page=True)
            slider = page.locator("#trace-layer input[type=range]")
            slider.focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            page.wait_for_timeout(400)
            titles = [page.locator(f"#{v} .gtitle").text_content() for v in ("trace-view-a", "trace-view-b")]
            layer = int(slider.input_value())
            page.get_by_role("tab", name="Dataset").click()
            page.wait_for_selector("#keep-map .js-plotly-plot .heatmaplayer", timeout=60_000)
            page.wait_for_timeout(800)
            page.screenshot(path=str(ARTIFACTS / "traces-dataset.png"), full_page=True)
            page.get_by_role("button", name="Keep maps of every layer as PNG").click()
            link = page.locator("a[href$='keep-map-served.png']")
            link.wait_for(timeout=30_000)
            png = ARTIFACTS / "traces-keep-map.png"
            png.write_bytes(page.request.get(link.get_attribute("href")).body())
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    assert first_doc in differ  # the disagreeing documents come first
    assert f"A: {full[first_doc]} (full" in picked and f"B: {duet[first_doc]} (duet" in picked
    assert f"full · layer {layer}:" in titles[0] and f"duet · layer {layer}:" in titles[1]
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.width > 12 * 96  # a tile per layer of the shipped model's 12


def test_browser_tab_of_the_app_opens_uploaded_traces(served, run_pair):
    from playwright.sync_api import sync_playwright

    a, _ = run_pair
    files = sorted(str(p) for p in a.glob("*.json"))[:3]
    with sync_playwright() as p:
        browser, page = open_page(p)
        page.goto(served)
        page.get_by_role("tab", name="Browse traces").click()
        page.get_by_text("Run A: trace files").wait_for(timeout=30_000)
        page.locator("input[type=file][accept*='.json']").first.set_input_files(files)
        page.wait_for_timeout(1500)
        page.get_by_role("button", name="Open traces").click()
        page.get_by_text("3 documents").wait_for(timeout=60_000)
        page.locator(ROWS).first.locator(CELLS).nth(2).click()
        page.wait_for_selector("#trace-view-a .js-plotly-plot .heatmaplayer", timeout=60_000)
        page.wait_for_timeout(800)
        page.screenshot(path=str(ARTIFACTS / "app-traces-upload.png"), full_page=True)
        b_visible = page.locator("#trace-view-b").is_visible()
        browser.close()
    assert not b_visible  # one run uploaded: no B side
