"""The cost model of ``bench --limit`` as one SVG, for BENCHMARKS.md (no plotting library needed).

Left: one decoder layer's time against the rows it runs on, the ladder's median per rung with its
min-max over rounds: the curve every prediction is read from. Right: each method's measured
prefill over its predicted prefill plus its own T2V scoring, the median over rounds with the
min-max as a bar, grouped by method (marker: budget), against 1 and the 1.05 that issue 39 holds
the loop's machinery under.
"""

from __future__ import annotations

import math
from html import escape

COLOURS = {"full": "#444444", "duet": "#d62728", "visionzip": "#1f77b4", "fastv": "#2ca02c",
           "pyramiddrop": "#9467bd", "hired": "#ff7f0e", "fitprune": "#8c564b"}
MARKERS = {192: "circle", 128: "square", 64: "triangle"}
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 400, 300, 64, 16, 40, 48


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k apart) covering [low, high]."""
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


class Panel:
    """One plot area: data coordinates to pixels, axes, ticks and labels."""

    def __init__(self, left: float, x_range: tuple[float, float], y_range: tuple[float, float]):
        self.left, self.x_range, self.y_range = left, x_range, y_range
        self.parts: list[str] = []

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return self.left + MARGIN_L + (value - lo) / (hi - lo) * (PANEL_W - MARGIN_L - MARGIN_R)

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        return MARGIN_T + (1 - (value - lo) / (hi - lo)) * (PANEL_H - MARGIN_T - MARGIN_B)

    def axes(self, title: str, x_label: str, y_label: str) -> None:
        x0, x1 = self.x(self.x_range[0]), self.x(self.x_range[1])
        y0, y1 = self.y(self.y_range[0]), self.y(self.y_range[1])
        self.parts.append(f'<rect x="{x0:.1f}" y="{y1:.1f}" width="{x1 - x0:.1f}" height="{y0 - y1:.1f}" '
                          'fill="none" stroke="#999"/>')
        for t in ticks(*self.x_range) if x_label else []:
            self.parts.append(f'<line x1="{self.x(t):.1f}" y1="{y0:.1f}" x2="{self.x(t):.1f}" y2="{y0 + 4:.1f}" '
                              'stroke="#999"/>')
            self.parts.append(text(self.x(t), y0 + 16, f"{t:g}", "middle"))
        for t in ticks(*self.y_range):
            self.parts.append(f'<line x1="{x0 - 4:.1f}" y1="{self.y(t):.1f}" x2="{x1:.1f}" y2="{self.y(t):.1f}" '
                              'stroke="#eee"/>')
            self.parts.append(text(x0 - 6, self.y(t) + 4, f"{t:g}", "end"))
        self.parts.append(text((x0 + x1) / 2, MARGIN_T - 14, title, "middle", weight="bold"))
        self.parts.append(text((x0 + x1) / 2, PANEL_H - 10, x_label, "middle"))
        cy = (y0 + y1) / 2
        self.parts.append(text(self.left + 14, cy, y_label, "middle", rotate=(-90, self.left + 14, cy)))

    def line(self, points: list[tuple[float, float]], colour: str, dash: str = "") -> None:
        path = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in points)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"{extra}/>')

    def bar(self, at: float, low: float, high: float, colour: str) -> None:
        self.parts.append(f'<line x1="{self.x(at):.1f}" y1="{self.y(low):.1f}" x2="{self.x(at):.1f}" '
                          f'y2="{self.y(high):.1f}" stroke="{colour}" stroke-opacity="0.5"/>')

    def marker(self, a: float, b: float, colour: str, shape: str, label: str) -> None:
        self.parts.append(marker(self.x(a), self.y(b), colour, shape, label))


def marker(cx: float, cy: float, colour: str, shape: str, label: str = "") -> str:
    """A point at pixel (cx, cy); with a ``label`` (its hover text) a data point, class "point",
    without one a legend's sample."""
    tip, kind = (f"<title>{escape(label)}</title>", ' class="point"') if label else ("", "")
    if shape == "square":
        return (f'<rect{kind} x="{cx - 3.5:.1f}" y="{cy - 3.5:.1f}" width="7" height="7" '
                f'fill="{colour}">{tip}</rect>')
    if shape == "triangle":
        return (f'<polygon{kind} points="{cx:.1f},{cy - 4.5:.1f} {cx - 4:.1f},{cy + 3:.1f} '
                f'{cx + 4:.1f},{cy + 3:.1f}" fill="{colour}">{tip}</polygon>')
    return f'<circle{kind} cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{colour}">{tip}</circle>'


def text(x: float, y: float, body: str, anchor: str = "start", weight: str = "normal",
         rotate: tuple[float, float, float] | None = None) -> str:
    turn = f' transform="rotate({rotate[0]} {rotate[1]:.1f} {rotate[2]:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-weight="{weight}"{turn}>'
            f"{escape(body)}</text>")


def padded(values: list[float], share: float = 0.05) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * share or abs(hi) * share or 1.0
    return lo - pad, hi + pad


def limit_svg(result: dict) -> str:
    """``result``: what ``run_bench(..., limit=True)`` returns (or its saved JSON)."""
    rungs = sorted((int(n), v) for n, v in result["ladder_ms"].items())
    rows = [r for r in result["rows"] if "vs_limit" in r]
    ladder = Panel(0, padded([0, rungs[-1][0]], 0.02), padded([0] + [v[2] for _, v in rungs]))
    ladder.axes("one decoder layer, full model", "rows the layer runs on", "ms per layer")
    ladder.line([(n, v[0]) for n, v in rungs], COLOURS["full"])
    for n, (median, low, high) in rungs:
        ladder.bar(n, low, high, COLOURS["full"])
        ladder.marker(n, median, COLOURS["full"], "circle", f"{n} rows: {median:.2f} ms (min {low:.2f}, max {high:.2f})")

    ratios = [v for r in rows for v in r["vs_limit"]]
    limit = Panel(PANEL_W, (-0.7, len(rows) - 0.3), padded([1.0, 1.05] + ratios))
    limit.axes("each method against its cost model", "", "measured / (predicted + own scoring)")
    for level, dash in ((1.0, ""), (1.05, "4 3")):
        limit.line([(limit.x_range[0], level), (limit.x_range[1], level)], "#999", dash)
    for i, r in enumerate(rows):
        colour = COLOURS.get(r["method"], "#000000")
        name = "full" if r["method"] == "full" else f"{r['method']}-{r['budget']}"
        median, low, high = r["vs_limit"]
        limit.bar(i, low, high, colour)
        limit.marker(i, median, colour, MARKERS.get(r["budget"], "circle"),
                     f"{name}: {median:.3f} (min {low:.3f}, max {high:.3f}); measured {r['prefill_ms'][0]:.1f} ms, "
                     f"predicted {r['predicted_ms'][0]:.1f} ms + scoring {r['t2v_ms'][0]:.1f} ms")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["method"], []).append(i)
    for method, members in groups.items():
        limit.parts.append(text(limit.x(sum(members) / len(members)), limit.y(limit.y_range[0]) + 16, method,
                                "middle"))
    left, legend, y = 2 * PANEL_W + 14, [], MARGIN_T + 6
    for method in groups:
        legend += [marker(left, y - 4, COLOURS.get(method, "#000000"), "circle"), text(left + 10, y, method)]
        y += 16
    for budget, shape in MARKERS.items():
        legend += [marker(left, y, "#666666", shape), text(left + 10, y + 4, f"budget {budget}")]
        y += 16
    legend += [f'<line x1="{left - 8}" y1="{y}" x2="{left + 8}" y2="{y}" stroke="#999"/>',
               text(left + 10, y + 4, "1: at the prediction"),
               f'<line x1="{left - 8}" y1="{y + 16}" x2="{left + 8}" y2="{y + 16}" stroke="#999" '
               'stroke-dasharray="4 3"/>', text(left + 10, y + 20, "1.05: the limit asked")]
    width = 2 * PANEL_W + 130
    caption = (f"{result['model']} · {result['device']} {result['dtype']} · {result['reps']} rounds · "
               "medians, bars: min-max over rounds")
    body = ladder.parts + limit.parts + legend + [text(width / 2, PANEL_H + 14, caption, "middle")]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H + 24}" '
            f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
            + "".join(body) + "</svg>\n")
