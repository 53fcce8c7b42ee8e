"""Inline SVG for the /status page: a version donut, sparklines, event marks.

Pure functions from numbers and strings to SVG text; every string that reaches
the markup goes through html.escape here, so callers may pass hostile input
(robot ids, versions, event details arrive from robots).
"""
from __future__ import annotations

import math
from html import escape

# Distinct on white and for the common colour-vision deficiencies (Okabe-Ito, reordered).
PALETTE = ("#0072b2", "#009e73", "#e69f00", "#56b4e9", "#cc79a7", "#d55e00", "#f0e442", "#999999")
OTHER = "#c8c8c8"
MAX_BRIDGED = 2  # empty sparkline buckets drawn through; more is a gap in the line

# Event kinds: (colour, SVG shape) so the timeline reads without colour too.
EVENT_STYLE = {
    "installed": ("#009e73", "circle"),
    "rolled_back": ("#d7301f", "triangle"),
    "blacklisted": ("#7f0000", "square"),
    "rejected": ("#e69f00", "diamond"),
    "gap": ("#6a3d9a", "diamond"),
}
DEFAULT_EVENT = ("#666666", "circle")


def version_colors(versions: list[str]) -> dict[str, str]:
    """A stable colour per version: the newest ones get the strongest colours."""
    return {v: PALETTE[min(i, len(PALETTE) - 1)] for i, v in enumerate(versions)}


def donut(slices: list[tuple[str, int, str]], size: int = 160, label: str = "") -> str:
    """Slices of (name, count, colour) around a hole that holds `label`."""
    total = sum(count for _, count, _ in slices)
    width = size / 6
    radius = (size - width) / 2 - 2  # the whole stroke inside the view box
    center = size / 2
    parts = [f'<svg class="donut" viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img"'
             f' aria-label="{escape(label)}">']
    if total == 0:
        parts.append(f'<circle cx="{center}" cy="{center}" r="{radius}" fill="none" stroke="{OTHER}" stroke-width="{width}"/>')
    circumference = 2 * math.pi * radius
    offset = 0.0
    for name, count, color in slices:
        if count <= 0:
            continue
        length = circumference * count / total
        # One stroked circle per slice, its dash the slice; starts at 12 o'clock.
        parts.append(
            f'<circle cx="{center}" cy="{center}" r="{radius:.2f}" fill="none" stroke="{escape(color)}"'
            f' stroke-width="{width:.1f}" stroke-dasharray="{length:.2f} {circumference - length:.2f}"'
            f' stroke-dashoffset="{-offset:.2f}" transform="rotate(-90 {center} {center})">'
            f"<title>{escape(name)}: {count}</title></circle>")
        offset += length
    parts.append(f'<text x="{center}" y="{center}" text-anchor="middle" dominant-baseline="central" class="donut-label">'
                 f"{escape(label)}</text></svg>")
    return "".join(parts)


def sparkline(values: list[float | None], title: str, width: int = 120, height: int = 30, color: str = "#0072b2") -> str:
    """Values 0..100 evenly spaced across the window, None where nothing was received."""
    pad = 2
    inner_w, inner_h = width - 2 * pad, height - 2 * pad
    count = len(values)
    head = (f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img"'
            f' aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f'<rect x="0" y="0" width="{width}" height="{height}" rx="3" class="spark-bg"/>')
    if not any(v is not None for v in values):
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" dominant-baseline="central"' \
                      ' class="spark-empty">no data</text></svg>'
    segments: list[list[tuple[float, float]]] = [[]]
    last = (0.0, 0.0)
    missing = 0
    for index, value in enumerate(values):
        if value is None:
            missing += 1
            continue
        # A bucket or two without a sample is the sampling interval showing, not silence.
        if missing > MAX_BRIDGED and segments[-1]:
            segments.append([])
        missing = 0
        x = pad + (inner_w * index / (count - 1) if count > 1 else inner_w)
        y = pad + inner_h * (1 - max(0.0, min(100.0, value)) / 100)
        segments[-1].append((x, y))
        last = (x, y)
    body = []
    for points in (s for s in segments if s):
        if len(points) == 1:
            points = [(points[0][0] - 1, points[0][1]), (points[0][0] + 1, points[0][1])]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        base = pad + inner_h
        body.append(f'<polygon points="{points[0][0]:.1f},{base} {line} {points[-1][0]:.1f},{base}" fill="{color}"'
                    ' fill-opacity="0.15"/>')
        body.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5" stroke-linejoin="round"/>')
    body.append(f'<circle cx="{last[0]:.1f}" cy="{last[1]:.1f}" r="2.2" fill="{color}"/>')
    return head + "".join(body) + "</svg>"


def event_mark(kind: str, title: str, size: int = 14) -> str:
    """A small shape for one event; colour and shape both say the kind."""
    color, shape = EVENT_STYLE.get(kind, DEFAULT_EVENT)
    half = size / 2
    if shape == "triangle":
        figure = f'<polygon points="{half},1 {size - 1},{size - 1} 1,{size - 1}"/>'
    elif shape == "square":
        figure = f'<rect x="2" y="2" width="{size - 4}" height="{size - 4}"/>'
    elif shape == "diamond":
        figure = f'<polygon points="{half},1 {size - 1},{half} {half},{size - 1} 1,{half}"/>'
    else:
        figure = f'<circle cx="{half}" cy="{half}" r="{half - 2}"/>'
    return (f'<svg class="mark" viewBox="0 0 {size} {size}" width="{size}" height="{size}" fill="{color}"'
            f' stroke="#fff" stroke-width="1" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f"{figure}</svg>")
