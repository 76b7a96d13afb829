"""Figure builders on hand-made traces: what is drawn must be exactly what the trace says."""

import numpy as np
import pytest
from PIL import Image

from duet_viz import figures

GRID = [4, 4]


def hand_trace(method="duet"):
    """16 patches: 4 dominant, 3 clusters covering the other 12; 7 tokens enter a 4-layer LLM,
    layer 2 keeps tokens {0, 2, 5}, layer 3 keeps none."""
    dominant = [0, 5, 10, 15]
    clusters = [
        {"centroid": 1, "members": [1, 2, 3, 6]},
        {"centroid": 4, "members": [4, 8, 9, 12]},
        {"centroid": 7, "members": [7, 11, 13, 14]},
    ]
    token_patches = [[0], [1, 2, 3, 6], [4, 8, 9, 12], [5], [7, 11, 13, 14], [10], [15]]
    return {
        "method": method, "budget": 4, "answer": "red", "grid": GRID,
        "frames": [{"index": 0, "token_offset": 0, "n_tokens": 7, "token_patches": token_patches,
                    "view_box": [0, 0, 64, 64], "dominant": dominant, "clusters": clusters,
                    "scores": list(np.linspace(0.01, 0.05, 16))}],
        "t2v": [
            {"layer": 2, "score_layer": 2, "n_in": 7, "ids_in": list(range(7)), "kept": [0, 2, 5],
             "scores": [0.5, 0.1, 0.9, 0.05, 0.2, 0.3, 0.0]},
            {"layer": 3, "score_layer": 3, "n_in": 3, "ids_in": [0, 2, 5], "kept": [], "scores": [0.2, 0.1, 0.3]},
        ],
        "visual_tokens_per_layer": [7, 7, 3, 0], "avg_visual_tokens": 4.25,
        "timings_ms": {"vision": 1, "v2v": 1, "prefill": 5, "decode_per_token": 1, "total": 9},
        "flops": {"vision": 1, "llm": 2, "llm_full": 8}, "device": "cpu", "dtype": "float32",
    }


@pytest.fixture
def image():
    return Image.new("RGB", (64, 64), (200, 200, 200))


def test_cluster_colours_partition_the_non_dominant_patches(image):
    fig = figures.cluster_map(hand_trace(), image)
    heat = next(t for t in fig.data if t.type == "heatmap")
    z = np.asarray(heat.z, dtype=float).flatten()
    filled = set(np.flatnonzero(~np.isnan(z)))
    assert filled == set(range(16)) - {0, 5, 10, 15}
    for cluster_index, cluster in enumerate(hand_trace()["frames"][0]["clusters"]):
        assert set(z[cluster["members"]]) == {cluster_index}
    outline = next(t for t in fig.data if t.type == "scatter")
    assert sum(v is None for v in outline.x) == 4  # one closed outline per dominant patch


def test_layer_view_shows_exactly_the_kept_patches(image):
    fig = figures.layer_view(hand_trace(), image, layer=2)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 4 and [t.visible for t in heatmaps] == [False, False, True, False]
    z = np.asarray(heatmaps[2].z).flatten()
    lit = set(np.flatnonzero(z > figures.DROPPED))
    assert lit == {0, 4, 8, 9, 12, 10}  # tokens 0, 2 (a merged cluster lights all members), 5
    assert z[10] == pytest.approx(0.3 / 0.9, abs=1e-3)  # token 5 (figure z is rounded), relative to the best kept score (token 2)
    assert np.all(np.asarray(heatmaps[3].z) == figures.DROPPED)
    assert np.all(np.asarray(heatmaps[0].z) > figures.DROPPED)


def test_layers_before_the_first_stage_show_the_scores_that_will_decide_it():
    grids = figures.layer_grids(hand_trace())
    assert grids[0].flatten()[10] == pytest.approx(0.3 / 0.9)
    assert grids[0].flatten()[4] == pytest.approx(1.0)
    assert grids[0].flatten()[1] == pytest.approx(0.1 / 0.9)


def test_llm_only_method_has_no_cluster_fill(image):
    trace = hand_trace("fastv")
    for key in ("dominant", "clusters", "scores"):
        trace["frames"][0].pop(key)
    fig = figures.cluster_map(trace, image)
    assert [t.type for t in fig.data] == ["image"]


def test_tokens_per_layer_and_latency_rows():
    full = hand_trace("full")
    full["visual_tokens_per_layer"], full["timings_ms"] = [16] * 4, dict(full["timings_ms"], prefill=20)
    fig = figures.tokens_per_layer([full, hand_trace()])
    assert [list(t.y) for t in fig.data] == [[16] * 4, [7, 7, 3, 0]]
    rows = figures.latency_rows([full, hand_trace()])
    assert rows[1][0] == "duet" and rows[1][-2] == "4.00x" and rows[1][-1] == "4.00x"
    assert len(rows[1]) == len(figures.LATENCY_HEADERS)
    assert figures.answer_rows([hand_trace()]) == [["duet", 4, 4.25, "red"]]


def test_overlay_png_dims_dropped_patches(image):
    picture = figures.overlay_png(hand_trace(), image, layer=2)
    assert picture.size == (figures.VIEW_PX, figures.VIEW_PX)
    pixels = np.asarray(picture).astype(int)
    cell = figures.VIEW_PX // 4
    dropped_patch = pixels[cell // 2, cell + cell // 2]  # patch 1: token 1, dropped at layer 2
    kept_patch = pixels[2 * cell + cell // 2, 2 * cell + cell // 2]  # patch 10: token 5, kept
    assert dropped_patch.sum() < kept_patch.sum()


def test_frame_view_crops_the_view_box():
    picture = Image.new("RGB", (200, 100), (0, 0, 255))
    picture.paste((255, 0, 0), (50, 0, 150, 100))
    view = figures.frame_view(picture, [50, 0, 150, 100], size=32)
    assert np.asarray(view)[:, :, 0].min() > 200
