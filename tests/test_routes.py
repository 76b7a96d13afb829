"""Issue 36, deny by default: the guard answers only the routes the page and gradio_client use,
and every route Gradio mounts has been reviewed (a Gradio upgrade that adds one fails here)."""

from __future__ import annotations

import httpx
import pytest
from gradio.routes import App as GradioApp

from duet_viz.browser import Browser, build_browser
from duet_viz.limits import NOT_SERVED, REFUSED_ROUTES, SERVED_ROUTES, Limits, route_served
from duet_viz.page import build_demo

from .test_hostile import launched


def mounted(routes) -> set[str]:
    """``METHOD template`` of every route under ``routes``, included routers walked."""
    found = set()
    for route in routes:
        if hasattr(route, "path"):
            found |= {f"{method} {route.path}" for method in route.methods}
        else:
            prefix = getattr(route.include_context, "prefix", "") or ""
            found |= {r.split(" ", 1)[0] + " " + prefix + r.split(" ", 1)[1]
                      for r in mounted(route.original_router.routes)}
    return found


@pytest.fixture(scope="module")
def app_routes(engine) -> set[str]:
    app = GradioApp.create_app(build_demo(engine))
    browser = GradioApp.create_app(build_browser(Browser(), "served"))
    return mounted(app.routes) | mounted(browser.routes)


def test_every_mounted_route_is_reviewed(app_routes):
    unreviewed = app_routes - SERVED_ROUTES - set(REFUSED_ROUTES)
    assert not unreviewed, f"routes nobody reviewed: {sorted(unreviewed)}"
    assert SERVED_ROUTES <= app_routes, f"served routes Gradio no longer has: {sorted(SERVED_ROUTES - app_routes)}"
    assert not SERVED_ROUTES & set(REFUSED_ROUTES)


@pytest.mark.parametrize("method,path,served", [
    ("GET", "/", True), ("GET", "/gradio_api/file=/tmp/x.png", True), ("POST", "/gradio_api/queue/join", True),
    ("GET", "/gradio_api/heartbeat/abc", True), ("GET", "/gradio_api/call/run/123", True),
    ("POST", "/gradio_api/stream/123", False), ("GET", "/gradio_api/deep_link", False),
    ("POST", "/gradio_api/component_server", False), ("POST", "/gradio_api/process_recording", False),
    ("POST", "/gradio_api/run/predict", True), ("POST", "/gradio_api/run/predict/", False), ("GET", "/gradio_api/queue/join", False),
    ("GET", "/gradio_api/upload/", False), ("GET", "/some/new/route", False), ("DELETE", "/", False),
])
def test_route_matching(method, path, served):
    assert route_served(method, path) is served


def test_unused_routes_answer_404_over_http_and_the_page_is_served(engine):
    with launched(engine, Limits()) as probe:
        root = probe.base.removesuffix("/gradio_api")
        for method, path in (("POST", "/gradio_api/stream/abc"), ("GET", "/gradio_api/deep_link?session_hash=x"),
                             ("POST", "/gradio_api/component_server"), ("POST", "/gradio_api/process_recording"),
                             ("GET", "/monitoring"), ("GET", "/openapi.json")):
            response = httpx.request(method, root + path, json={})
            assert response.status_code == 404 and response.json()["detail"] == NOT_SERVED, path
        assert httpx.get(root + "/").status_code == 200
        assert httpx.get(root + "/config").json()["components"]
