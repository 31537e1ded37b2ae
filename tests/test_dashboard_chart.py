"""The queue depth chart: server-side SVG, well-formed, scaled to round numbers."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from retrybus import DepthSample
from retrybus.dashboard._chart import axis_step, bar, depth_chart, runs

SVG = "{http://www.w3.org/2000/svg}"
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("largest", "top"),
    [(0, 4), (3, 4), (5, 8), (12, 20), (99, 100), (101, 200), (999, 1000), (123_456, 200_000)],
)
def test_the_axis_ends_at_a_round_number(largest: int, top: int) -> None:
    assert axis_step(largest) * 4 == top


def test_no_samples_no_chart() -> None:
    assert depth_chart([]) == ""


def test_one_sample_is_a_point_per_series() -> None:
    svg = ET.fromstring(depth_chart([DepthSample(START, 3, 2, 1)]))
    assert svg.findall(f"{SVG}polyline") == []
    assert len(svg.findall(f"{SVG}circle")) == 3


def test_many_samples_are_lines_from_left_to_right() -> None:
    samples = [DepthSample(START + timedelta(minutes=m), m, 2 * m, 0) for m in range(10)]
    svg = ET.fromstring(depth_chart(samples))
    lines = svg.findall(f"{SVG}polyline")
    assert len(lines) == 3
    points = [tuple(map(float, p.split(","))) for p in lines[1].attrib["points"].split()]
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    assert xs == sorted(xs)
    assert ys == sorted(ys, reverse=True)  # rising counts climb up the chart
    labels = [t.text for t in svg.findall(f"{SVG}text")]
    assert "09:00" in labels
    assert "09:09" in labels
    assert "20" in labels  # the axis top for a largest value of 18
    titles = [t.text for t in svg.iter(f"{SVG}title")]
    assert "Dead letters (unprocessed): 18" in titles


def xs_of(line: ET.Element) -> list[float]:
    return [float(point.split(",")[0]) for point in line.attrib["points"].split()]


def test_a_gap_in_the_samples_breaks_the_lines() -> None:
    minutes = [0, 1, 2, 3, 20, 21, 22]  # nothing recorded from 3 to 20 minutes
    samples = [DepthSample(START + timedelta(minutes=m), m, m, m) for m in minutes]
    svg = ET.fromstring(depth_chart(samples, interval=60))
    lines = svg.findall(f"{SVG}polyline")
    assert len(lines) == 6  # two pieces for each of the three series
    for before, after in zip(lines[::2], lines[1::2], strict=True):
        assert len(xs_of(before)) == 4
        assert len(xs_of(after)) == 3
        assert max(xs_of(before)) < min(xs_of(after))  # nothing drawn across the gap
    assert len(svg.findall(f"{SVG}circle")) == 3  # the newest values only


def test_samples_up_to_two_and_a_half_intervals_apart_are_joined() -> None:
    seconds = [0, 60, 210, 270]  # 150 s = 2.5 intervals: a late sample, not a gap
    samples = [DepthSample(START + timedelta(seconds=s), 1, 1, 1) for s in seconds]
    assert len(runs(samples, 60)) == 1
    late = [*samples, DepthSample(START + timedelta(seconds=421), 1, 1, 1)]
    assert [len(piece) for piece in runs(late, 60)] == [4, 1]
    # the interval is the recorders', not a minute
    assert len(runs(samples, 10)) == 4


def test_a_sample_alone_between_gaps_is_a_dot() -> None:
    minutes = [0, 1, 10, 20, 21]
    samples = [DepthSample(START + timedelta(minutes=m), 5, 5, 5) for m in minutes]
    svg = ET.fromstring(depth_chart(samples, interval=60))
    assert len(svg.findall(f"{SVG}polyline")) == 6
    lone = [c for c in svg.findall(f"{SVG}circle") if "dot-lone" in c.attrib["class"]]
    assert len(lone) == 3  # the sample at 10 minutes, in each series
    # and a history that ends with a sample after a gap ends on the newest value's dot
    svg = ET.fromstring(depth_chart(samples[:3], interval=60))
    assert len(svg.findall(f"{SVG}polyline")) == 3
    assert all("dot-lone" not in c.attrib["class"] for c in svg.findall(f"{SVG}circle"))


def test_a_long_history_labels_days() -> None:
    samples = [DepthSample(START + timedelta(hours=h), 1, 1, 1) for h in range(0, 72, 6)]
    labels = [t.text for t in ET.fromstring(depth_chart(samples)).findall(f"{SVG}text")]
    assert "Jan 05 09:00" in labels


def test_a_bar_is_clamped() -> None:
    assert 'class="bar-fill" width="100.0"' in bar(3)
    assert 'class="bar-fill" width="0.0"' in bar(-1)
    assert 'class="bar-fill" width="50.0"' in bar(0.5)
