"""Traces -> figures. Reads only the SPEC §4 trace (and the user's own image), never the model.

Patch p of a frame sits at grid row p // cols, column p % cols of the square region
``view_box`` of the original image that the processor turned into the model's input.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import plotly.graph_objects as go
from PIL import Image

VIEW_PX = 336
DROPPED = -0.1  # sentinel z for patches whose tokens are gone at a layer
# Dropped patches are dimmed; surviving ones are tinted from faint yellow to red by score.
LAYER_COLORSCALE = [
    [0.0, "rgba(10,10,30,0.78)"],
    [0.0909, "rgba(10,10,30,0.78)"],
    [0.0910, "rgba(255,240,120,0.10)"],
    [0.55, "rgba(255,150,40,0.40)"],
    [1.0, "rgba(220,20,20,0.70)"],
]
PALETTE = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000",
    "#ffd8b1", "#000075", "#a9a9a9", "#ffe119",
]


def frame_view(image: Image.Image, view_box: list[float], size: int = VIEW_PX) -> Image.Image:
    """The region of ``image`` the model saw, as a size x size RGB picture (padding is grey)."""
    x0, y0, x1, y1 = view_box
    canvas = Image.new("RGB", (math.ceil(x1 - x0), math.ceil(y1 - y0)), (128, 128, 128))
    canvas.paste(image.convert("RGB"), (round(-x0), round(-y0)))
    return canvas.resize((size, size), Image.BICUBIC)


def _data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _base_figure(picture: Image.Image, title: str) -> go.Figure:
    fig = go.Figure(go.Image(source=_data_uri(picture), x0=0, dx=VIEW_PX / picture.width,
                             y0=0, dy=VIEW_PX / picture.height, hoverinfo="skip"))
    fig.update_layout(
        title=dict(text=title, x=0.02, font=dict(size=14)),
        margin=dict(l=4, r=4, t=36, b=4), height=430, plot_bgcolor="white",
        xaxis=dict(visible=False, range=[0, VIEW_PX], constrain="domain"),
        yaxis=dict(visible=False, range=[VIEW_PX, 0], scaleanchor="x"),
        showlegend=False,
    )
    return fig


def kept_tokens_per_layer(trace: dict) -> list[set[int] | None]:
    """For every LLM layer, the visual token ids alive there (None = all of them)."""
    alive: set[int] | None = None
    by_layer = {s["layer"]: set(s["kept"]) for s in trace["t2v"]}
    out = []
    for layer in range(len(trace["visual_tokens_per_layer"])):
        if layer in by_layer:
            alive = by_layer[layer]
        out.append(alive)
    return out


def scores_per_layer(trace: dict) -> list[dict[int, float] | None]:
    """For every LLM layer, the ranking scores that decided the stage in force there (the
    first stage's scores before it runs); None when the method never ranks in the LLM."""
    stages = [s for s in trace["t2v"] if s.get("scores") is not None]
    if not stages:
        return [None] * len(trace["visual_tokens_per_layer"])
    out, current = [], stages[0]
    for layer in range(len(trace["visual_tokens_per_layer"])):
        for s in stages:
            if s["layer"] <= layer and s["n_in"] > 0:
                current = s
        out.append(dict(zip(current["ids_in"], current["scores"])))
    return out


def layer_grids(trace: dict, frame: int = 0) -> np.ndarray:
    """(layers, rows, cols) z-values: DROPPED where a patch's token is gone, else its token's
    score normalised to [0, 1] within the layer (1.0 everywhere when there are no scores)."""
    rows, cols = trace["grid"]
    record = trace["frames"][frame]
    offset = record["token_offset"]
    groups = record["token_patches"]
    grids = []
    for alive, scores in zip(kept_tokens_per_layer(trace), scores_per_layer(trace)):
        z = np.full(rows * cols, DROPPED)
        values = {}
        for local, patches in enumerate(groups):
            token = offset + local
            if alive is None or token in alive:
                values[local] = scores.get(token, 0.0) if scores else 1.0
        if values:
            top = max(values.values()) or 1.0
            for local, value in values.items():
                z[groups[local]] = value / top
        grids.append(z.reshape(rows, cols))
    return np.stack(grids)


def layer_title(method: str, layer: int, count: int) -> str:
    """Shared with the browser-side slider handler (ui.LAYER_JS), which rebuilds it per layer."""
    return f"{method} · layer {layer}: {count} visual tokens survive"


def layer_view(trace: dict, image: Image.Image, frame: int = 0, layer: int = 0) -> go.Figure:
    """Image + one heatmap trace per LLM layer; only ``layer`` is visible. The slider switches
    visibility in the browser (see ui.LAYER_JS), so scrubbing never reaches Python."""
    record = trace["frames"][frame]
    rows, cols = trace["grid"]
    cell = VIEW_PX / cols
    grids = layer_grids(trace, frame)
    counts = (trace["visual_tokens_per_frame_layer"][frame] if len(trace["frames"]) > 1
              else trace["visual_tokens_per_layer"])
    fig = _base_figure(frame_view(image, record["view_box"]), layer_title(trace["method"], layer, counts[layer]))
    token_of = np.full(rows * cols, -1)
    for local, patches in enumerate(record["token_patches"]):
        token_of[patches] = record["token_offset"] + local
    tokens = token_of.reshape(rows, cols)
    for index, z in enumerate(grids):
        fig.add_trace(go.Heatmap(
            z=np.round(z, 3), x0=cell / 2, dx=cell, y0=cell / 2, dy=cell, zmin=DROPPED, zmax=1.0,
            colorscale=LAYER_COLORSCALE, showscale=False, visible=index == layer,
            name=f"layer {index}", customdata=tokens, xgap=0.5, ygap=0.5,
            hovertemplate=(f"layer {index} · {counts[index]} visual tokens<br>"
                           "token %{customdata} · relative score %{z:.2f} (negative: dropped)<extra></extra>"),
        ))
    return fig


def cluster_map(trace: dict, image: Image.Image, frame: int = 0) -> go.Figure:
    """V2V decisions: dominant patches outlined, each merged cluster filled in its own colour."""
    record = trace["frames"][frame]
    rows, cols = trace["grid"]
    cell = VIEW_PX / cols
    picture = frame_view(image, record["view_box"])
    if "dominant" not in record:
        fig = _base_figure(picture, f"{trace['method']}: no vision-side merge (all {rows * cols} patches enter the LLM)")
        return fig
    clusters = record["clusters"]
    fig = _base_figure(picture, f"V2V · {len(record['dominant'])} dominant (outlined) + "
                                f"{len(clusters)} merged clusters (filled)")
    scores = np.asarray(record["scores"])
    z = np.full(rows * cols, np.nan)
    size = np.zeros(rows * cols)
    label = np.full(rows * cols, -1)
    for index, cluster in enumerate(clusters):
        z[cluster["members"]] = index % len(PALETTE)
        size[cluster["members"]] = len(cluster["members"])
        label[cluster["members"]] = index
    if clusters:
        n = len(PALETTE)
        scale = [[i / n + edge / n, _rgba(PALETTE[i], 0.45)] for i in range(n) for edge in (0, 1)]
        scale[-1][0] = 1.0
        custom = np.stack([label, size, scores * 1e3], axis=-1).reshape(rows, cols, 3)
        fig.add_trace(go.Heatmap(
            z=z.reshape(rows, cols), x0=cell / 2, dx=cell, y0=cell / 2, dy=cell, zmin=0,
            zmax=n, colorscale=scale, showscale=False, customdata=custom, hoverongaps=False,
            hovertemplate="cluster %{customdata[0]} · %{customdata[1]} patches<br>"
                          "CLS score %{customdata[2]:.3f}e-3<extra></extra>",
        ))
    xs, ys, text = [], [], []
    for p in record["dominant"]:
        r, c = divmod(p, cols)
        x0, y0 = c * cell, r * cell
        xs += [x0, x0 + cell, x0 + cell, x0, x0, None]
        ys += [y0, y0, y0 + cell, y0 + cell, y0, None]
        text += [f"dominant patch {p} · CLS score {scores[p] * 1e3:.3f}e-3"] * 6
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="white", width=1.2),
                             hoverinfo="text", text=text, name="dominant"))
    return fig


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def tokens_per_layer(traces: list[dict]) -> go.Figure:
    """The pyramid: visual tokens each LLM layer sees, one line per method, budget dashed."""
    fig = go.Figure()
    for i, trace in enumerate(traces):
        counts = trace["visual_tokens_per_layer"]
        fig.add_trace(go.Scatter(
            x=list(range(len(counts))), y=counts, mode="lines", line_shape="hv",
            name=f"{trace['method']} (avg {trace['avg_visual_tokens']:.1f})",
            line=dict(width=2.5, color=PALETTE[i % len(PALETTE)]),
        ))
    budgets = sorted({(t["budget"], len(t["frames"])) for t in traces if t["method"] != "full"})
    for budget, n_frames in budgets:
        label = f"budget {budget}" if n_frames == 1 else f"budget {budget} × {n_frames} frames"
        fig.add_hline(y=budget * n_frames, line_dash="dash", line_color="grey",
                      annotation_text=label, annotation_position="top right")
    fig.update_layout(
        title=dict(text="Visual tokens per LLM layer", x=0.02, font=dict(size=14)),
        xaxis_title="LLM layer", yaxis_title="visual tokens", height=330,
        margin=dict(l=50, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25),
    )
    return fig


def frames_by_layers(trace: dict) -> go.Figure:
    """Visual tokens each frame keeps at each LLM layer: where T2V spends a video's budget."""
    counts = np.asarray(trace["visual_tokens_per_frame_layer"])
    fig = go.Figure(go.Heatmap(
        z=counts, x=list(range(counts.shape[1])), y=[f"frame {f}" for f in range(counts.shape[0])],
        colorscale="Viridis", text=counts, texttemplate="%{text}", zmin=0,
        hovertemplate="%{y} · layer %{x}: %{z} tokens<extra></extra>", colorbar=dict(title="tokens"),
    ))
    fig.update_layout(title=dict(text=f"{trace['method']}: visual tokens per frame (rows) and LLM layer",
                                 x=0.02, font=dict(size=14)),
                      xaxis_title="LLM layer", height=80 + 28 * counts.shape[0], margin=dict(l=70, r=10, t=40, b=40),
                      yaxis=dict(autorange="reversed"))
    return fig


def answer_rows(traces: list[dict]) -> list[list]:
    return [[t["method"], "—" if t["method"] == "full" else t["budget"], t["avg_visual_tokens"], t["answer"]]
            for t in traces]


ANSWER_HEADERS = ["method", "budget", "avg visual tokens", "answer"]


def latency_rows(traces: list[dict]) -> list[list]:
    """Timing rows; speed-ups are against the full run when it is among the traces."""
    full = next((t for t in traces if t["method"] == "full"), None)
    rows = []
    for t in traces:
        ms = t["timings_ms"]
        speedup = f"{full['timings_ms']['prefill'] / ms['prefill']:.2f}x" if full and ms["prefill"] else "—"
        flops_ratio = t["flops"]["llm_full"] / t["flops"]["llm"] if t["flops"]["llm"] else float("inf")
        rows.append([
            t["method"], round(ms["vision"], 1), round(ms["v2v"], 1), round(ms["prefill"], 1),
            round(ms["decode_per_token"], 1), round(ms["total"], 1), speedup, f"{flops_ratio:.2f}x",
        ])
    return rows


LATENCY_HEADERS = [
    "method", "vision ms", "V2V ms", "prefill ms", "decode ms/token", "total ms",
    "prefill speed-up", "FLOPs cut",
]


def overlay_png(trace: dict, image: Image.Image, frame: int = 0, layer: int = 0) -> Image.Image:
    """The layer view as a picture (for download): the same colours, composited with PIL."""
    picture = frame_view(image, trace["frames"][frame]["view_box"]).convert("RGBA")
    z = layer_grids(trace, frame)[layer]
    rgba = np.zeros(z.shape + (4,), dtype=np.float32)
    dropped = z <= DROPPED + 1e-9
    rgba[dropped] = (10, 10, 30, 0.78 * 255)
    heat = np.clip(z, 0, 1)
    rgba[~dropped] = np.stack([
        255 - 35 * heat, 240 - 220 * heat, 120 - 100 * heat, (0.10 + 0.60 * heat) * 255,
    ], axis=-1)[~dropped]
    tile = Image.fromarray(rgba.astype(np.uint8), "RGBA").resize(picture.size, Image.NEAREST)
    return Image.alpha_composite(picture, tile).convert("RGB")
