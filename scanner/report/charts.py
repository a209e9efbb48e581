"""Inline SVG charts and PNG images for the HTML report (no scripts, no external assets).

Every label that can come from the model (layer and node names) is attacker-controlled,
so all text goes through `esc` before it is placed in markup.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..findings import ChannelValue, ClassReverse, FrontierPoint

FLAG = "#c62828"
FLAG_LIGHT = "#f4c7c3"
HALO = 'stroke="white" stroke-width="3" paint-order="stroke"'
WARN = "#ef6c00"
BAR = "#5c7ea8"
MUTED = "#607080"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "∞" if value > 0 else ("−∞" if value < 0 else "n/a")
    return f"{value:.2f}"


# a class flagged by a family test: which of its indices to draw, and the test's name
_TESTS = {"patch": ("patch_anomaly_index", "patch test"),
          "warp": ("warp_anomaly_index", "warp test")}


def flagged_by_test(c: ClassReverse, reasons: dict[int, str]) -> tuple[float, str] | None:
    """(index, test name) when `c` was flagged by the patch or warp test rather than by
    the combined index the bars show; None otherwise."""
    reason = reasons.get(c.target)
    if not c.flagged or reason not in _TESTS:
        return None
    attr, name = _TESTS[reason]
    value = getattr(c, attr)
    return None if value is None else (float(value), name)


def anomaly_chart(classes: Sequence[ClassReverse], threshold: float,
                  warn: float | None = None, reasons: dict[int, str] | None = None) -> str:
    """Vertical bars of the combined anomaly index per class, threshold drawn as a dashed
    line labelled in the right margin (never over a bar).

    A class flagged by the patch or warp test (`reasons`) can sit below the line on the
    combined index: its bar is outlined in red and a red diamond marks the index of the
    test that flagged it, labelled with the test's name. Non-finite indices (all masks
    equal, MAD = 0) are drawn at the top of the axis.
    """
    width, height = 760, 300
    left, right, top, bottom = 48, 100, 20, 44
    marks = {c.target: m for c in classes
             if (m := flagged_by_test(c, reasons or {})) is not None}
    finite = [c.anomaly_index for c in classes if math.isfinite(c.anomaly_index)]
    finite += [v for v, _ in marks.values() if math.isfinite(v)]
    levels = [threshold] if warn is None else [threshold, warn]
    hi = max([*levels, *finite, 0.0]) * 1.15 + 0.1
    lo = min([0.0, *finite])
    if lo < 0:  # room under the lowest bar for its value label, above the class labels
        lo -= 0.15 * (hi - lo)
    if marks:  # room above the highest diamond for its label
        hi += 0.08 * (hi - lo)
    plot_h = height - top - bottom
    plot_w = width - left - right

    def y(v: float) -> float:
        v = hi if v == math.inf else (lo if v == -math.inf else v)
        return top + (hi - v) / (hi - lo) * plot_h

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="anomaly index per class">']
    for tick in _ticks(lo, hi):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" '
                     f'y2="{y(tick):.1f}" stroke="#e3e7ec"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" '
                     f'class="tick">{tick:g}</text>')
    slot = plot_w / max(1, len(classes))
    bar_w = min(48.0, slot * 0.7)
    # text goes on top of every bar and line, with a white halo where a line crosses it
    labels: list[str] = []
    for i, c in enumerate(classes):
        a = c.anomaly_index if not math.isnan(c.anomaly_index) else 0.0
        x = left + slot * i + (slot - bar_w) / 2
        cx = x + bar_w / 2
        y0, y1 = sorted((y(0.0), y(a)))
        mark = marks.get(c.target)
        if mark is None:
            color = FLAG if c.flagged else (WARN if warn is not None and a > warn else BAR)
            style = f'fill="{color}"'
        else:  # flagged, but not by this index: outlined, the diamond says by what
            style = f'fill="{FLAG_LIGHT}" stroke="{FLAG}" stroke-width="2"'
        parts.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bar_w:.1f}" '
                     f'height="{max(1.0, y1 - y0):.1f}" {style}>'
                     f'<title>class {esc(c.target)}: anomaly index {_fmt(c.anomaly_index)}, '
                     f'mask L1 {_fmt(c.mask_l1)}</title></rect>')
        label_y = y(a) - 5 if a >= 0 else y(a) + 14
        if slot >= 34 or c.flagged:  # with many classes only the flagged ones get a value
            labels.append(f'<text x="{cx:.1f}" y="{label_y:.1f}" {HALO} '
                          f'text-anchor="middle" class="value">{_fmt(c.anomaly_index)}</text>')
        if mark is not None:
            value, name = mark
            my = y(value if math.isfinite(value) else math.inf)
            r = 7.0
            parts.append(f'<path class="test-mark" d="M{cx:.1f} {my - r:.1f} L{cx + r:.1f} '
                         f'{my:.1f} L{cx:.1f} {my + r:.1f} L{cx - r:.1f} {my:.1f} Z" '
                         f'fill="{FLAG}"><title>class {esc(c.target)}: flagged by the '
                         f'{esc(name)}, index {_fmt(value)}</title></path>')
            labels.append(f'<text x="{cx:.1f}" y="{my - r - 4:.1f}" text-anchor="middle" '
                          f'{HALO} class="value test-label" fill="{FLAG}">{esc(name)} '
                          f'{_fmt(value)}</text>')
        labels.append(f'<text x="{cx:.1f}" y="{height - bottom + 18}" '
                      f'text-anchor="middle" class="tick">{esc(c.target)}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" '
                 f'stroke="{MUTED}"/>')
    for level, color, name in ((threshold, FLAG, "flag threshold"), (warn, WARN, "warn")):
        if level is None:
            continue
        first, second = name.rsplit(" ", 1) if " " in name else (name, "")
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(level):.1f}" '
                     f'y2="{y(level):.1f}" stroke="{color}" stroke-width="2" '
                     f'stroke-dasharray="6 4" class="threshold"/>'
                     f'<text x="{width - right + 6}" y="{y(level) - 3:.1f}" '
                     f'text-anchor="start" class="threshold-label" fill="{color}">{first}'
                     f'<tspan x="{width - right + 6}" dy="14">{second} {level:g}</tspan>'
                     '</text>')
    parts += labels
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" '
                 'class="axis">class</text>')
    mid = top + plot_h / 2
    parts.append(f'<text x="12" y="{mid:.1f}" transform="rotate(-90 12 {mid:.1f})" '
                 'text-anchor="middle" class="axis">anomaly index</text>')
    parts.append('</svg>')
    return "".join(parts)


def shapley_chart(channels: Sequence[ChannelValue], max_label: int = 34) -> str:
    """Horizontal bars of the backdoor Shapley value; zeroed channels in red."""
    row, width, label_w, right = 22, 760, 260, 70
    height = 28 + row * len(channels)
    values = [c.shapley for c in channels if math.isfinite(c.shapley)]
    hi = max([0.0, *values]) or 1.0
    lo = min([0.0, *values])
    plot_w = width - label_w - right

    def x(v: float) -> float:
        v = min(max(v, lo), hi)
        return label_w + (v - lo) / (hi - lo) * plot_w

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="backdoor Shapley value per channel">']
    for i, c in enumerate(channels):
        cy = 10 + row * i
        name = f"{c.layer}[{c.channel}]"
        short = name if len(name) <= max_label else "…" + name[-(max_label - 1):]
        x0, x1 = sorted((x(0.0), x(c.shapley if math.isfinite(c.shapley) else 0.0)))
        color = FLAG if c.pruned else BAR
        parts.append(f'<text x="{label_w - 8}" y="{cy + 14}" text-anchor="end" class="tick">'
                     f'<title>{esc(name)}</title>{esc(short)}</text>'
                     f'<rect x="{x0:.1f}" y="{cy + 3}" width="{max(1.0, x1 - x0):.1f}" '
                     f'height="{row - 6}" fill="{color}"><title>{esc(name)}: Shapley '
                     f'{c.shapley:.4f}, clean {c.clean:.4f}'
                     f'{" (zeroed)" if c.pruned else ""}</title></rect>'
                     f'<text x="{x1 + 6:.1f}" y="{cy + 14}" class="value">'
                     f'{c.shapley:.3f}</text>')
    parts.append(f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="6" y2="{height - 14}" '
                 f'stroke="{MUTED}"/>')
    parts.append('</svg>')
    return "".join(parts)


def frontier_chart(points: Sequence[FrontierPoint], kept: int) -> str:
    """The repair plan's walk: reversed-trigger success (red, left axis, %) and clean cost
    (blue, right axis, KL divergence) against the channels zeroed; a dashed line at the
    `kept` channels the plan ended with (after any were given back)."""
    width, height, left, right, top, bottom = 560, 230, 52, 64, 14, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max([1, *(p.channels for p in points)])
    costs = [p.clean_cost for p in points if math.isfinite(p.clean_cost)]
    cost_hi = max([1e-9, *costs])

    def x(c: float) -> float:
        return left + c / n * plot_w

    def y(share: float) -> float:  # share of the axis, 0 at the bottom
        return top + (1 - min(max(share, 0.0), 1.0)) * plot_h

    def line(values: list[tuple[float, float]], color: str, what: str) -> str:
        path = " ".join(f"{x(c):.1f},{y(v):.1f}" for c, v in values)
        dots = "".join(f'<circle cx="{x(c):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>'
                       for c, v in values)
        return (f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2">'
                f"<title>{esc(what)}</title></polyline>{dots}")

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="repair frontier: trigger success '
             'and clean cost per channels zeroed">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
             f'stroke="{MUTED}"/>']
    for share in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 6}" y="{y(share) + 4:.1f}" text-anchor="end" '
                     f'class="tick" fill="{FLAG}">{100 * share:.0f}%</text>'
                     f'<text x="{width - right + 6}" y="{y(share) + 4:.1f}" class="tick" '
                     f'fill="{BAR}">{share * cost_hi:.3g}</text>')
    for c in _ticks(0, n, 6):
        if float(c).is_integer():
            parts.append(f'<text x="{x(c):.1f}" y="{height - bottom + 16}" '
                         f'text-anchor="middle" class="tick">{int(c)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" '
                 'class="tick">channels zeroed</text>')
    parts.append(f'<line x1="{x(kept):.1f}" x2="{x(kept):.1f}" y1="{top}" '
                 f'y2="{top + plot_h}" stroke="{MUTED}" stroke-dasharray="4 3">'
                 f"<title>the plan keeps {kept} zeroed</title></line>")
    parts.append(line([(p.channels, p.clean_cost / cost_hi) for p in points
                       if math.isfinite(p.clean_cost)], BAR, "clean cost (KL divergence)"))
    parts.append(line([(p.channels, p.reversed_asr) for p in points
                       if math.isfinite(p.reversed_asr)], FLAG, "reversed-trigger success"))
    parts.append("</svg>")
    return "".join(parts)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + k * step, 10) for k in range(int((hi - start) / step) + 1)]


def png_data_uri(pixels: np.ndarray, size: int = 140) -> str:
    """A base64 PNG of a [H, W] or [C, H, W] image in [0, 1], enlarged with nearest
    neighbour so every pixel of a 28x28 trigger stays a visible block."""
    arr = np.asarray(pixels, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr[:3], (1, 2, 0))
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an image of rank 2 or 3, got shape {pixels.shape}")
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    image = Image.fromarray((np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8))
    scale = max(1, size // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
