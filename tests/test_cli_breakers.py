"""``retrybus breakers [list|isolate|reset]`` (issue 16), with a store URL only:
the breakers of every service (a breaker that never tripped too), as a table
and as JSON; isolate and reset, which a bus of the breaker's service follows at
its next refresh; an unknown or ambiguous name is a one-line error. On SQLite
and PostgreSQL; commands run in a thread through CliRunner (each its own loop)."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli_runner import invoke, json_of, ok, one_line_error
from engines import postgresql
from retrybus import CircuitBreaker, Event, EventBus, FixedDelay, ManualClock, Store, open_store
from retrybus._breaker import BreakerStatus

DB = CircuitBreaker("orders-db", min_calls=4, failure_ratio=0.5, open_for=300, probes=2)


async def failing(event: Event) -> None:
    raise ConnectionError("database unreachable")


@dataclass
class Seeded:
    url: str
    store: Store
    billing: EventBus


@pytest.fixture(params=["sqlite", "postgresql"])
async def seeded(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Seeded]:
    """billing's orders-db (behind SaveOrder and SaveRefund) tripped by four
    failures; shipping's carrier and billing's own second breaker, "db", never
    tripped; reporting's "db" too (the same name in two services)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'breakers.db'}"
        store = open_store(url)
        await store.connect()
        context = None
    else:
        engine = importlib.import_module("engines.postgresql")
        context = engine.open_test_store()
        store = await context.__aenter__()
        url = postgresql.url_with_schema(store.schema)  # type: ignore[attr-defined]
    clock = ManualClock(datetime.now(UTC))  # the commands read the system clock
    policy = FixedDelay(delay=1, max_retries=3)
    billing = EventBus(store, service="billing", clock=clock, default_policy=policy)
    billing.subscribe("order.paid", failing, name="SaveOrder", breaker=DB)
    billing.subscribe("order.refunded", failing, name="SaveRefund", breaker="orders-db")
    shipping = EventBus(store, service="shipping", clock=clock)
    shipping.subscribe("order.paid", failing, name="Ship", breaker=CircuitBreaker("carrier"))
    reporting = EventBus(store, service="reporting", clock=clock)
    reporting.subscribe("order.paid", failing, name="Report", breaker=CircuitBreaker("db"))
    shipping.subscribe("parcel.*", failing, name="Track", breaker=CircuitBreaker("db"))
    for bus in (billing, shipping, reporting):
        await bus.register()
    for n in range(4):
        await billing.publish(Event("order.paid", {"n": n}))
    try:
        yield Seeded(url, store, billing)
    finally:
        if context is None:
            await store.close()
        else:
            await context.__aexit__(None, None, None)


async def test_list_gives_every_service_s_breakers_as_json(seeded: Seeded) -> None:
    listed = await json_of("breakers", "list", "--store", seeded.url)
    assert [(b["service"], b["name"], b["state"]) for b in listed] == [
        ("billing", "orders-db", "open"),
        ("reporting", "db", "closed"),
        ("shipping", "carrier", "closed"),
        ("shipping", "db", "closed"),
    ]
    orders = listed[0]
    assert orders["handlers"] == ["SaveOrder", "SaveRefund"]
    assert orders["trips"] == 1
    assert orders["reason"] == "4 of 4 calls failed in 30s"
    assert orders["half_open_at"] is not None
    assert orders["settings"]["open_for"] == 300
    # the bare group is `list`; --service keeps to one service
    bare = await json_of("breakers", "--service", "billing", "--store", seeded.url)
    assert [b["name"] for b in bare] == ["orders-db"]


async def test_the_table_shows_state_handlers_and_the_time_to_half_open(seeded: Seeded) -> None:
    table = (await ok("breakers", "--store", seeded.url)).stdout
    for text in ("orders-db", "open", "SaveOrder", "carrier", "closed", "half-open at", "(in "):
        assert text in table, text


async def test_isolate_and_reset_reach_the_service_s_processes(seeded: Seeded) -> None:
    out = await ok("breakers", "isolate", "carrier", "--store", seeded.url, "--actor", "alice")
    assert "shipping/carrier isolated by alice" in out.stdout
    shown = await json_of("breakers", "--service", "shipping", "--store", seeded.url)
    assert shown[0]["state"] == "isolated"
    assert shown[0]["reason"] == "isolated by alice"

    reset = await json_of("breakers", "reset", "orders-db", "--store", seeded.url)
    assert reset["state"] == "closed"
    assert reset["open_for"] == 300
    billing = seeded.billing
    await billing.breakers.refresh()
    info = await billing.breakers.get("orders-db")
    assert info.state == "closed"
    assert info.trips == 1


async def test_an_unknown_name_is_a_one_line_error_naming_it(seeded: Seeded) -> None:
    line = one_line_error(await invoke("breakers", "reset", "nope", "--store", seeded.url), 1)
    assert "'nope'" in line
    assert "billing/orders-db" in line  # what is there
    ambiguous = await invoke("breakers", "isolate", "db", "--store", seeded.url)
    assert "several services (reporting, shipping)" in one_line_error(ambiguous, 1)
    named = await json_of(
        "breakers", "isolate", "db", "--service", "reporting", "--store", seeded.url
    )
    assert (named["service"], named["state"]) == ("reporting", "isolated")
    bad = await invoke("breakers", "list", "--service", "bad name", "--store", seeded.url)
    assert "--service" in one_line_error(bad, 2)


async def test_a_record_without_settings_is_listed_and_isolated_but_not_reset(
    seeded: Seeded,
) -> None:
    # as an older release writes it: the status alone
    old = BreakerStatus(state="open", open_for=60.0, trips=3, reason="old").to_json()
    assert await seeded.store.put_control("breaker:legacy:cache", old, version=0) == 1
    (listed,) = await json_of("breakers", "--service", "legacy", "--store", seeded.url)
    assert (listed["name"], listed["trips"], listed["settings"]) == ("cache", 3, None)
    assert listed["handlers"] == []
    refused = await invoke("breakers", "reset", "cache", "--store", seeded.url)
    assert "has no settings" in one_line_error(refused, 1)
    isolated = await json_of("breakers", "isolate", "cache", "--store", seeded.url)
    assert isolated["state"] == "isolated"
