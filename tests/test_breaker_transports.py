"""A broker transport's consumer holds deliveries back while a handler's circuit
breaker is open or isolated: the handler is not called, each delivery becomes a
pending store record (attempt 0, no claim) due when the breaker half-opens, the
broker's message is acked, and the worker delivers the records once the breaker
lets them through. Every transport (tests/transports/), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from conftest import fresh_store
from retrybus import (
    CircuitBreaker,
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    RetryItem,
    RetryWorker,
    Store,
)
from retrybus._records import delivery_id
from retrybus._transports.base import Transport
from transports._common import all_transports
from transports._faults import LosesAcks

TRANSPORTS = all_transports()
BREAKER = CircuitBreaker("db", min_calls=4, failure_ratio=0.5, window=30, open_for=30, probes=2)
N = 20


@pytest.fixture(params=list(TRANSPORTS))
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    async with TRANSPORTS[request.param].open_test_transport() as opened:
        yield opened


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


class Dependency:
    """A handler whose database is down until ``up``; counts its calls by event."""

    def __init__(self, *, up: bool = True) -> None:
        self.up = up
        self.calls: Counter[str] = Counter()

    async def __call__(self, event: Event) -> None:
        self.calls[event.id] += 1
        if not self.up:
            raise ConnectionError("database unreachable")


async def until(check: Callable[[], bool | Awaitable[bool]], what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.02)


async def lag_zero(transport: Transport, service: str) -> bool:
    return await transport.lag(service) in (0, None)


def billing_bus(store: Store, transport: Transport, clock: ManualClock) -> EventBus:
    return EventBus(
        store,
        service="billing",
        transport=transport,
        clock=clock,
        default_policy=FixedDelay(delay=1.0, max_retries=3),
    )


async def started(bus: EventBus, **options: object) -> RetryWorker:
    options.setdefault("check_interval", 0.05)
    worker = RetryWorker(bus, **options)  # type: ignore[arg-type]
    await worker.start()
    await until(
        lambda: worker._consumer is not None and worker._consumer._receiver is not None,
        "the consumer to open",
    )
    return worker


def held_back(worker: RetryWorker) -> int:
    return 0 if worker._consumer is None else worker._consumer.held_back


def redelivered(worker: RetryWorker) -> int:
    return 0 if worker._consumer is None else worker._consumer.redelivered


async def records_of(store: Store, handler: str) -> list[RetryItem]:
    return [i for i in await store.list_retry(limit=1000, offset=0) if i.handler_name == handler]


async def publish(transport: Transport, store: Store, count: int, start: int = 0) -> list[Event]:
    shop = EventBus(store, service="shop", transport=transport)
    results = [
        await shop.publish(Event("order.paid", {"n": n}, source="/shop"))
        for n in range(start, start + count)
    ]
    assert all(result.receipt for result in results)
    return [result.event for result in results]


async def test_an_isolated_breaker_holds_deliveries_back_until_reset(
    store: Store, transport: Transport, clock: ManualClock
) -> None:
    save, audit = Dependency(), Dependency()
    billing = billing_bus(store, transport, clock)
    billing.subscribe("order.paid", save, name="save", breaker=BREAKER)
    billing.subscribe("order.paid", audit, name="audit")  # no breaker: runs as usual
    await billing.breakers.isolate("db", actor="alice")
    worker = await started(billing, lease=1.0)
    try:
        events = await publish(transport, store, N)
        await until(lambda: held_back(worker) == N, "every delivery held back")
        await until(lambda: lag_zero(transport, "billing"), "the broker's messages acked")
        assert not save.calls
        assert audit.calls == Counter({e.id: 1 for e in events})
        held = await records_of(store, "save")
        assert sorted(i.id for i in held) == sorted(
            delivery_id("/shop", e.id, "save", "billing") for e in events
        )
        assert {(i.attempt, i.claims, i.lease_owner) for i in held} == {(0, 0, None)}
        assert {i.next_retry for i in held} == {clock.now()}  # isolated: no half-open time
        await asyncio.sleep(2.5)  # past two leases: an unacked message would come back
        assert redelivered(worker) == 0
        assert held_back(worker) == N
        assert not save.calls
        assert await records_of(store, "save") == held  # the worker claimed none of them

        await billing.breakers.reset("db", actor="bob")
        await each_delivered_once(store, billing, events, save, audit)
    finally:
        await worker.stop()
        await billing.close()


def _open(bus: EventBus) -> Callable[[], Awaitable[bool]]:
    async def is_open() -> bool:
        return (await bus.breakers.get("db")).state == "open"

    return is_open


def _empty(store: Store) -> Callable[[], Awaitable[bool]]:
    async def empty() -> bool:
        return await store.retry_count() == 0

    return empty


async def each_delivered_once(
    store: Store, billing: EventBus, events: list[Event], *handlers: Dependency
) -> None:
    """The worker delivers every event to each handler exactly once, leaving no
    record and no dead letter."""
    await until(lambda: all(len(h.calls) == len(events) for h in handlers), "the deliveries")
    await until(_empty(store), "the records removed")
    for handler in handlers:
        assert handler.calls == Counter({e.id: 1 for e in events})
    assert await billing.dead_letters.count() == 0


async def test_an_open_breaker_holds_deliveries_until_it_half_opens(
    store: Store, transport: Transport, clock: ManualClock
) -> None:
    save = Dependency(up=False)
    billing = billing_bus(store, transport, clock)
    billing.subscribe("order.paid", save, name="save", breaker=BREAKER)
    worker = await started(billing)
    try:
        # four failed calls through the consumer trip it
        tripping = await publish(transport, store, 4)
        await until(lambda: len(save.calls) == 4, "the four failing calls")
        await until(_open(billing), "the breaker open")  # written as the fourth call returns
        info = await billing.breakers.get("db")
        assert info.half_open_at is not None
        events = await publish(transport, store, N, start=4)
        await until(lambda: held_back(worker) == N, "every delivery held back")
        await until(lambda: lag_zero(transport, "billing"), "the broker's messages acked")
        assert sum(save.calls.values()) == 4
        held = [i for i in await records_of(store, "save") if i.attempt == 0]
        assert sorted(i.event_id for i in held) == sorted(e.id for e in events)
        assert {(i.claims, i.next_retry) for i in held} == {(0, info.half_open_at)}

        # half-open: the worker's probes succeed and close it, then the rest go through
        save.up = True
        clock.advance(30)
        await until(lambda: len(save.calls) == 4 + N, "every delivery made")
        await until(_empty(store), "the records removed")
        assert (await billing.breakers.get("db")).state == "closed"
        assert save.calls == Counter({**{e.id: 2 for e in tripping}, **{e.id: 1 for e in events}})
        assert await billing.dead_letters.count() == 0
        assert redelivered(worker) == 0
    finally:
        await worker.stop()
        await billing.close()


async def test_a_crash_between_the_record_and_the_ack_adds_nothing(
    store: Store, transport: Transport, clock: ManualClock
) -> None:
    lossy = LosesAcks(transport, times=1)
    save = Dependency()
    billing = billing_bus(store, lossy, clock)
    billing.subscribe("order.paid", save, name="save", breaker=BREAKER)
    await billing.breakers.isolate("db")
    worker = await started(billing, lease=5.0)
    (event,) = await publish(transport, store, 1)
    await until(lambda: len(lossy.lost) == 1, "the lost ack")
    (record,) = await records_of(store, "save")
    await worker.stop()  # as a crash would: the message goes back to the broker
    worker = await started(billing, lease=2.0)
    try:
        # delivered again: the record is found there (or, as nats-server 2.9.10 may
        # report a redelivery as a first delivery, held back again onto it)
        await until(
            lambda: redelivered(worker) + held_back(worker) == 1, "the redelivery", within=20
        )
        await until(lambda: lag_zero(transport, "billing"), "the broker's message acked")
        assert await records_of(store, "save") == [record]
        assert (record.id, record.attempt, record.claims) == (
            delivery_id("/shop", event.id, "save", "billing"),
            0,
            0,
        )
        assert not save.calls
        await billing.breakers.reset("db")
        await until(lambda: save.calls == Counter({event.id: 1}), "the one delivery")
        await until(_empty(store), "the record removed")
    finally:
        await worker.stop()
        await billing.close()


async def test_a_rate_limited_handler_is_left_to_the_workers_claims(
    store: Store, transport: Transport
) -> None:
    """A consumer does not call a handler with a rate: its deliveries become
    pending records due now, which the worker claims as the bucket allows."""
    save, audit = Dependency(), Dependency()
    billing = EventBus(store, service="billing", transport=transport)
    billing.subscribe("order.paid", save, name="save", rate="1000/s")
    billing.subscribe("order.paid", audit, name="audit")
    worker = await started(billing)
    try:
        events = await publish(transport, store, N)
        await until(lambda: held_back(worker) == N, "every delivery left to the claims")
        await each_delivered_once(store, billing, events, save, audit)
    finally:
        await worker.stop()
        await billing.close()
