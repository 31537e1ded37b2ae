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

from inbox_apps import APP_KINDS, AppDb, app_db
from retrybus import AlreadyHandled, Event, EventBus, FixedDelay, ManualClock, open_store
from retrybus._outbox import open_outbox_database


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
