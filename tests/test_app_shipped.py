"""The app on the shipped model, as a new visitor meets it: a photo and a question the model
cannot answer, and a note that says so."""

from __future__ import annotations

import pytest

from model.engine import DuetLlava

from .conftest import free_port
from .test_app import ARTIFACTS, open_page


@pytest.fixture(scope="module")
def shipped_page():
    from duet_viz.page import build_demo

    demo = build_demo(DuetLlava.load(device="cpu"))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_a_photo_gets_a_note_on_what_the_shipped_model_knows(shipped_page):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_page(p)
        page.goto(shipped_page)
        page.get_by_text("what animal is this ?", exact=True).click()  # the cat photo example
        note = page.locator("#model-note")
        note.get_by_text("About this model").wait_for(timeout=60_000)
        text = note.text_content()
        page.wait_for_selector("#layer-view .js-plotly-plot .heatmaplayer", timeout=60_000)
        lines = [line.strip() for line in page.locator("#answers").inner_text().splitlines() if line.strip()]
        cells = lines[lines.index("answer") + 1:]  # after the header row: method, budget, tokens, answer
        rows = [cells[i:i + 4] for i in range(0, len(cells), 4)]
        page.screenshot(path=str(ARTIFACTS / "app-shipped-photo.png"), full_page=True)
        browser.close()
    assert "synthetic" in text and "colour, shape, count, existence" in text
    assert "animal" in text and "this" in text  # the words it has never seen
    assert "llava-hf/llava-1.5-7b-hf" in text
    from duet_viz.page import ASSETS
    from model.budget import ReductionConfig
    from model.inputs import load_image

    photo = load_image(ASSETS / "chelsea.jpg")  # as the app reads an upload
    shipped = DuetLlava.load(device="cpu")
    for method in ("duet", "full"):  # a blank answer is named, not left empty
        expected = shipped.answer(photo, "what animal is this ?", ReductionConfig(method, 64))["answer"]
        assert [expected or "(no answer)"] == [r[-1].strip() for r in rows if r[0].strip() == method]
