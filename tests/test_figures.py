"""Figure builders on hand-made traces: what is drawn must be exactly what the trace says."""

import numpy as np
import pytest
from PIL import Image

from duet_viz import figures

GRID = [4, 4]
CELL = figures.VIEW_PX / GRID[1]
DOMINANT = [0, 5]
CLUSTERS = [{"centroid": 1, "members": [1, 2, 6]}, {"centroid": 9, "members": [4, 8, 9]}]
DISCARDED = [3, 7, 10, 11, 12, 13, 14, 15]


def hand_trace(method="duet"):
    """16 patches, as DUET's V2V records them: CLS + 2 dominant patches kept, 2 merged tokens
    (anchors 1 and 9) from 6 patches, the other 8 discarded. The 5 tokens [CLS, patch 0, patch 5,
    cluster 0, cluster 1] enter a 4-layer LLM; layer 2 keeps tokens {0, 2, 4}, layer 3 none."""
    token_patches = [[], [0], [5], [1, 2, 6], [4, 8, 9]]
    return {
        "method": method, "budget": 4, "answer": "red", "grid": GRID,
        "frames": [{"index": 0, "token_offset": 0, "n_tokens": 5, "token_patches": token_patches,
                    "view_box": [0, 0, 64, 64], "dominant": DOMINANT, "cls_kept": True, "clusters": CLUSTERS,
                    "discarded": DISCARDED, "scores": list(np.linspace(0.01, 0.05, 16))}],
        "t2v": [
            {"layer": 2, "score_layer": 2, "n_in": 5, "ids_in": list(range(5)), "kept": [0, 2, 4],
             "scores": [0.5, 0.1, 0.3, 0.05, 0.9]},
            {"layer": 3, "score_layer": 3, "n_in": 3, "ids_in": [0, 2, 4], "kept": [], "scores": [0.2, 0.1, 0.3]},
        ],
        "visual_tokens_per_layer": [5, 5, 3, 0], "avg_visual_tokens": 3.25,
        "timings_ms": {"vision": 1, "v2v": 1, "prefill": 5, "decode_per_token": 1, "total": 9},
        "flops": {"vision": 1, "llm": 2, "llm_full": 8}, "device": "cpu", "dtype": "float32",
    }


def visionzip_trace():
    """Same grid, VisionZip-style: nothing discarded, the pool is every non-dominant patch."""
    trace = hand_trace("visionzip")
    clusters = [{"centroid": 1, "members": [1, 2, 3, 6, 7]},
                {"centroid": 9, "members": [4, 8, 9, 10, 11, 12, 13, 14, 15]}]
    trace["frames"][0].update(clusters=clusters, discarded=[],
                              token_patches=[[], [0], [5], clusters[0]["members"], clusters[1]["members"]])
    return trace


@pytest.fixture
def image():
    return Image.new("RGB", (64, 64), (200, 200, 200))


def heatmap(fig, name):
    trace = next(t for t in fig.data if t.type == "heatmap" and t.name == name)
    return np.asarray(trace.z, dtype=float).flatten(), np.asarray(trace.customdata, dtype=object).flatten()


def marked(z):
    return set(np.flatnonzero(~np.isnan(z)).tolist())


def test_cluster_map_marks_each_patch_as_exactly_one_kind(image):
    fig = figures.cluster_map(hand_trace(), image)
    dominant, _ = heatmap(fig, "dominant")
    merged, _ = heatmap(fig, "merged")
    discarded, _ = heatmap(fig, "discarded")
    assert marked(dominant) == set(DOMINANT)
    assert marked(discarded) == set(DISCARDED)
    assert marked(merged) == {1, 2, 6, 4, 8, 9}
    for index, cluster in enumerate(CLUSTERS):
        assert set(merged[cluster["members"]]) == {index}  # one colour per merged token
    outline = next(t for t in fig.data if t.name == "dominant outline")
    assert sum(v is None for v in outline.x) == len(DOMINANT)  # one closed outline per dominant patch


def test_cluster_map_draws_discarded_patches_grey_and_dots_the_anchors(image):
    fig = figures.cluster_map(hand_trace(), image)
    discarded = next(t for t in fig.data if t.name == "discarded")
    assert {colour for _, colour in discarded.colorscale} == {figures._css(figures.DISCARDED_RGBA)}
    anchors = next(t for t in fig.data if t.name == "anchor")
    assert list(anchors.x) == [1.5 * CELL, 1.5 * CELL]  # patches 1 and 9 sit in column 1
    assert list(anchors.y) == [0.5 * CELL, 2.5 * CELL]  # rows 0 and 2
    assert list(anchors.marker.color) == figures.PALETTE[:2]


def test_colour_scales_are_ones_plotly_js_accepts(image):
    """Plotly.js silently swaps in its default scale when stops ever decrease or do not end at 1."""
    scales = [t.colorscale for t in figures.cluster_map(hand_trace(), image).data if t.type == "heatmap"]
    for scale in scales + [figures.LAYER_COLORSCALE]:
        stops = [stop for stop, _ in scale]
        assert stops[0] == 0 and stops[-1] == 1 and stops == sorted(stops)


def test_cluster_map_hover_says_each_patch_kind_and_score(image):
    _, text = heatmap(figures.cluster_map(hand_trace(), image), "merged")
    scores = hand_trace()["frames"][0]["scores"]
    assert text[0].startswith("patch 0: dominant")
    assert text[1].startswith("patch 1: anchor of cluster 0")
    assert text[2].startswith("patch 2: merged into cluster 0 (anchor patch 1)")
    assert text[8].startswith("patch 8: merged into cluster 1 (anchor patch 9)")
    assert text[3].startswith("patch 3: discarded")
    assert text[3].endswith(f"CLS score {scores[3]:.3g}")
    kinds = [t.split(": ")[1].split(" ")[0] for t in text]
    assert kinds.count("discarded") == len(DISCARDED) and kinds.count("dominant") == len(DOMINANT)


def test_cluster_map_title_counts_each_kind(image):
    title = figures.cluster_map(hand_trace(), image).layout.title.text
    assert "CLS + 2 dominant" in title
    assert "8 discarded (grey)" in title
    assert "2 merged tokens from 6 patches" in title


def test_cluster_map_without_discards_says_none_are_discarded(image):
    trace = visionzip_trace()
    trace["frames"][0]["cls_kept"] = False
    fig = figures.cluster_map(trace, image)
    discarded, _ = heatmap(fig, "discarded")
    assert marked(discarded) == set()
    assert "0 discarded" in fig.layout.title.text and "CLS" not in fig.layout.title.text
    assert "2 merged tokens from 14 patches" in fig.layout.title.text


def test_layer_view_shows_exactly_the_kept_patches(image):
    fig = figures.layer_view(hand_trace(), image, layer=2)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 4 and [t.visible for t in heatmaps] == [False, False, True, False]
    z = np.asarray(heatmaps[2].z).flatten()
    assert set(np.flatnonzero(z >= 0)) == {5, 4, 8, 9}  # tokens 2 and 4 (a merged token lights all members)
    # token 2 (figure z is rounded), relative to the best kept score (token 4's)
    assert z[5] == pytest.approx(0.3 / 0.9, abs=1e-3)
    assert set(np.flatnonzero(z == figures.DISCARDED)) == set(DISCARDED)
    last = np.asarray(heatmaps[3].z).flatten()
    assert set(np.flatnonzero(last == figures.DROPPED)) == set(range(16)) - set(DISCARDED)
    assert np.all(np.asarray(heatmaps[0].z).flatten()[[0, 1, 2, 4, 5, 6, 8, 9]] >= 0)


def test_layer_view_hover_tells_v2v_discards_from_t2v_drops(image):
    heatmaps = [t for t in figures.layer_view(hand_trace(), image).data if t.type == "heatmap"]
    at = [np.asarray(t.customdata, dtype=object).flatten() for t in heatmaps]
    assert at[2][3] == at[0][3] == "discarded by V2V, in no token"
    assert at[0][0] == "token 1" and at[2][0] == "token 1, dropped by T2V at layer 2"
    assert at[2][5] == "token 2" and at[3][5] == "token 2, dropped by T2V at layer 3"


def test_layers_before_the_first_stage_show_the_scores_that_will_decide_it():
    grids = figures.layer_grids(hand_trace())
    assert grids[0].flatten()[5] == pytest.approx(0.3 / 0.9)
    assert grids[0].flatten()[4] == pytest.approx(1.0)
    assert grids[0].flatten()[1] == pytest.approx(0.05 / 0.9)
    assert grids[0].flatten()[3] == figures.DISCARDED


def test_llm_only_method_has_no_cluster_fill(image):
    trace = hand_trace("fastv")
    for key in ("dominant", "cls_kept", "clusters", "discarded", "scores"):
        trace["frames"][0].pop(key)
    fig = figures.cluster_map(trace, image)
    assert [t.type for t in fig.data] == ["image"]
    assert figures.DISCARDED not in figures.layer_grids(trace)


def test_tokens_per_layer_and_latency_rows():
    full = hand_trace("full")
    full["visual_tokens_per_layer"], full["timings_ms"] = [16] * 4, dict(full["timings_ms"], prefill=20)
    fig = figures.tokens_per_layer([full, hand_trace()])
    assert [list(t.y) for t in fig.data] == [[16] * 4, [5, 5, 3, 0]]
    rows = figures.latency_rows([full, hand_trace()])
    assert rows[1][0] == "duet" and rows[1][-2] == "4.00x" and rows[1][-1] == "4.00x"
    assert len(rows[1]) == len(figures.LATENCY_HEADERS)
    assert figures.answer_rows([hand_trace()]) == [["duet", 4, 3.25, "red"]]


def test_overlay_png_dims_dropped_patches_and_greys_discarded_ones():
    red = Image.new("RGB", (64, 64), (220, 40, 40))
    pixels = np.asarray(figures.overlay_png(hand_trace(), red, layer=2)).astype(int)
    assert pixels.shape == (figures.VIEW_PX, figures.VIEW_PX, 3)

    def centre(patch):
        row, col = divmod(patch, GRID[1])
        return pixels[int((row + 0.5) * CELL), int((col + 0.5) * CELL)]

    *grey, alpha = figures.DISCARDED_RGBA
    expected = alpha * np.array(grey) + (1 - alpha) * np.array([220, 40, 40])
    assert np.abs(centre(3) - expected).max() <= 2  # discarded: greyed, whatever the layer
    assert centre(0).sum() < centre(3).sum()  # patch 0: token 1, dropped at layer 2 (dark)
    assert centre(0).sum() < centre(5).sum()  # patch 5: token 2, kept


def test_frame_view_crops_the_view_box():
    picture = Image.new("RGB", (200, 100), (0, 0, 255))
    picture.paste((255, 0, 0), (50, 0, 150, 100))
    view = figures.frame_view(picture, [50, 0, 150, 100], size=32)
    assert np.asarray(view)[:, :, 0].min() > 200


def test_a_non_square_grid_draws_on_its_own_canvas_unsquashed():
    """Qwen2.5-VL: a 2 x 4 grid of a whole 120 x 60 image (left red, right blue), no CLS token."""
    trace = hand_trace()
    trace["grid"] = [2, 4]
    trace["plan"] = {"cls_token": False}
    trace["frames"][0].update(view_box=[0, 0, 120, 60], dominant=[0, 5], discarded=[3, 7], scores=[0.1] * 8,
                              clusters=[{"centroid": 1, "members": [1, 2, 6]}, {"centroid": 4, "members": [4]}],
                              token_patches=[[], [0], [5], [1, 2, 6], [4]])
    picture = Image.new("RGB", (120, 60), (220, 40, 40))
    picture.paste((40, 40, 220), (60, 0, 120, 60))
    assert figures.canvas(trace) == (336, 168, 84)
    view = np.asarray(figures.picture_of(trace, picture)).astype(int)
    assert view.shape == (168, 336, 3) and view[80, 160, 0] > 200 and view[80, 176, 2] > 200
    fig = figures.cluster_map(trace, picture)
    assert list(fig.layout.xaxis.range) == [0, 336] and list(fig.layout.yaxis.range) == [168, 0]
    merged = next(t for t in fig.data if t.name == "merged")
    assert np.asarray(merged.z).shape == (2, 4) and merged.dx == merged.dy == 84 and merged.x0 == 42
    assert "received attention 0.1" in merged.customdata[0][1]
    pixels = np.asarray(figures.overlay_png(trace, picture, layer=0)).astype(int)
    *grey, alpha = figures.DISCARDED_RGBA
    blue_under_grey = alpha * np.array(grey) + (1 - alpha) * np.array([40, 40, 220])
    assert pixels.shape == (168, 336, 3)
    assert np.abs(pixels[42, 3 * 84 + 42] - blue_under_grey).max() <= 2  # patch 3: row 0, col 3, discarded
