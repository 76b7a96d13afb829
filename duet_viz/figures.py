"""Traces -> figures. Reads only the SPEC §4 trace (and the user's own image, or the view a
trace carries), never the model.

Patch p of a frame sits at grid row p // cols, column p % cols of the region ``view_box`` of the
original image that the processor turned into the model's input. Each figure is drawn on a canvas
of the trace's own grid (:func:`canvas`): square cells, VIEW_PX on the longer side, so a
non-square grid (Qwen2.5-VL: (h / 28) x (w / 28), per image) shows the picture as the model saw it.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from model.trace import VIEW_PX
from model.trace import view_image as frame_view

# Sentinel z values of the layer view: a patch V2V put in no token at all, and a patch whose token
# the LLM-side pruning has dropped by this layer. Scores of surviving tokens lie in [0, 1].
DISCARDED = -0.2
DROPPED = -0.1
# Discarded patches are greyed (here, in the V2V cluster map and in the PNG export alike), so they
# read as "never entered the LLM", apart from the near-black of tokens dropped inside it.
DISCARDED_RGBA = (150, 150, 150, 0.8)
DROPPED_RGBA = (10, 10, 30, 0.78)


def _at(z: float) -> float:
    """Position of layer-view value z on the colour scale, which spans [DISCARDED, 1]."""
    return (z - DISCARDED) / (1.0 - DISCARDED)


def _css(rgba: tuple) -> str:
    return "rgba({},{},{},{})".format(*rgba)


# Surviving tokens are tinted from faint yellow to red by score.
LAYER_COLORSCALE = [
    [0.0, _css(DISCARDED_RGBA)],
    [_at(-0.15), _css(DISCARDED_RGBA)],
    [_at(-0.15) + 1e-4, _css(DROPPED_RGBA)],
    [_at(-0.001), _css(DROPPED_RGBA)],
    [_at(0.0), "rgba(255,240,120,0.10)"],
    [_at(0.505), "rgba(255,150,40,0.40)"],
    [1.0, "rgba(220,20,20,0.70)"],
]
# Cluster colours (also the method lines); no grey in it, grey means "discarded".
PALETTE = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000",
    "#ffd8b1", "#000075", "#ffe119",
]


def on_view(trace: dict) -> dict:
    """``trace`` with every frame's view box set to the whole of a VIEW_PX square, so that the
    figures draw it on the view the trace carries (``model.trace.attach_views``, already the
    region the model saw) exactly as they draw a live run on the user's image."""
    return {**trace, "frames": [{**f, "view_box": [0.0, 0.0, float(VIEW_PX), float(VIEW_PX)]} for f in trace["frames"]]}


def canvas(trace: dict) -> tuple[float, float, float]:
    """(width, height, cell) of the trace's drawing in figure units: ``grid`` cells of side
    ``cell``, VIEW_PX on the longer side (336 x 336 for LLaVA's 24 x 24; 336 x 224 for a 10 x 15 grid)."""
    rows, cols = trace["grid"]
    cell = VIEW_PX / max(rows, cols)
    return cols * cell, rows * cell, cell


def picture_of(trace: dict, image: Image.Image, frame: int = 0) -> Image.Image:
    """The frame's view on the trace's canvas, one pixel per figure unit."""
    width, height, _ = canvas(trace)
    return frame_view(image, trace["frames"][frame]["view_box"], size=(round(width), round(height)))


def score_name(trace: dict) -> str:
    """What V2V ranked patches by: LLaVA's CLS attention, or (no CLS token, Qwen2.5-VL) the
    attention each token receives."""
    return "CLS score" if trace.get("plan", {}).get("cls_token", True) else "received attention"


def _data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _base_figure(picture: Image.Image, title: str, size: tuple[float, float]) -> go.Figure:
    """The picture stretched over ``size`` (width, height) figure units, axes locked to its aspect."""
    width, height = size
    fig = go.Figure(go.Image(source=_data_uri(picture), x0=0, dx=width / picture.width,
                             y0=0, dy=height / picture.height, hoverinfo="skip"))
    fig.update_layout(
        title=dict(text=title, x=0.02, font=dict(size=14)),
        margin=dict(l=4, r=4, t=36, b=4), height=430, plot_bgcolor="white",
        xaxis=dict(visible=False, range=[0, width], constrain="domain"),
        yaxis=dict(visible=False, range=[height, 0], scaleanchor="x", constrain="domain"),
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
    """(layers, rows, cols) z-values: DISCARDED where V2V put a patch in no token, DROPPED where a
    patch's token is gone, else its token's score normalised to [0, 1] within the layer (1.0
    everywhere when there are no scores)."""
    rows, cols = trace["grid"]
    record = trace["frames"][frame]
    offset = record["token_offset"]
    groups = record["token_patches"]
    grids = []
    for alive, scores in zip(kept_tokens_per_layer(trace), scores_per_layer(trace)):
        z = np.full(rows * cols, DROPPED)
        z[record.get("discarded", [])] = DISCARDED
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
    """Shared with the browser-side slider handler (:func:`layer_js`), which rebuilds it per layer."""
    return f"{method} · layer {layer}: {count} visual tokens survive"


def layer_js(*elem_ids: str) -> str:
    """JavaScript for a layer slider's change event: in each layer view under ``elem_ids`` (built
    by :func:`layer_view`), show heatmap trace ``layer`` (trace 0 is the image) and retitle it
    from the figure's meta, so that scrubbing never reaches Python."""
    return """
(layer) => {
  const updates = [];
  for (const id of %s) {
    const plot = document.querySelector(`#${id} .js-plotly-plot`);
    if (!plot || !window.Plotly || !plot.data) continue;
    const visible = plot.data.map((t, i) => i === 0 || i - 1 === layer);
    const meta = plot.layout.meta || {};
    updates.push(window.Plotly.update(plot, {visible: visible},
      {'title.text': `${meta.method || ''} · layer ${layer}: ${(meta.counts || [])[layer]} visual tokens survive`}));
  }
  return Promise.all(updates);
}
""" % json.dumps(list(elem_ids))


def layer_hover(trace: dict, grids: np.ndarray, frame: int = 0) -> list[np.ndarray]:
    """Per layer, what each patch is there. The colours alone hardly tell a grey patch from a dark
    one, so the text says whether V2V discarded it (it never reached the LLM) or the LLM-side
    pruning dropped its token, and at which layer."""
    record = trace["frames"][frame]
    rows, cols = trace["grid"]
    alive_per_layer = kept_tokens_per_layer(trace)
    alive_text = np.full(rows * cols, "discarded by V2V, in no token", dtype=object)
    gone_text = alive_text.copy()
    for local, patches in enumerate(record["token_patches"]):
        token = record["token_offset"] + local
        dropped = next((layer for layer, alive in enumerate(alive_per_layer)
                        if alive is not None and token not in alive), None)
        alive_text[patches] = f"token {token}"
        gone_text[patches] = f"token {token}, dropped by T2V at layer {dropped}"
    return [np.where(z >= 0, alive_text.reshape(rows, cols), gone_text.reshape(rows, cols)) for z in grids]


def layer_view(trace: dict, image: Image.Image, frame: int = 0, layer: int = 0) -> go.Figure:
    """Image + one heatmap trace per LLM layer; only ``layer`` is visible. The slider switches
    visibility in the browser (see :func:`layer_js`), so scrubbing never reaches Python."""
    width, height, cell = canvas(trace)
    grids = layer_grids(trace, frame)
    counts = (trace["visual_tokens_per_frame_layer"][frame] if len(trace["frames"]) > 1
              else trace["visual_tokens_per_layer"])
    fig = _base_figure(picture_of(trace, image, frame), layer_title(trace["method"], layer, counts[layer]),
                       (width, height))
    fig.update_layout(meta={"method": trace["method"], "counts": counts})  # read by layer_js
    for index, (z, hover) in enumerate(zip(grids, layer_hover(trace, grids, frame))):
        fig.add_trace(go.Heatmap(
            z=np.round(z, 3), x0=cell / 2, dx=cell, y0=cell / 2, dy=cell, zmin=DISCARDED, zmax=1.0,
            colorscale=LAYER_COLORSCALE, showscale=False, visible=index == layer,
            name=f"layer {index}", customdata=hover, xgap=0.5, ygap=0.5,
            hovertemplate=(f"layer {index} · {counts[index]} visual tokens<br>%{{customdata}}<br>"
                           "relative score %{z:.2f} (negative: gone)<extra></extra>"),
        ))
    return fig


def cluster_map(trace: dict, image: Image.Image, frame: int = 0) -> go.Figure:
    """V2V decisions, one look per kind of patch: dominant (kept as its own token) outlined in
    white, merged ones filled in their contextual token's colour with a ring on the anchor, and
    discarded ones (in no token) greyed. One trace per kind keeps the build fast."""
    record = trace["frames"][frame]
    rows, cols = trace["grid"]
    width, height, cell = canvas(trace)
    picture = picture_of(trace, image, frame)
    if "dominant" not in record:
        return _base_figure(picture, f"{trace['method']}: no vision-side merge (all {rows * cols} patches enter "
                                     "the LLM)", (width, height))
    fig = _base_figure(picture, cluster_title(record), (width, height))
    fig.update_layout(margin=dict(t=56), height=450)
    kinds = patch_kinds(record, rows * cols, score_name(trace))
    fig.add_trace(_kind_heatmap("merged", kinds["merged_z"], kinds["text"], _cluster_colorscale(), cols, cell,
                                zrange=(-0.5, len(PALETTE) - 0.5)))
    fig.add_trace(_kind_heatmap("discarded", kinds["discarded_z"], kinds["text"],
                                [[0, _css(DISCARDED_RGBA)], [1, _css(DISCARDED_RGBA)]], cols, cell))
    fig.add_trace(_kind_heatmap("dominant", kinds["dominant_z"], kinds["text"],
                                [[0, "rgba(0,0,0,0)"], [1, "rgba(0,0,0,0)"]], cols, cell))
    fig.add_trace(_outlines(record["dominant"], cols, cell))
    fig.add_trace(_anchor_dots(record["clusters"], cols, cell))
    return fig


def cluster_title(record: dict) -> str:
    """The counts of each kind, and how each is drawn (the figure has no legend)."""
    clusters = record["clusters"]
    merged = sum(len(c["members"]) for c in clusters)
    cls = "CLS + " if record["cls_kept"] else ""
    discarded = f"{len(record['discarded'])} discarded (grey)" if record["discarded"] else "0 discarded"
    return (f"V2V · {cls}{len(record['dominant'])} dominant (outlined) · {discarded}"
            f"<br>{len(clusters)} merged tokens from {merged} patches (colour fill, ○ anchor)")


def patch_kinds(record: dict, n_patches: int, score: str = "CLS score") -> dict:
    """Per patch (raster order): z of each kind's heatmap (NaN where the patch is another kind;
    for merged patches the cluster's palette index) and the hover text saying its kind and its
    ``score`` (:func:`score_name`)."""
    scores = record["scores"]
    z = {kind: np.full(n_patches, np.nan) for kind in ("dominant_z", "merged_z", "discarded_z")}
    kind = np.empty(n_patches, dtype=object)
    z["dominant_z"][record["dominant"]] = 0
    kind[record["dominant"]] = "dominant (kept as its own token)"
    z["discarded_z"][record["discarded"]] = 0
    kind[record["discarded"]] = "discarded (in no token)"
    for index, cluster in enumerate(record["clusters"]):
        anchor, members = cluster["centroid"], cluster["members"]
        z["merged_z"][members] = index % len(PALETTE)
        kind[members] = f"merged into cluster {index} (anchor patch {anchor})"
        kind[anchor] = f"anchor of cluster {index} ({len(members)} patches, 1 token)"
    text = np.array([f"patch {p}: {kind[p]}<br>{score} {scores[p]:.3g}" for p in range(n_patches)],
                    dtype=object)
    return {**z, "text": text}


def _kind_heatmap(name: str, z: np.ndarray, text: np.ndarray, colorscale: list, cols: int, cell: float,
                  zrange: tuple[float, float] = (0, 1)) -> go.Heatmap:
    """One kind's cells (NaN elsewhere: not drawn, no hover); the hover says the patch's kind."""
    rows = len(z) // cols
    return go.Heatmap(
        z=z.reshape(rows, cols), x0=cell / 2, dx=cell, y0=cell / 2, dy=cell, zmin=zrange[0],
        zmax=zrange[1], colorscale=colorscale, showscale=False,
        customdata=text.reshape(rows, cols), hoverongaps=False, name=name,
        hovertemplate="%{customdata}<extra></extra>",
    )


def _cluster_colorscale() -> list:
    """Stepwise scale, one band per colour: over z in [-0.5, n - 0.5], palette index i falls in the
    middle of band i. Mostly opaque, so that the colour reads over any photo. Stops are computed as
    (i + edge) / n so that equal stops are equal floats: Plotly.js silently replaces a scale whose
    stops ever decrease (i / n + 1 / n can exceed (i + 1) / n by an ulp)."""
    n = len(PALETTE)
    return [[(i + edge) / n, _rgba(PALETTE[i], 0.75)] for i in range(n) for edge in (0, 1)]


def _outlines(patches: list[int], cols: int, cell: float) -> go.Scatter:
    """All the patches' square outlines as one line trace (None breaks the line between them)."""
    xs, ys = [], []
    for p in patches:
        r, c = divmod(p, cols)
        x0, y0 = c * cell, r * cell
        xs += [x0, x0 + cell, x0 + cell, x0, x0, None]
        ys += [y0, y0, y0 + cell, y0 + cell, y0, None]
    return go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="white", width=1.2), hoverinfo="skip",
                      name="dominant outline")


def _anchor_dots(clusters: list[dict], cols: int, cell: float) -> go.Scatter:
    """A white-ringed dot in the cluster's colour on each anchor patch (over the fill of the same
    colour it reads as a ring); the heatmap below gives the hover."""
    cells = [divmod(c["centroid"], cols) for c in clusters]
    return go.Scatter(
        x=[(c + 0.5) * cell for _, c in cells], y=[(r + 0.5) * cell for r, _ in cells], mode="markers",
        marker=dict(size=max(4.0, cell * 0.55), line=dict(color="white", width=1.5),
                    color=[PALETTE[i % len(PALETTE)] for i in range(len(clusters))]),
        hoverinfo="skip", name="anchor",
    )


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def tokens_per_layer(traces: list[dict], names: list[str] | None = None) -> go.Figure:
    """The pyramid: visual tokens each LLM layer sees, one line per method (or per ``names``),
    budget dashed."""
    fig = go.Figure()
    for i, trace in enumerate(traces):
        counts = trace["visual_tokens_per_layer"]
        fig.add_trace(go.Scatter(
            x=list(range(len(counts))), y=counts, mode="lines", line_shape="hv",
            name=f"{names[i] if names else trace['method']} (avg {trace['avg_visual_tokens']:.1f})",
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


NO_ANSWER = "(no answer)"  # the model ended its turn at once (or generated only whitespace)


def answer_rows(traces: list[dict]) -> list[list]:
    return [[t["method"], "—" if t["method"] == "full" else t["budget"], t["avg_visual_tokens"],
             t["answer"] or NO_ANSWER]
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
    picture = picture_of(trace, image, frame).convert("RGBA")
    z = layer_grids(trace, frame)[layer]
    heat = np.clip(z, 0, 1)
    rgba = np.stack([255 - 35 * heat, 240 - 220 * heat, 120 - 100 * heat, (0.10 + 0.60 * heat) * 255], axis=-1)
    rgba[z <= DROPPED + 1e-9] = (*DROPPED_RGBA[:3], DROPPED_RGBA[3] * 255)
    rgba[z <= DISCARDED + 1e-9] = (*DISCARDED_RGBA[:3], DISCARDED_RGBA[3] * 255)
    tile = Image.fromarray(rgba.astype(np.uint8), "RGBA").resize(picture.size, Image.NEAREST)
    return Image.alpha_composite(picture, tile).convert("RGB")


def keep_map_title(layer: int) -> str:
    """Shared with the browser-side slider handler of the keep map (``browser.KEEP_JS``)."""
    return f"Mean keep map · LLM layer {layer}: share of documents in which each patch survives"


def keep_map(maps: list[tuple[str, np.ndarray]], layer: int = 0) -> go.Figure:
    """Mean keep maps side by side, one per (label, (layers, rows, cols) shares in [0, 1]): one
    heatmap per map and layer, whose ``meta`` is its layer; only ``layer`` is visible (the slider
    flips them in the browser)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(maps), subplot_titles=[label for label, _ in maps],
                        horizontal_spacing=0.04)
    for col, (label, share) in enumerate(maps, start=1):
        for index, z in enumerate(share):
            fig.add_trace(go.Heatmap(
                z=np.round(z, 3), zmin=0, zmax=1, colorscale=KEEP_COLORSCALE, showscale=col == 1, meta=index,
                visible=index == layer, colorbar=dict(title="share", tickformat=".0%", len=0.9),
                hovertemplate=f"{label} · layer {index}<br>patch row %{{y}}, col %{{x}}: survives in "
                              "%{z:.0%} of documents<extra></extra>",
            ), row=1, col=col)
        fig.update_xaxes(visible=False, constrain="domain", row=1, col=col)
        fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x" if col == 1 else f"x{col}",
                         row=1, col=col)
    fig.update_layout(title=dict(text=keep_map_title(layer), x=0.02, font=dict(size=14)), height=420,
                      margin=dict(l=4, r=4, t=70, b=4), plot_bgcolor="white")
    return fig


KEEP_COLORSCALE = "Viridis"


def _colour_table(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 RGB of KEEP_COLORSCALE from 0 to 1, the PNG's colours as the plot draws them."""
    from plotly.colors import get_colorscale, sample_colorscale

    colours = sample_colorscale(get_colorscale(KEEP_COLORSCALE), list(np.linspace(0, 1, n)))
    return np.array([[round(float(v)) for v in c[c.index("(") + 1:-1].split(",")] for c in colours], dtype=np.uint8)


def keep_map_png(maps: list[tuple[str, np.ndarray]], tile_px: int = 96) -> Image.Image:
    """The keep maps as one picture: a row per map, a tile per LLM layer, and the colour scale."""
    from PIL import ImageDraw

    table = _colour_table()
    n_layers = max(len(share) for _, share in maps)
    label_px, header_px, gap = 150, 22, 4
    width = label_px + n_layers * (tile_px + gap)
    height = header_px + len(maps) * (tile_px + gap) + 40
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for layer in range(n_layers):
        draw.text((label_px + layer * (tile_px + gap) + 2, 4), f"layer {layer}", fill="black")
    for row, (label, share) in enumerate(maps):
        top = header_px + row * (tile_px + gap)
        draw.text((4, top + tile_px // 2 - 6), label[:24], fill="black")
        for layer, z in enumerate(share):
            rgb = table[np.clip(np.round(z * (len(table) - 1)), 0, len(table) - 1).astype(int)]
            tile = Image.fromarray(rgb, "RGB").resize((tile_px, tile_px), Image.NEAREST)
            canvas.paste(tile, (label_px + layer * (tile_px + gap), top))
    bar_top = height - 32
    bar = Image.fromarray(np.repeat(table[None], 12, axis=0), "RGB").resize((256, 12))
    canvas.paste(bar, (label_px, bar_top))
    draw.text((label_px - 30, bar_top), "0 %", fill="black")
    draw.text((label_px + 262, bar_top), "100 % of documents: the patch survives at that layer", fill="black")
    return canvas
