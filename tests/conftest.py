"""Shared fixtures: a manual clock, and the stores every conformance test runs against."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import retrybus
from retrybus import ManualClock, Store

# Server engines plug in as tests/engines/<kind>.py, each with an async context
# manager `open_test_store()` that yields a connected store in a namespace of its
# own (schema, key prefix, database) and removes it afterwards.
ENGINES_DIR = Path(__file__).parent / "engines"
SERVER_KINDS = sorted(p.stem for p in ENGINES_DIR.glob("*.py") if not p.stem.startswith("_"))
STORE_KINDS = ["memory", "sqlite", *SERVER_KINDS]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every store engine, fresh for each test."""
    kind = request.param
    if kind in SERVER_KINDS:
        engine = importlib.import_module(f"engines.{kind}")
        async with engine.open_test_store() as opened:
            yield opened
        return
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'retrybus.db'}"
    async with retrybus.open_store(url) as opened:
        yield opened


@pytest.fixture
async def bus(store: Store, clock: ManualClock) -> retrybus.EventBus:
    return retrybus.EventBus(store, clock=clock)
