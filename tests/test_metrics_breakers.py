"""``retrybus_breaker_state`` (0 closed, 1 half-open, 2 open, 3 isolated) and
``retrybus_breaker_trips_total``: set when the process sees a breaker change,
and read from the store's breaker records, of every service, on each refresh."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from conftest import fresh_store
from retrybus import CircuitBreaker, Event, EventBus, FixedDelay, ManualClock, Store
from retrybus._breaker_records import isolate_breaker, reset_breaker
from retrybus.prometheus import PrometheusMetrics

BREAKER = CircuitBreaker("db", min_calls=4, failure_ratio=0.5, open_for=30, probes=2)


@pytest.fixture(params=["memory", "sqlite"])
async def some_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


def state(
    registry: CollectorRegistry, service: str = "billing", breaker: str = "db"
) -> float | None:
    return registry.get_sample_value(
        "retrybus_breaker_state", {"service": service, "breaker": breaker}
    )


def trips(
    registry: CollectorRegistry, service: str = "billing", breaker: str = "db"
) -> float | None:
    return registry.get_sample_value(
        "retrybus_breaker_trips_total", {"service": service, "breaker": breaker}
    )


async def failing(event: Event) -> None:
    raise ConnectionError("database unreachable")


def billing_bus(store: Store, clock: ManualClock, metrics: PrometheusMetrics) -> EventBus:
    bus = EventBus(
        store,
        service="billing",
        clock=clock,
        metrics=metrics,
        default_policy=FixedDelay(delay=1.0, max_retries=3),
    )
    bus.subscribe("order.paid", failing, name="save_order", breaker=BREAKER)
    return bus


async def test_a_trip_seen_by_the_process_sets_the_gauge_at_once(
    some_store: Store, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    bus = billing_bus(some_store, clock, PrometheusMetrics(registry))
    for n in range(4):
        await bus.publish(Event("order.paid", {"n": n}))
    assert state(registry) == 2  # open, without a refresh
    assert trips(registry) == 1
    await bus.close()


async def test_a_refresh_reads_every_service_s_breakers_from_the_store(
    some_store: Store, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    bus = billing_bus(some_store, clock, PrometheusMetrics(CollectorRegistry()))
    other = EventBus(some_store, service="shipping", clock=clock)
    other.subscribe("order.paid", failing, name="ship", breaker=CircuitBreaker("carrier"))
    await bus.register()  # the breakers' records, closed
    await other.register()
    observer = EventBus(some_store, clock=clock)  # a bus of neither service: the dashboard's
    await metrics.refresh(observer)
    assert (state(registry), trips(registry)) == (0, 0)
    assert state(registry, "shipping", "carrier") == 0

    for n in range(4):  # billing's process trips it
        await bus.publish(Event("order.paid", {"n": n}))
    await metrics.refresh(observer)
    assert (state(registry), trips(registry)) == (2, 1)
    clock.advance(30)
    await metrics.refresh(observer)
    assert state(registry) == 1  # half-open: open_for passed

    await isolate_breaker(some_store, "db", now=clock.now(), actor="alice")
    await metrics.refresh(observer)
    assert (state(registry), trips(registry)) == (3, 1)
    await reset_breaker(some_store, "db", "billing", now=clock.now(), actor="bob")
    await metrics.refresh(observer)
    assert (state(registry), trips(registry)) == (0, 1)  # trips are never taken back
    assert state(registry, "shipping", "carrier") == 0
    await bus.close()
    await other.close()


async def test_the_process_sees_an_operator_s_change_at_its_refresh(
    some_store: Store, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    bus = billing_bus(some_store, clock, PrometheusMetrics(registry))
    await bus.register()
    await isolate_breaker(some_store, "db", "billing", now=clock.now(), actor="alice")
    await bus.breakers.refresh()
    assert state(registry) == 3
    await bus.close()


def test_an_unknown_state_is_refused_naming_it() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="'ajar'"):
        metrics.set_breaker_state("billing", "db", "ajar", 0)
    metrics.set_breaker_state("billing", "db", "half_open", 2)
    assert state(metrics.registry) == 1
    assert trips(metrics.registry) == 2
