"""The queue depth chart: inline SVG drawn on the server (no JavaScript, no CDN)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from html import escape

from .._history import DEFAULT_INTERVAL, DepthSample

__all__ = ["axis_step", "bar", "depth_chart", "runs"]

WIDTH, HEIGHT = 1200, 280
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 14, 30
TICKS = 4
SERIES = (
    ("retry_queue", "Retry queue", "series-retry"),
    ("dead_unprocessed", "Dead letters (unprocessed)", "series-dead"),
    ("dead_processed", "Dead letters (processed)", "series-processed"),
)
# samples further apart than this many intervals are not joined: nothing was recorded between
GAP_INTERVALS = 2.5


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


def runs(samples: Sequence[DepthSample], interval: float) -> list[list[DepthSample]]:
    """``samples`` (oldest first) split where two in a row are more than
    ``GAP_INTERVALS`` sampling intervals apart."""
    gap = timedelta(seconds=interval * GAP_INTERVALS)
    found: list[list[DepthSample]] = []
    for sample in samples:
        if found and sample.at - found[-1][-1].at <= gap:
            found[-1].append(sample)
        else:
            found.append([sample])
    return found


def depth_chart(samples: Sequence[DepthSample], interval: float = DEFAULT_INTERVAL) -> str:
    """An SVG line chart of the three depths over time (``samples`` oldest first,
    recorded every ``interval`` seconds). A line breaks where samples are missing
    (see ``runs``); a sample alone between two gaps is a small dot.

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
    pieces = runs(samples, interval)
    for field, label, css in SERIES:
        parts.extend(_lines(pieces, field, label, css, x, y))
    parts.append(
        f'<line class="axis-line" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
        f'y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _lines(
    pieces: list[list[DepthSample]],
    field: str,
    label: str,
    css: str,
    x: Callable[[datetime], float],
    y: Callable[[int], float],
) -> list[str]:
    """One series: a polyline for each run of samples, a small dot for a sample
    alone between two gaps, and a dot on the newest sample."""

    def place(sample: DepthSample) -> tuple[float, float]:
        return x(sample.at), y(getattr(sample, field))

    parts = []
    newest = pieces[-1][-1]
    for piece in pieces:
        points = [place(s) for s in piece]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline class="line {css}" points="{path}"><title>{label}</title>')
            parts.append("</polyline>")
        elif piece[0] is not newest:
            parts.append(_dot(points[0], "dot dot-lone", css, 2.2, label, getattr(piece[0], field)))
    parts.append(_dot(place(newest), "dot", css, 3.5, label, getattr(newest, field)))
    return parts


def _dot(at: tuple[float, float], kind: str, css: str, r: float, label: str, value: int) -> str:
    return (
        f'<circle class="{kind} {css}" cx="{at[0]:.1f}" cy="{at[1]:.1f}" r="{r}">'
        f"<title>{escape(label)}: {value:,}</title></circle>"
    )


def bar(fraction: float) -> str:
    """A small horizontal bar filled to ``fraction`` (0 to 1), as inline SVG (the
    dashboard's Content-Security-Policy allows no inline styles)."""
    filled = max(0.0, min(1.0, fraction)) * 100
    return (
        '<svg class="bar" viewBox="0 0 100 6" preserveAspectRatio="none" aria-hidden="true">'
        f'<rect class="bar-track" width="100" height="6" rx="3"/>'
        f'<rect class="bar-fill" width="{filled:.1f}" height="6" rx="3"/></svg>'
    )
