"""What only the PostgreSQL store has to show: its migrations (version 1 databases
upgraded, their failure groups back-filled), tables and indexes, LISTEN/NOTIFY, and
the migrate command.

Every test works in a schema of its own (dropped afterwards) and skips when the
server is unreachable (fails with CI=true); see tests/engines/postgresql.py.
Reopening a schema, damaged rows, bad URLs, an unreachable server and four worker
processes on one schema: tests/test_conformance_engines.py, for every engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner, Result

from engines.postgresql import URL, fresh_schema, url_with_schema
from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    FixedDelay,
    RetryWorker,
    StoreUnavailable,
    open_store,
)
from retrybus._cli.app import app
from retrybus._groups import failure_group_key
from retrybus._stores import postgresql
from retrybus._stores import sqlite as sqlite_store
from retrybus._stores.postgresql import SCHEMA_VERSION, PostgresStore
from retrybus._stores.postgresql import migrate as postgresql_migrate


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with fresh_schema() as name:
        yield name


@pytest.fixture
def url(schema: str) -> str:
    return url_with_schema(schema)


async def raw_connection() -> asyncpg.Connection:
    return await asyncpg.connect(PostgresStore.from_url(URL)._dsn)


# migration -------------------------------------------------------------------


async def test_the_migration_is_versioned_and_idempotent(url: str, schema: str) -> None:
    for _ in range(2):
        async with open_store(url) as store:
            assert isinstance(store, PostgresStore)
            assert await store.migrate() == SCHEMA_VERSION
    conn = await raw_connection()
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema}".retrybus_schema_version')
    finally:
        await conn.close()
    assert [row["version"] for row in rows] == list(range(1, SCHEMA_VERSION + 1))


async def create_version_1(schema: str) -> asyncpg.Connection:
    """A connection to ``schema`` holding the tables of schema version 1, as a
    retrybus before failure groups created them."""
    conn = await raw_connection()
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(f'SET search_path = "{schema}"')
    await conn.execute(postgresql.Q["version_table"])
    await conn.execute(postgresql.Q["schema_v1"])  # kept as version 1 had it
    await conn.execute(postgresql.Q["record_version"], 1)
    return conn


async def insert_version_1_dead_letter(
    conn: asyncpg.Connection, n: int, handler: str, error_type: str, error: str
) -> str:
    """A dead letter as version 1 wrote it: no failure_group column."""
    item_id = f"dlq_v1_{n:03d}"
    await conn.execute(
        "INSERT INTO dead_letter_queue (id, event_id, event_type, event_data, event_source,"
        " event_timestamp, handler_name, error, error_type, attempt, reason, created_at)"
        " VALUES ($1, $2, 'like.added', '{\"n\": 1}', 'svc', $3, $4, $5, $6, 3,"
        " 'failed after 3 retries', $3)",
        item_id,
        f"event-{n}",
        datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=n),
        handler,
        error,
        error_type,
    )
    return item_id


async def test_a_version_1_schema_is_migrated_and_its_dead_letters_get_failure_groups(
    url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgresql_migrate, "FILL_BATCH", 2)  # several batches of the back-fill
    conn = await create_version_1(schema)
    try:
        refused = [
            await insert_version_1_dead_letter(
                conn, n, "Mailer", "ConnectionError", f"smtp 10.0.0.{n}:25 refused"
            )
            for n in range(5)
        ]
        other = await insert_version_1_dead_letter(conn, 9, "Mailer", "KeyError", "'user 7'")
    finally:
        await conn.close()

    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        assert await store.schema_version() == SCHEMA_VERSION == 8
        key = failure_group_key("Mailer", "ConnectionError", "smtp 10.0.0.1:25 refused")
        groups = await store.group_dead("failure_group", DeadLetterFilter(), limit=10)
        assert [(g.key, g.count, g.sample_id) for g in groups] == [
            (key, 5, refused[-1]),
            (failure_group_key("Mailer", "KeyError", "'user 1'"), 1, other),
        ]
        listed = await store.list_dead(DeadLetterFilter(failure_group=key), limit=10, offset=0)
        assert [item.id for item in listed] == refused[::-1]
        assert all(item.failure_group == key for item in listed)
        assert await store.count_dead(DeadLetterFilter(failure_group=key, event_id="event-3")) == 1
    conn = await raw_connection()
    try:
        stored = await conn.fetch(
            f'SELECT id, failure_group FROM "{schema}".dead_letter_queue ORDER BY id'
        )
        versions = await conn.fetch(f'SELECT version FROM "{schema}".retrybus_schema_version')
        metadata_types = await conn.fetch(
            "SELECT table_name, data_type FROM information_schema.columns "
            "WHERE table_schema = $1 AND column_name = 'metadata'",
            schema,
        )
    finally:
        await conn.close()
    assert {row["id"]: row["failure_group"] for row in stored} == {
        **dict.fromkeys(refused, key),
        other: failure_group_key("Mailer", "KeyError", "'x'"),
    }
    assert sorted(row["version"] for row in versions) == list(range(1, SCHEMA_VERSION + 1))
    # version 3: metadata is json, as event_data is (jsonb refuses "\u0000")
    assert {row["table_name"]: row["data_type"] for row in metadata_types} == {
        "retry_queue": "json",
        "dead_letter_queue": "json",
    }


async def test_dead_letters_an_older_retrybus_writes_after_the_migration_are_grouped(
    url: str, schema: str
) -> None:
    async with open_store(url) as store:
        bus = EventBus(store)
        item = await bus.retry_queue.add(Event("x"), "Mailer", ConnectionError("refused"))
        current = await bus.retry_queue.mark_failed(item)
        assert current is not None
        conn = await raw_connection()
        try:
            await conn.execute(f'SET search_path = "{schema}"')
            # what a process still running version 1 writes: no failure group
            old = await insert_version_1_dead_letter(conn, 1, "Mailer", "ConnectionError", "x")
        finally:
            await conn.close()
        old_key = failure_group_key("Mailer", "ConnectionError", "x")
        listed = await store.list_dead(DeadLetterFilter(failure_group=old_key), limit=10, offset=0)
        assert [d.id for d in listed] == [old]
        groups = await store.group_dead("failure_group", DeadLetterFilter(), limit=10)
        assert sorted((g.key, g.count) for g in groups) == sorted(
            [(current.failure_group, 1), (old_key, 1)]
        )


async def test_several_stores_migrating_one_schema_at_once_agree(url: str, schema: str) -> None:
    stores = [open_store(url) for _ in range(6)]
    try:
        await asyncio.gather(*(store.connect() for store in stores))
        bus = EventBus(stores[0])
        await bus.retry_queue.add(Event("x"), "h", "e")
        assert [await store.retry_count() for store in stores] == [1] * 6
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    conn = await raw_connection()
    try:
        versions = await conn.fetchval(f'SELECT count(*) FROM "{schema}".retrybus_schema_version')
    finally:
        await conn.close()
    assert versions == SCHEMA_VERSION


async def test_the_tables_and_indexes_follow_the_seed(url: str, schema: str) -> None:
    async with open_store(url) as store:
        await store.health()
    conn = await raw_connection()
    try:
        tables = {
            row["tablename"]
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
            )
        }
        indexes = {
            row["indexname"]
            for row in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = $1", schema
            )
        }
        types = {
            (row["table_name"], row["column_name"]): row["data_type"]
            for row in await conn.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = $1",
                schema,
            )
        }
    finally:
        await conn.close()
    assert {
        "retry_queue",
        "dead_letter_queue",
        "retrybus_counters",
        "retrybus_schema_version",
        "retrybus_control",
        "retrybus_subscriptions",
        "retrybus_revisions",
        "retrybus_workers",
    } <= tables
    assert {
        "retry_queue_handler_name",
        "retry_queue_next_retry_attempt",
        "retry_queue_created_at",
        "dead_letter_queue_created_at",
        "dead_letter_queue_processed",
        "dead_letter_queue_event_type",
        "dead_letter_queue_failure_group",
        "dead_letter_queue_event_id",
        "dead_letter_queue_service",
        "retrybus_subscriptions_pkey",
        "retrybus_subscriptions_revision",
        "retrybus_workers_pkey",
        "retrybus_workers_service",
    } <= indexes
    # version 5 dropped these: the (next_retry, attempt) index serves what the
    # first served, and with no index of leases claims are HOT updates
    assert not {"retry_queue_next_retry", "retry_queue_leased"} & indexes
    assert types["retry_queue", "next_retry"] == "timestamp with time zone"
    assert types["retry_queue", "event_extensions"] == "jsonb"
    assert types["dead_letter_queue", "metadata"] == "json"
    assert types["dead_letter_queue", "processed"] == "boolean"
    assert types["retry_queue", "attempt"] == "integer"
    assert types["dead_letter_queue", "failure_group"] == "text"
    assert types["retrybus_control", "value"] == "json"
    # version 6: services
    assert types["retry_queue", "service"] == types["dead_letter_queue", "service"] == "text"
    assert types["retrybus_subscriptions", "patterns"] == "json"
    assert types["retrybus_subscriptions", "removed_at"] == "timestamp with time zone"
    assert types["retrybus_revisions", "revision"] == "bigint"
    assert types["retrybus_workers", "last_seen"] == "timestamp with time zone"


async def test_newest_first_paging_and_group_filters_can_use_an_index(
    url: str, schema: str
) -> None:
    async with open_store(url) as store:
        await store.health()
    conn = await raw_connection()
    try:
        await conn.execute(f'SET search_path = "{schema}"')
        await conn.execute("SET enable_seqscan = off")  # a tiny table: ask what it could do
        await conn.execute("SET plan_cache_mode = force_custom_plan")
        page = await conn.fetch(f"EXPLAIN {postgresql.Q['list_dead']}", *[None] * 11, 50, 100)
        grouped = await conn.fetch(
            f"EXPLAIN {postgresql.Q['list_dead']}",
            *[None] * 7,
            "grp_0123456789abcdef",
            None,
            None,
            None,
            50,
            0,
        )
        # a service's dead letters, newest first (the dashboard's and the CLI's
        # --filter service=X), the second page from a cursor
        by_service = await conn.fetch(
            f"EXPLAIN {postgresql.Q['list_dead']}",
            *[None] * 8,
            datetime(2026, 1, 1, tzinfo=UTC),
            "dlq_x",
            "billing",
            50,
            0,
        )
    finally:
        await conn.close()
    page_plan = "\n".join(row[0] for row in page)
    group_plan = "\n".join(row[0] for row in grouped)
    service_plan = "\n".join(row[0] for row in by_service)
    assert "dead_letter_queue_created_at" in page_plan, page_plan
    assert "dead_letter_queue_failure_group" in group_plan, group_plan
    assert "dead_letter_queue_service" in service_plan, service_plan
    assert "Sort" not in page_plan + group_plan + service_plan, (
        page_plan,
        group_plan,
        service_plan,
    )


async def test_the_migrate_command_creates_the_tables_and_prints_the_version(
    url: str, schema: str, tmp_path: Path
) -> None:
    runner = CliRunner()

    def migrate(*args: str) -> Result:
        return runner.invoke(app, ["migrate", "--store", *args])

    # the command runs its own event loop: in a thread, away from this test's loop
    result = await asyncio.to_thread(migrate, url)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{url}: schema version {SCHEMA_VERSION}"
    result = await asyncio.to_thread(migrate, url, "--json")
    assert result.exit_code == 0, result.output
    assert f'"schema_version": {SCHEMA_VERSION}' in result.stdout
    async with open_store(url) as store:
        assert await store.retry_count() == 0
    sqlite = f"sqlite:///{tmp_path / 'm.db'}"
    result = await asyncio.to_thread(migrate, sqlite)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{sqlite}: schema version {sqlite_store.SCHEMA_VERSION}"
    assert (tmp_path / "m.db").exists()


def test_the_migrate_command_reports_an_unreachable_server_in_one_line() -> None:
    result = CliRunner().invoke(
        app, ["migrate", "--store", "postgresql://me:s3cret@127.0.0.1:1/test"]
    )
    assert result.exit_code == 1
    assert "s3cret" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "postgresql://me:***@127.0.0.1:1/test" in lines[0]


# LISTEN/NOTIFY -------------------------------------------------------------------


async def test_an_idle_worker_wakes_at_once_when_another_store_adds_an_item(url: str) -> None:
    handled = asyncio.Event()
    async with open_store(url) as worker_store, open_store(url) as publisher_store:
        worker_bus = EventBus(worker_store, default_policy=FixedDelay(delay=0))
        worker_bus.subscribe("x", lambda event: handled.set(), name="h")
        publisher = EventBus(publisher_store, default_policy=FixedDelay(delay=0))
        async with RetryWorker(worker_bus, check_interval=30):
            await asyncio.sleep(0.3)  # the worker found nothing and sleeps for 30 s
            started = time.monotonic()
            await publisher.retry_queue.add(Event("x"), "h", "failed elsewhere")
            await asyncio.wait_for(handled.wait(), 1.0)
            assert time.monotonic() - started < 1.0
        assert await publisher.retry_queue.count() == 0


async def test_watching_survives_a_lost_connection(url: str, schema: str) -> None:
    woken = asyncio.Event()
    store = PostgresStore.from_url(f"{url}&application_name={schema[:50]}")
    async with store, open_store(url) as other:
        stop = await store.watch(woken.set)
        assert stop is not None
        conn = await raw_connection()
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1",
                schema[:50],
            )
        finally:
            await conn.close()
        assert killed >= 1
        # the pool's connection was killed too: a call may fail (StoreUnavailable, never
        # an asyncpg error), and the pool reconnects
        outcomes: list[int | str] = []
        for _ in range(3):
            try:
                outcomes.append(await store.retry_count())
            except StoreUnavailable as exc:
                outcomes.append(str(exc))
        assert outcomes[-1] == 0
        assert all(o == 0 or "PostgreSQL store" in str(o) for o in outcomes), outcomes
        await asyncio.sleep(0.8)  # the listener reconnects (and wakes the worker once)
        woken.clear()
        await EventBus(other).retry_queue.add(Event("x"), "h", "e")
        await asyncio.wait_for(woken.wait(), 2.0)
        await stop()


async def test_synchronous_commit_is_a_url_option(url: str) -> None:
    async with open_store(f"{url}&synchronous_commit=off") as store:
        assert isinstance(store, PostgresStore)
        assert await store._run(lambda conn: conn.fetchval("SHOW synchronous_commit")) == "off"
        await EventBus(store).retry_queue.add(Event("x"), "h", "e")
    async with open_store(url) as store:
        assert await store.retry_count() == 1
