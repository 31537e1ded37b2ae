"""Shared fixtures: a manual clock, and the stores every conformance test runs against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import retrybus
from retrybus import ManualClock, Store

STORE_KINDS = ["memory", "sqlite"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every store engine, fresh for each test."""
    kind = request.param
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'retrybus.db'}"
    async with retrybus.open_store(url) as opened:
        yield opened


@pytest.fixture
async def bus(store: Store, clock: ManualClock) -> retrybus.EventBus:
    return retrybus.EventBus(store, clock=clock)
