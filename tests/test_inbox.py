"""The inbox: ``bus.inbox.claim`` in a handler's own transaction (PostgreSQL via
asyncpg and SQLAlchemy, SQLite via sqlite3 and aiosqlite), and the store's
remembered successes (``EventBus(inbox=True)``)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import fresh_store
from inbox_apps import APP_KINDS, AppDb, app_db
from retrybus import (
    AlreadyHandled,
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    RetryItem,
    open_store,
)
from retrybus._outbox import open_outbox_database
from retrybus._transports.base import TransportSettings
from transports._common import all_transports


def new_event(kind: str = "order.placed") -> Event:
    return Event(kind, {"n": 1}, id=uuid.uuid4().hex)


@pytest.fixture(params=APP_KINDS)
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with app_db(request.param, tmp_path) as db:
        yield db


# inbox.claim -----------------------------------------------------------------


async def test_claim_makes_a_handlers_effect_happen_once(app: AppDb) -> None:
    bus = EventBus()
    calls: list[str] = []

    @bus.handler("order.placed", name="ship")
    async def ship(event: Event) -> None:
        calls.append(event.id)
        async with app.transaction() as conn, bus.inbox.claim(event, connection=conn):
            await app.write_effect(conn, event.id, "ship")

    event = new_event()
    first = await bus.publish(event)
    second = await bus.publish(event)  # a duplicate: the handler runs, its effect does not
    assert first.succeeded == second.succeeded == ("ship",)
    assert len(calls) == 2
    assert await app.effects(event.id) == 1
    assert (await bus.stats()).inbox_skipped == 1
    claims = await app.rows("SELECT service, handler, event_id, event_source FROM retrybus_inbox")
    assert claims == [("default", "ship", event.id, event.source)]


def _in_thread(work: Any) -> Any:
    """``work()`` (a coroutine function) on a loop of its own in another thread:
    a second delivery that truly runs beside the first."""
    return asyncio.to_thread(asyncio.run, work())


@pytest.mark.parametrize("first_commits", [True, False], ids=["commit", "rollback"])
async def test_two_concurrent_deliveries_do_the_effect_once(
    app: AppDb, first_commits: bool
) -> None:
    bus = EventBus()
    event = new_event()
    claimed = threading.Event()
    outcomes: dict[str, str] = {}

    async def first() -> None:
        try:
            async with app.transaction() as conn:
                async with bus.inbox.claim(event, connection=conn, handler="ship"):
                    await app.write_effect(conn, event.id, "first")
                claimed.set()
                await asyncio.sleep(0.3)  # the second delivery waits on this claim meanwhile
                if not first_commits:
                    raise RuntimeError("the first delivery's transaction fails")
            outcomes["first"] = "effect"
        except RuntimeError:
            outcomes["first"] = "rolled back"
        finally:
            claimed.set()

    async def second() -> None:
        await asyncio.to_thread(claimed.wait)
        try:
            async with (
                app.transaction() as conn,
                bus.inbox.claim(event, connection=conn, handler="ship"),
            ):
                await app.write_effect(conn, event.id, "second")
            outcomes["second"] = "effect"
        except AlreadyHandled:
            outcomes["second"] = "skipped"

    await asyncio.gather(first(), _in_thread(second))
    assert await app.effects(event.id) == 1
    if first_commits:
        assert outcomes == {"first": "effect", "second": "skipped"}
        assert bus.core.inbox_skips == 1
    else:
        assert outcomes == {"first": "rolled back", "second": "effect"}
        rows = await app.rows("SELECT handler FROM effects")
        assert rows == [("second",)]
    assert len(await app.claims()) == 1


async def test_a_rolled_back_delivery_is_retried_and_does_the_effect(
    app: AppDb, tmp_path: Path
) -> None:
    clock = ManualClock()
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    bus = EventBus(store, clock=clock, default_policy=FixedDelay(delay=1, max_retries=3))
    failures = [1]

    @bus.handler("order.placed", name="ship")
    async def ship(event: Event) -> None:
        async with app.transaction() as conn:
            async with bus.inbox.claim(event, connection=conn):
                await app.write_effect(conn, event.id, "ship")
            if failures:
                failures.pop()
                raise ConnectionError("the effect's transaction fails after the claim")

    async with bus:
        event = new_event()
        result = await bus.publish(event)
        assert result.retrying == ("ship",)
        assert await app.effects(event.id) == 0
        assert await app.claims() == []
        clock.advance(2)
        worker = bus.consumer(relay=False)
        assert await worker.run_once() == 1
        assert await app.effects(event.id) == 1
        # the same event again: the claim is there, the handler returns at once
        again = await bus.publish(event)
        assert again.succeeded == ("ship",)
        await bus.core.ledger.flush()
        assert await app.effects(event.id) == 1
        stats = await bus.stats()
        assert stats.inbox_skipped == 1
        assert stats.retry_queue_size == 0
        assert stats.dead_letter_queue_size == 0


async def test_already_handled_in_a_worker_is_a_success(app: AppDb, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    bus = EventBus(store)

    @bus.handler("order.placed", name="ship")
    async def ship(event: Event) -> None:
        async with app.transaction() as conn, bus.inbox.claim(event, connection=conn):
            await app.write_effect(conn, event.id, "ship")

    async with bus:
        event = new_event()
        await bus.publish(event)
        await bus.core.ledger.flush()
        await bus.publish(event, defer=True)  # a deferred duplicate: a worker runs it
        worker = bus.consumer(relay=False)
        assert await worker.run_once() == 1
        stats = await bus.stats()
        assert stats.inbox_skipped == 1
        assert stats.retry_queue_size == 0
        assert stats.dead_letter_queue_size == 0
        assert await app.effects(event.id) == 1


async def test_claim_outside_a_handler_needs_the_handler_name(tmp_path: Path) -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="handler="):
        bus.inbox.claim(new_event(), connection=object())
    with pytest.raises(ValueError, match="handler"):
        bus.inbox.claim(new_event(), connection=object(), handler="")
    with pytest.raises(TypeError, match="connection must be"):
        async with bus.inbox.claim(new_event(), connection=object(), handler="ship"):
            pass


async def test_claims_of_services_and_handlers_are_apart(app: AppDb) -> None:
    billing = EventBus(service="billing")
    shipping = EventBus(service="shipping")
    event = new_event()
    for bus, handler in ((billing, "a"), (billing, "b"), (shipping, "a")):
        async with (
            app.transaction() as conn,
            bus.inbox.claim(event, connection=conn, handler=handler),
        ):
            await app.write_effect(conn, event.id, handler)
    assert await app.effects(event.id) == 3
    with pytest.raises(AlreadyHandled, match="'b' of service 'billing'"):
        async with (
            app.transaction() as conn,
            billing.inbox.claim(event, connection=conn, handler="b"),
        ):
            raise AssertionError("the body of a claimed delivery is skipped")


async def test_old_claims_are_pruned(app: AppDb) -> None:
    clock = ManualClock()
    bus = EventBus(clock=clock, inbox_retention=3600)
    old, new = new_event(), new_event()
    async with app.transaction() as conn, bus.inbox.claim(old, connection=conn, handler="h"):
        pass
    clock.advance(3000)
    async with app.transaction() as conn, bus.inbox.claim(new, connection=conn, handler="h"):
        pass
    clock.advance(1000)
    async with app.transaction() as conn:
        await bus.inbox.prune(conn)
    assert await app.rows("SELECT event_id FROM retrybus_inbox") == [(new.id,)]
    # the pruned claim is forgotten: a delivery that old runs again
    async with app.transaction() as conn, bus.inbox.claim(old, connection=conn, handler="h"):
        await app.write_effect(conn, old.id, "h")
    assert await app.effects(old.id) == 1


async def test_migrate_outbox_creates_the_inbox_table(tmp_path: Path) -> None:
    database = open_outbox_database(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        await database.create()
    finally:
        await database.close()
    db = AppDb("sqlite3", path=tmp_path / "app.db")
    names = await db.rows("SELECT name FROM sqlite_master WHERE type = 'table'")
    assert ("retrybus_inbox",) in names


# remembered successes (EventBus(inbox=True)) ---------------------------------

REMEMBERING_KINDS = ["memory", "sqlite", "postgresql", "redis", "mongodb"]


@pytest.fixture(params=REMEMBERING_KINDS)
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


def counting_bus(store: Any, calls: list[str], **settings: Any) -> EventBus:
    bus = EventBus(store, clock=settings.pop("clock", None), **settings)

    @bus.handler("order.placed", name="ship")
    async def ship(event: Event) -> None:
        calls.append(event.id)

    return bus


@pytest.mark.parametrize("inbox", [True, False], ids=["inbox", "no-inbox"])
async def test_a_duplicate_publish_of_a_handled_event_is_skipped(
    any_store: Any, inbox: bool
) -> None:
    calls: list[str] = []
    bus = counting_bus(any_store, calls, inbox=inbox)
    event = new_event()
    first = await bus.publish(event)
    await bus.core.ledger.flush()  # the success's removal (and memory) written
    second = await bus.publish(event)
    await bus.core.ledger.flush()
    assert first.succeeded == second.succeeded == ("ship",)
    assert calls == ([event.id] if inbox else [event.id, event.id])
    stats = await bus.stats()
    assert stats.inbox_skipped == (1 if inbox else 0)
    assert stats.retry_queue_size == 0
    assert await bus.publish(new_event()) is not None
    assert len(calls) == (2 if inbox else 3)  # another event runs


async def test_a_not_durable_publish_remembers_too(tmp_path: Path) -> None:
    calls: list[str] = []
    async with fresh_store("sqlite", tmp_path) as store:
        bus = counting_bus(store, calls, inbox=True, durable=False)
        event = new_event()
        await bus.publish(event)
        await bus.publish(event)
        assert calls == [event.id]
        assert (await bus.stats()).inbox_skipped == 1


async def test_the_worker_skips_a_claimed_delivery_already_handled(any_store: Any) -> None:
    calls: list[str] = []
    bus = counting_bus(any_store, calls, inbox=True)
    event = new_event()
    await bus.publish(event, defer=True)
    worker = bus.consumer(relay=False)
    assert await worker.run_once() == 1
    assert calls == [event.id]
    await bus.publish(event, defer=True)  # a deferred duplicate: one more record
    assert await bus.retry_queue.count() == 1
    assert await worker.run_once() == 1  # finished as a success, not called
    assert calls == [event.id]
    stats = await bus.stats()
    assert stats.inbox_skipped == 1
    assert stats.retry_queue_size == 0
    assert stats.dead_letter_queue_size == 0


async def test_a_retry_that_succeeds_is_remembered(tmp_path: Path, clock: ManualClock) -> None:
    calls: list[str] = []
    async with fresh_store("sqlite", tmp_path) as store:
        bus = EventBus(store, clock=clock, inbox=True)

        @bus.handler("order.placed", name="ship", policy=FixedDelay(delay=1.0))
        async def ship(event: Event) -> None:
            calls.append(event.id)
            if len(calls) == 1:
                raise RuntimeError("down")

        event = new_event()
        assert (await bus.publish(event)).retrying == ("ship",)
        clock.advance(2)
        assert await bus.consumer(relay=False).run_once() == 1
        assert len(calls) == 2
        await bus.publish(event)
        assert len(calls) == 2
        assert (await bus.stats()).inbox_skipped == 1


async def test_a_handlers_own_setting_wins_over_the_buss(tmp_path: Path) -> None:
    calls: dict[str, int] = {"on": 0, "off": 0, "bus": 0}
    async with fresh_store("sqlite", tmp_path) as store:
        for bus_inbox in (False, True):
            bus = EventBus(store, inbox=bus_inbox, service=f"s{int(bus_inbox)}")
            for name, own in (("on", True), ("off", False), ("bus", None)):

                def count(event: Event, name: str = name) -> None:
                    calls[name] += 1

                bus.subscribe("order.placed", count, name=name, inbox=own)
            event = new_event()
            for _ in range(2):
                await bus.publish(event)
                await bus.core.ledger.flush()
            expected_bus = 1 if bus_inbox else 2
            assert calls == {"on": 1, "off": 2, "bus": expected_bus}
            assert (await bus.stats()).inbox_skipped == 1 + (1 if bus_inbox else 0)
            calls.update(dict.fromkeys(calls, 0))


async def test_a_success_is_forgotten_after_the_retention(
    any_store: Any, clock: ManualClock
) -> None:
    calls: list[str] = []
    bus = counting_bus(any_store, calls, inbox=True, inbox_retention=60, clock=clock)
    event = new_event()
    await bus.publish(event)
    await bus.core.ledger.flush()
    clock.advance(59)
    await bus.publish(event)
    assert len(calls) == 1
    clock.advance(1)
    await bus.publish(event)  # forgotten: it runs again
    await bus.core.ledger.flush()
    assert len(calls) == 2
    clock.advance(61)
    assert await any_store.forget_successes(clock.now()) == 1  # the worker's sweep


async def test_a_requeued_dead_letter_runs_its_handler(tmp_path: Path) -> None:
    calls: list[str] = []
    async with fresh_store("sqlite", tmp_path) as store:
        bus = counting_bus(store, calls, inbox=True)
        event = new_event()
        await bus.publish(event)
        await bus.core.ledger.flush()
        # an operator's dead letter of that delivery (made by hand), requeued
        now = bus.clock.now()
        record = RetryItem.pending(event, "ship", max_retries=3, due=now, now=now)
        dead = await bus.dead_letters.add(record, reason="lost")
        assert await bus.dead_letters.requeue(dead.id)
        assert await bus.consumer(relay=False).run_once() == 1
        assert calls == [event.id, event.id]


async def _until(check: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting")


@pytest.mark.parametrize("broker", ["memory", "redis"])
@pytest.mark.parametrize("inbox", [True, False], ids=["inbox", "no-inbox"])
async def test_the_transport_consumer_skips_a_message_already_handled(
    broker: str, inbox: bool
) -> None:
    transports = all_transports()
    async with transports[broker].open_test_transport() as transport:
        calls: list[str] = []
        bus = EventBus(open_store("memory://"), transport=transport, inbox=inbox)
        bus.subscribe("order.placed", lambda event: calls.append(event.id), name="ship")
        event = new_event()
        await transport.declare(bus.service, ["order.placed"], TransportSettings())
        async with bus.consumer(relay=False, check_interval=0.05):
            await bus.publish(event)
            await _until(lambda: _async(len(calls) == 1))
            await bus.publish(event)  # the same event, a first delivery again

            async def second_done() -> bool:
                return len(calls) == 2 or (await bus.stats()).inbox_skipped == 1

            await _until(second_done)
            other = new_event()
            await bus.publish(other)
            await _until(lambda: _async(other.id in calls))
        assert calls == ([event.id, other.id] if inbox else [event.id, event.id, other.id])
        assert (await bus.stats()).inbox_skipped == (1 if inbox else 0)


async def _async(value: bool) -> bool:
    return value
