"""The queue depth chart: inline SVG drawn on the server (no JavaScript, no CDN)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from html import escape

from .._history import DepthSample

__all__ = ["axis_step", "bar", "depth_chart"]

WIDTH, HEIGHT = 1200, 280
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 14, 30
TICKS = 4
SERIES = (
    ("retry_queue", "Retry queue", "series-retry"),
    ("dead_unprocessed", "Dead letters (unprocessed)", "series-dead"),
    ("dead_processed", "Dead letters (processed)", "series-processed"),
)


def axis_step(value: float, ticks: int = TICKS) -> int:
    """The grid step of a y axis reaching ``value`` in ``ticks`` steps: the smallest
    whole 1, 2, 2.5 or 5 × 10ⁿ of at least ``value / ticks`` (at least 1)."""
    raw = max(value / ticks, 1.0)
    magnitude = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * magnitude
        if candidate >= raw and candidate == int(candidate):
            return int(candidate)
    return int(10 * magnitude)  # pragma: no cover - the loop ends at 10


def _time_label(moment: datetime, span: timedelta) -> str:
    if span >= timedelta(days=2):
        return moment.strftime("%b %d %H:%M")
    return moment.strftime("%H:%M")


def depth_chart(samples: Sequence[DepthSample]) -> str:
    """An SVG line chart of the three depths over time (``samples`` oldest first).

    Every value written into the SVG is a number or escaped text, so the result is
    safe to insert as markup."""
    if not samples:
        return ""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    start, end = samples[0].at, samples[-1].at
    span = end - start
    seconds = max(span.total_seconds(), 1.0)
    step = axis_step(max(max(s.retry_queue, s.dead_unprocessed, s.dead_processed) for s in samples))
    top = step * TICKS

    def x(moment: datetime) -> float:
        if len(samples) == 1:
            return LEFT + plot_w / 2
        return LEFT + (moment - start).total_seconds() / seconds * plot_w

    def y(value: int) -> float:
        return TOP + plot_h - value / top * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="Queue depth over time" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i in range(TICKS + 1):  # horizontal grid lines and their values
        gy = y(step * i)
        label = f"{step * i:,}"
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
            f'<text class="axis" x="{LEFT - 8}" y="{gy + 4:.1f}" text-anchor="end">{label}</text>'
        )
    ticks = 1 if len(samples) == 1 else 6
    for i in range(ticks):
        moment = start + span * (i / max(ticks - 1, 1))
        tx = x(moment)
        anchor = "middle" if 0 < i < ticks - 1 or ticks == 1 else ("start" if i == 0 else "end")
        parts.append(
            f'<text class="axis" x="{tx:.1f}" y="{HEIGHT - 12}" text-anchor="{anchor}">'
            f"{escape(_time_label(moment, span))}</text>"
        )
    for field, label, css in SERIES:
        points = [(x(s.at), y(getattr(s, field))) for s in samples]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline class="line {css}" points="{path}"><title>{label}</title>')
            parts.append("</polyline>")
        last_x, last_y = points[-1]
        latest = getattr(samples[-1], field)
        parts.append(
            f'<circle class="dot {css}" cx="{last_x:.1f}" cy="{last_y:.1f}" r="3.5">'
            f"<title>{escape(label)}: {latest:,}</title></circle>"
        )
    parts.append(
        f'<line class="axis-line" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
        f'y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def bar(fraction: float) -> str:
    """A small horizontal bar filled to ``fraction`` (0 to 1), as inline SVG (the
    dashboard's Content-Security-Policy allows no inline styles)."""
    filled = max(0.0, min(1.0, fraction)) * 100
    return (
        '<svg class="bar" viewBox="0 0 100 6" preserveAspectRatio="none" aria-hidden="true">'
        f'<rect class="bar-track" width="100" height="6" rx="3"/>'
        f'<rect class="bar-fill" width="{filled:.1f}" height="6" rx="3"/></svg>'
    )
