"""HiRED and FitPrune in the browser: picked from the method radio, run, and scrubbed layer by
layer (the slider flips layers in the browser; the title says how many tokens survive)."""

from __future__ import annotations

import pytest

from .test_app import ARTIFACTS, QUESTION, open_page


@pytest.mark.parametrize("label,method,first,last", [("HiRED", "hired", 64, 64), ("FitPrune", "fitprune", 576, None)])
def test_browser_picks_the_method_runs_and_scrubs(served, engine, label, method, first, last):
    from playwright.sync_api import sync_playwright

    from model.budget import ReductionConfig

    expected = engine.plan(ReductionConfig(method, 64)).counts_per_layer()
    last = expected[-1] if last is None else last
    assert expected[0] == first
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_page(p)
        page.goto(served)
        page.get_by_text(QUESTION, exact=True).click()  # loads the example and runs DUET
        page.wait_for_selector("#layer-view .js-plotly-plot .heatmaplayer", timeout=60_000)
        page.locator("fieldset", has_text="Method").get_by_label(label, exact=True).check()
        page.get_by_role("button", name="Run").click()
        title = page.locator("#layer-view .gtitle")
        title.filter(has_text=f"{method} · layer").wait_for(timeout=60_000)
        slider = page.locator("#layer-slider input[type=range]")
        slider.focus()
        page.keyboard.press("Home")
        page.wait_for_timeout(300)
        at_first = title.text_content()
        page.keyboard.press("End")
        page.wait_for_timeout(300)
        at_last = title.text_content()
        page.screenshot(path=str(ARTIFACTS / f"app-{method}.png"), full_page=True)
        browser.close()
    assert f"{method} · layer 0: {first} visual tokens survive" in at_first
    assert f"{method} · layer {len(expected) - 1}: {last} visual tokens survive" in at_last
