"""A probe waiting with no worker running, and how long it waits, as the
dashboard's redrive page and ``retrybus dlq redrive show`` tell them (the
messages themselves are tested on every engine in test_conformance_probe)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashboard_support import Dash, dead, open_test_store, running
from test_cli import Seeded, _seed, json_of, ok


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store("sqlite", tmp_path), handlers=True) as opened:
        opened.login()
        yield opened


def test_the_redrive_page_says_no_worker_runs_and_how_long_the_probe_waits(dash: Dash) -> None:
    dash.run(dead, dash.bus, 1)
    redrive = dash.run(dash.bus.redrives.start, probe=1, probe_timeout=120)
    dash.run(dash.bus.redrives.step, redrive.id)
    dash.run(dash.bus.redrives.step, redrive.id)
    page = dash.get(f"/redrives/{redrive.id}").text
    assert "no worker of service default is running: the probe waits for one" in page
    assert "waiting for a worker for at most 2m" in page


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    return asyncio.run(_seed(f"sqlite:///{tmp_path / 'queues.db'}", tmp_path / "calls.jsonl"))


def test_redrive_show_says_how_long_a_probe_waits(seeded: Seeded) -> None:
    started = json_of(
        "dlq", "requeue", "--store", seeded.url, "--all", "--probe", "1", "--detach", "--yes"
    )
    assert started["probe_timeout"] == 600.0
    shown = ok("dlq", "redrive", "show", started["id"], "--store", seeded.url).stdout
    assert "probe 1 (waits 10m)" in shown
