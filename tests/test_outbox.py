"""The transactional outbox: ``bus.outbox.stage(event, connection=)`` inside the
caller's transaction, on PostgreSQL (asyncpg, SQLAlchemy) and SQLite (sqlite3,
aiosqlite, SQLAlchemy); straight into the store's tables when the connection is
to the store's database, else into ``retrybus_outbox``, which the relay (in a
worker, or ``retrybus relay``) publishes and deletes.

Each test works in a PostgreSQL schema or database of its own, or SQLite files
in its temporary directory (see tests/appdb.py).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from typer.testing import CliRunner

from appdb import fresh_database
from engines.postgresql import URL, open_test_store, url_with_schema
from retrybus import Event, EventBus, RetryWorker, Store, open_store
from retrybus._cli.app import app
from retrybus._outbox import open_outbox_database
from retrybus._stores.postgresql import PostgresStore
from retrybus.prometheus import PrometheusMetrics

LIKE = "like.added"


async def eventually(condition: Callable[[], object], what: str, within: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


def sqlalchemy_url(url: str, driver: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}+{driver}://{rest}"


@pytest.fixture
async def pg_store() -> AsyncIterator[PostgresStore]:
    async with open_test_store() as store:
        yield store


@pytest.fixture
async def app_database() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def store_dsn(store: PostgresStore) -> str:
    return URL.split("?", 1)[0]


async def pending_count(store: Store) -> int:
    """First deliveries due now (none is leased in these tests)."""
    return (await store.count_retry_kinds(datetime.now(UTC) + timedelta(seconds=5)))["pending"]


async def stage_then_roll_back(bus: EventBus, conn: asyncpg.Connection, event: Event) -> None:
    """Stage ``event`` in a transaction that a failing business write rolls back."""

    async def fail_after_staging() -> None:
        async with conn.transaction():
            await bus.outbox.stage(event, connection=conn)
            raise RuntimeError("the business write failed")

    with pytest.raises(RuntimeError):
        await fail_after_staging()


# the same PostgreSQL database ---------------------------------------------------


async def test_staged_deliveries_appear_with_the_commit_and_never_after_a_rollback(
    pg_store: PostgresStore,
) -> None:
    bus = EventBus(pg_store, service="likes")
    bus.subscribe(LIKE, lambda e: None, name="count")
    other = EventBus(pg_store, service="feed")
    other.subscribe("like.*", lambda e: None, name="refresh")
    await other.register()
    conn = await asyncpg.connect(store_dsn(pg_store))
    try:
        await conn.execute("CREATE TEMP TABLE likes (post text)")
        async with conn.transaction():
            await conn.execute("INSERT INTO likes VALUES ('p1')")
            staged = await bus.outbox.stage(Event(type=LIKE, data={"post": "p1"}), connection=conn)
            assert staged.into == "store"
            assert sorted(staged.handlers) == ["feed/refresh", "likes/count"]
            assert await pending_count(pg_store) == 0  # not before the commit
        assert await pending_count(pg_store) == 2
        await stage_then_roll_back(bus, conn, Event(type=LIKE, data={"post": "p2"}))
        assert await pending_count(pg_store) == 2
        items = await bus.retry_queue.list()
        assert {item.service for item in items} == {"likes", "feed"}
        assert all(item.attempt == 0 and item.lease_owner is None for item in items)
    finally:
        await conn.close()


async def test_a_watching_worker_runs_a_staged_delivery_after_the_commit_only(
    pg_store: PostgresStore,
) -> None:
    bus = EventBus(pg_store)
    seen: list[object] = []
    bus.subscribe(LIKE, lambda e: seen.append(e.data["n"]), name="count")
    # a check interval far beyond the test: only the store's notification after
    # the commit can wake the worker in time
    worker = RetryWorker(bus, check_interval=300)
    await worker.start()
    conn = await asyncpg.connect(store_dsn(pg_store))
    try:
        async with conn.transaction():
            await bus.outbox.stage(Event(type=LIKE, data={"n": 1}), connection=conn)
            await asyncio.sleep(0.5)
            assert seen == []
        await eventually(lambda: seen == [1], "the worker ran the staged delivery")
    finally:
        await conn.close()
        await worker.stop()


async def test_sqlalchemy_session_and_connection_stage_in_their_transaction(
    pg_store: PostgresStore,
) -> None:
    bus = EventBus(pg_store)
    bus.subscribe(LIKE, lambda e: None, name="count")
    engine = create_async_engine(sqlalchemy_url(store_dsn(pg_store), "asyncpg"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(text("SELECT 1"))
            staged = await bus.outbox.stage(Event(type=LIKE, data={}), connection=session)
            assert staged.into == "store"
            assert await pending_count(pg_store) == 0
        assert await pending_count(pg_store) == 1
        async with AsyncSession(engine) as session, session.begin():
            await bus.outbox.stage(Event(type=LIKE, data={}), connection=session)
            await session.rollback()
        assert await pending_count(pg_store) == 1
        async with engine.begin() as connection:
            await bus.outbox.stage(Event(type=LIKE, data={}), connection=connection)
        assert await pending_count(pg_store) == 2
    finally:
        await engine.dispose()


# another PostgreSQL database: the outbox table and the relay -----------------------


async def test_staging_elsewhere_writes_the_outbox_table_which_a_worker_relays(
    pg_store: PostgresStore, app_database: str
) -> None:
    bus = EventBus(pg_store, outbox=app_database)
    seen: list[int] = []
    bus.subscribe(LIKE, lambda e: seen.append(e.data["n"]), name="count")
    conn = await asyncpg.connect(app_database)
    try:
        async with conn.transaction():
            staged = await bus.outbox.stage(Event(type=LIKE, data={"n": 1}), connection=conn)
            assert staged.into == "outbox"
        await stage_then_roll_back(bus, conn, Event(type=LIKE, data={"n": 2}))
        rows = await conn.fetch("SELECT service, event, ordering_key FROM retrybus_outbox")
        assert [(r["service"], json.loads(r["event"])["data"]) for r in rows] == [
            ("default", {"n": 1})
        ]
        worker = RetryWorker(bus, check_interval=300)
        await worker.start()
        try:
            await eventually(lambda: seen == [1], "the worker relayed and ran the event")
            assert await conn.fetchval("SELECT count(*) FROM retrybus_outbox") == 0
            # a staging commit in the worker's process wakes its relay at once
            async with conn.transaction():
                await bus.outbox.stage(Event(type=LIKE, data={"n": 3}), connection=conn)
            await eventually(lambda: seen == [1, 3], "the relay ran the second event")
        finally:
            await worker.stop()
    finally:
        await conn.close()


async def test_a_relay_publishes_other_services_rows_to_their_subscribers(
    pg_store: PostgresStore, app_database: str
) -> None:
    web = EventBus(pg_store, service="web")  # stages, handles nothing
    billing = EventBus(pg_store, service="billing", outbox=app_database)
    seen: list[str] = []
    billing.subscribe("order.*", lambda e: seen.append(e.type), name="invoice")
    await billing.register()
    conn = await asyncpg.connect(app_database)
    try:
        async with conn.transaction():
            await web.outbox.stage(Event(type="order.placed", data={}), connection=conn)
        relay = billing.outbox.relay()
        try:
            assert await relay.relay_once() == 1
        finally:
            await relay.close()
        items = await billing.retry_queue.list()
        assert [(i.service, i.handler_name) for i in items] == [("billing", "invoice")]
    finally:
        await conn.close()


async def test_relays_share_a_table_and_publish_each_row_once(
    pg_store: PostgresStore, app_database: str
) -> None:
    bus = EventBus(pg_store, outbox=app_database)
    bus.subscribe(LIKE, lambda e: None, name="count")
    conn = await asyncpg.connect(app_database)
    try:
        for chunk in range(10):
            async with conn.transaction():
                for n in range(200):
                    await bus.outbox.stage(
                        Event(type=LIKE, data={"n": chunk * 200 + n}), connection=conn
                    )
    finally:
        await conn.close()
    relays = [bus.outbox.relay(batch=50) for _ in range(3)]

    async def drain(relay: object) -> int:
        from retrybus._outbox import OutboxRelay

        assert isinstance(relay, OutboxRelay)
        total = 0
        while (count := await relay.relay_once()) > 0:
            total += count
        return total

    try:
        counts = await asyncio.gather(*(drain(r) for r in relays))
    finally:
        for relay in relays:
            await relay.close()
    assert sum(counts) == 2000
    assert await pending_count(pg_store) == 2000
    depth = await open_outbox_database(app_database).depth()
    assert depth.rows == 0


async def test_an_unreadable_row_becomes_a_dead_letter_and_the_batch_goes_on(
    pg_store: PostgresStore, app_database: str
) -> None:
    bus = EventBus(pg_store, outbox=app_database)
    bus.subscribe(LIKE, lambda e: None, name="count")
    conn = await asyncpg.connect(app_database)
    try:
        async with conn.transaction():
            await bus.outbox.stage(Event(type=LIKE, data={}), connection=conn)
            await conn.execute(
                "INSERT INTO retrybus_outbox (service, event, staged_at) "
                """VALUES ('default', '{"type": 3}', now())"""
            )
        relay = bus.outbox.relay()
        try:
            assert await relay.relay_once() == 2
        finally:
            await relay.close()
        dead = await bus.dead_letters.list()
        assert len(dead) == 1
        assert dead[0].reason.startswith("undecodable outbox row")
        assert json.loads(dead[0].metadata["raw_message"]) == {"type": 3}
        assert await pending_count(pg_store) == 1
    finally:
        await conn.close()


async def test_the_outbox_depth_and_oldest_age_are_gauges(
    pg_store: PostgresStore, app_database: str
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    bus = EventBus(pg_store, outbox=app_database, metrics=metrics)
    conn = await asyncpg.connect(app_database)
    try:
        async with conn.transaction():
            for _ in range(2):
                await bus.outbox.stage(Event(type=LIKE, data={}), connection=conn)
        await conn.execute("UPDATE retrybus_outbox SET staged_at = now() - interval '90 seconds'")
    finally:
        await conn.close()
    await metrics.refresh(bus)
    label = app_database.rsplit("/", 1)[1]
    assert registry.get_sample_value("retrybus_outbox_depth", {"outbox": label}) == 2
    age = registry.get_sample_value("retrybus_outbox_oldest_age_seconds", {"outbox": label})
    assert age is not None
    assert 89 <= age < 300
    depth = await bus.outbox.depth()
    assert depth is not None
    assert depth.rows == 2
    await bus.outbox.close()


def test_cli_migrate_creates_the_table_and_relay_once_relays(
    pg_store: PostgresStore, app_database: str
) -> None:
    runner = CliRunner()
    store_url = url_with_schema(pg_store.schema)
    created = runner.invoke(app, ["migrate", "--outbox", app_database, "--json"])
    assert created.exit_code == 0, created.output
    assert json.loads(created.output) == {"outbox": app_database}

    async def stage() -> None:
        bus = EventBus(open_store(store_url), service="web")
        conn = await asyncpg.connect(app_database)
        try:
            assert await conn.fetchval("SELECT count(*) FROM retrybus_outbox") == 0
            async with conn.transaction():
                for n in range(3):
                    await bus.outbox.stage(Event(type=LIKE, data={"n": n}), connection=conn)
        finally:
            await conn.close()
            await bus.close()

    asyncio.run(stage())
    relayed = runner.invoke(
        app, ["relay", "--outbox", app_database, "--store", store_url, "--once", "--json"]
    )
    assert relayed.exit_code == 0, relayed.output
    assert json.loads(relayed.output) == {"outbox": app_database, "relayed": 3, "waiting": 0}
    bad = runner.invoke(app, ["relay", "--outbox", "redis://localhost", "--store", store_url])
    assert bad.exit_code == 2
    assert "postgresql://… or sqlite:///…" in bad.output


# SQLite ------------------------------------------------------------------------


async def test_sqlite_same_file_stages_into_the_store_on_every_connection_kind(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    store = open_store(f"sqlite:///{path}")
    await store.connect()
    bus = EventBus(store)
    bus.subscribe(LIKE, lambda e: None, name="count")
    try:
        plain = sqlite3.connect(path)
        plain.execute("CREATE TABLE likes (post TEXT)")
        plain.commit()
        plain.execute("INSERT INTO likes VALUES ('p1')")
        staged = await bus.outbox.stage(Event(type=LIKE, data={}), connection=plain)
        assert staged.into == "store"
        assert await pending_count(store) == 0
        plain.commit()
        assert await pending_count(store) == 1
        plain.execute("INSERT INTO likes VALUES ('p2')")
        await bus.outbox.stage(Event(type=LIKE, data={}), connection=plain)
        plain.rollback()
        plain.close()
        assert await pending_count(store) == 1

        async with aiosqlite.connect(path) as conn:
            await conn.execute("INSERT INTO likes VALUES ('p3')")
            assert (
                await bus.outbox.stage(Event(type=LIKE, data={}), connection=conn)
            ).into == "store"
            await conn.commit()
        assert await pending_count(store) == 2

        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        try:
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(text("INSERT INTO likes VALUES ('p4')"))
                await bus.outbox.stage(Event(type=LIKE, data={}), connection=session)
        finally:
            await engine.dispose()
        assert await pending_count(store) == 3
    finally:
        await store.close()


async def test_sqlite_another_file_goes_through_the_outbox_table_and_the_relay(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'bus.db'}")
    app_path = tmp_path / "app.db"
    bus = EventBus(store, outbox=f"sqlite:///{app_path}")
    seen: list[int] = []
    bus.subscribe(LIKE, lambda e: seen.append(e.data["n"]), name="count")
    try:
        plain = sqlite3.connect(app_path)
        for n in range(3):
            staged = await bus.outbox.stage(Event(type=LIKE, data={"n": n}), connection=plain)
            assert staged.into == "outbox"
        plain.commit()
        await bus.outbox.stage(Event(type=LIKE, data={"n": 99}), connection=plain)
        plain.rollback()
        plain.close()
        worker = RetryWorker(bus, check_interval=300)
        await worker.start()
        try:
            await eventually(lambda: sorted(seen) == [0, 1, 2], "the worker relayed the rows")
        finally:
            await worker.stop()
        assert (await open_outbox_database(f"sqlite:///{app_path}").depth()).rows == 0
    finally:
        await store.close()


async def test_sqlite_claims_hold_rows_for_one_relay_until_their_lease_runs_out(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'bus.db'}")
    app_url = f"sqlite:///{tmp_path / 'app.db'}"
    bus = EventBus(store, outbox=app_url)
    bus.subscribe(LIKE, lambda e: None, name="count")
    try:
        plain = sqlite3.connect(tmp_path / "app.db")
        await bus.outbox.stage(Event(type=LIKE, data={}), connection=plain)
        plain.commit()
        plain.close()
        first, second = open_outbox_database(app_url), open_outbox_database(app_url)
        now = bus.clock.now()
        async with first.claim(10, 30.0, now) as rows:
            assert len(rows) == 1
            async with second.claim(10, 30.0, now) as others:
                assert others == []
            raise_after = True
        assert raise_after
        # the first claim ended without an error: its row is deleted
        assert (await second.depth()).rows == 0
        await first.close()
        await second.close()
    finally:
        await store.close()


# bad input -------------------------------------------------------------------


async def test_stage_names_what_it_cannot_take(tmp_path: Path) -> None:
    bus = EventBus(open_store(f"sqlite:///{tmp_path / 'bus.db'}"))
    with pytest.raises(TypeError, match=r"connection must be .* got builtins\.str"):
        await bus.outbox.stage(Event(type=LIKE, data={}), connection="sqlite:///x.db")
    with pytest.raises(TypeError, match=r"stage takes a retrybus\.Event"):
        await bus.outbox.stage({"type": LIKE}, connection=sqlite3.connect(":memory:"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="redis://"):
        EventBus(outbox="redis://localhost:6379")
    await bus.close()
