"""What only the SQLite store has to show about services (issue 12): the upgrade of a
version 4 file (its records read as the default service's, a version 4 process
writing on), claims and next_due of one service straight from the handler index
whatever another service has waiting, dead letters of a service from their index,
and the services' writes each one transaction (the behaviour itself:
tests/test_conformance_services.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from retrybus import (
    DeadLetterFilter,
    Event,
    RetryItem,
    Store,
    failure_group_key,
    open_store,
)
from retrybus._outcomes import Counters
from retrybus._records import DeadLetterItem, ErrorInfo
from retrybus._services import StoredSubscription
from retrybus._stores.sqlite import SCHEMA_VERSION, SQLiteStore
from retrybus._stores.sqlite.codec import CODEC
from retrybus._stores.sqlite.sql import Q, dead_where
from test_sqlite_pending import claim_sql, next_due_sql, vm_steps

START = datetime(2025, 1, 7, 10, 0, 0, 123456, tzinfo=UTC)

# The upgrade from version 4 -------------------------------------------------------

# The schema of version 4, as retrybus created it up to commit e69e57c
# (`git show e69e57c:src/retrybus/_stores/sqlite/queries.sql`): no service columns,
# the handler index on (handler_name, next_retry), an index on next_retry alone, no
# subscriptions or workers.
SCHEMA_V4 = """
CREATE TABLE retry_queue (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    event_data       TEXT NOT NULL,
    event_source     TEXT NOT NULL,
    event_timestamp  TEXT NOT NULL,
    event_subject    TEXT,
    event_extensions TEXT NOT NULL DEFAULT '{}',
    handler_name     TEXT NOT NULL,
    error            TEXT NOT NULL DEFAULT '',
    error_type       TEXT NOT NULL DEFAULT '',
    traceback        TEXT NOT NULL DEFAULT '',
    attempt          INTEGER NOT NULL,
    max_retries      INTEGER NOT NULL,
    next_retry       TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    lease_owner      TEXT,
    lease_until      TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    claims           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX retry_queue_next_retry ON retry_queue (next_retry);
CREATE INDEX retry_queue_handler_name ON retry_queue (handler_name, next_retry);
CREATE INDEX retry_queue_next_retry_attempt ON retry_queue (next_retry, attempt);
CREATE INDEX retry_queue_created_at ON retry_queue (created_at);
CREATE INDEX retry_queue_lease_until ON retry_queue (lease_until) WHERE lease_until IS NOT NULL;

CREATE TABLE dead_letter_queue (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    event_data       TEXT NOT NULL,
    event_source     TEXT NOT NULL,
    event_timestamp  TEXT NOT NULL,
    event_subject    TEXT,
    event_extensions TEXT NOT NULL DEFAULT '{}',
    handler_name     TEXT NOT NULL,
    error            TEXT NOT NULL DEFAULT '',
    error_type       TEXT NOT NULL DEFAULT '',
    traceback        TEXT NOT NULL DEFAULT '',
    attempt          INTEGER NOT NULL,
    max_retries      INTEGER NOT NULL DEFAULT 0,
    reason           TEXT NOT NULL,
    processed        INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL,
    processed_at     TEXT,
    first_failed_at  TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    failure_group    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX dead_letter_queue_created_at ON dead_letter_queue (created_at DESC, id DESC);
CREATE INDEX dead_letter_queue_processed ON dead_letter_queue (processed);
CREATE INDEX dead_letter_queue_event_type ON dead_letter_queue (event_type);
CREATE INDEX dead_letter_queue_handler_name ON dead_letter_queue (handler_name);
CREATE INDEX dead_letter_queue_event_id ON dead_letter_queue (event_id);
CREATE INDEX dead_letter_queue_failure_group
    ON dead_letter_queue (failure_group, created_at DESC, id DESC);

CREATE TABLE retrybus_control (
    key     TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    value   TEXT NOT NULL
);

CREATE TABLE retrybus_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO retrybus_counters (name, value) VALUES
    ('retry_added', 5), ('retry_succeeded', 2), ('retry_succeeded_attempts', 3),
    ('retry_dead_lettered', 1);
PRAGMA user_version = 4;
"""


def _insert_v4(table: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What a version 4 process wrote: every column of the record but service."""
    columns = [name for name in fields if name != "service"]
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join(':' + name for name in columns)})"
    )
    return sql, {name: fields[name] for name in columns}


def write_v4(path: Path, retry_items: list[RetryItem], dead_letters: list[DeadLetterItem]) -> None:
    conn = sqlite3.connect(path)
    for item in retry_items:
        conn.execute(*_insert_v4("retry_queue", CODEC.retry_fields(item)))
    for dead in dead_letters:
        conn.execute(*_insert_v4("dead_letter_queue", CODEC.dead_letter_fields(dead)))
    conn.commit()
    conn.close()


def event(n: int) -> Event:
    return Event("order.placed", {"n": n}, source="shop", id=f"event-{n}", time=START)


def v4_records() -> tuple[list[RetryItem], list[DeadLetterItem]]:
    """Records of each kind, as a version 4 process made them (the default service)."""
    now = START
    scheduled = RetryItem.pending(
        event(1), "mailer", max_retries=3, due=now + timedelta(hours=1), now=now
    )
    leased = RetryItem.pending(
        event(2),
        "mailer",
        max_retries=3,
        due=now,
        now=now,
        lease_owner="publisher",
        lease_until=now + timedelta(seconds=60),
    )
    failed = RetryItem.for_failure(
        event(3),
        "billing",
        ErrorInfo("order 3 not found", "KeyError", "Traceback ..."),
        attempt=2,
        max_retries=5,
        next_retry=now - timedelta(seconds=5),
        now=now,
    )
    letters = [
        DeadLetterItem.for_failure(
            event(n),
            "billing",
            ErrorInfo(f"order {n} not found", "KeyError"),
            reason="failed after 5 retries",
            attempt=5,
            max_retries=5,
            now=now + timedelta(seconds=n),
        )
        for n in (4, 5)
    ]
    letters[1] = replace(letters[1], processed=True, processed_at=now + timedelta(minutes=1))
    return [scheduled, leased, failed], letters


def index_columns(conn: sqlite3.Connection, index: str) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM pragma_index_info(?)", (index,))]


def create_v4_database(path: Path) -> tuple[list[RetryItem], list[DeadLetterItem]]:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V4)
    conn.close()
    items, letters = v4_records()
    write_v4(path, items, letters)
    return items, letters


async def test_a_version_4_database_reads_every_record_back_as_the_default_services(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    items, letters = create_v4_database(path)
    scheduled, leased, failed = items
    now = START
    async with open_store(f"sqlite:///{path}") as store:
        for item in items:
            assert (await store.get_retry(item.id)) == item
            assert item.service == "default"
        for letter in letters:
            assert (await store.get_dead(letter.id)) == letter
        # their failure groups, stored by version 4, are the default service's
        assert letters[0].failure_group == failure_group_key(
            "billing", "KeyError", "order 4 not found"
        )
        assert await store.count_dead(DeadLetterFilter(failure_group=letters[0].failure_group)) == 2
        assert await store.counters() == Counters(5, 2, 3, 1)  # the totals are kept
        ids = {item.id for item in items}
        assert {i.id for i in await store.list_retry(limit=10, offset=0, service="default")} == ids
        assert await store.list_retry(limit=10, offset=0, service="billing") == []
        assert await store.count_dead(DeadLetterFilter(service="default")) == 2
        assert await store.count_dead(DeadLetterFilter(service="billing")) == 0
        (group,) = await store.group_dead("service", DeadLetterFilter(), limit=10)
        assert (group.key, group.count, group.sample_id) == ("default", 2, letters[1].id)
        # the rebuilt handler index serves the old rows, by service
        assert await store.next_due(["billing"], service="default") == failed.next_retry
        assert await store.next_due(["billing"], service="billing") is None
        claimed = await store.claim_due(
            now=now,
            limit=10,
            owner="w",
            lease_until=now + timedelta(seconds=30),
            service="default",
            handlers=["billing", "mailer"],
        )
        assert [c.id for c in claimed] == [failed.id]  # the scheduled one is not due yet
        assert [load.handler_name for load in await store.service_loads(now)] == [
            "billing",
            "mailer",
        ]
        # a process still at version 4 goes on writing, without the column
        late = RetryItem.pending(event(9), "mailer", max_retries=3, due=now, now=now)
        write_v4(path, [late], [])
        assert (await store.get_retry(late.id)) == late
        assert {i.id for i in await store.list_retry(limit=10, offset=0, service="default")} == {
            *ids,
            late.id,
        }
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    for table in ("retry_queue", "dead_letter_queue"):
        columns = conn.execute(f"PRAGMA table_info({table})").fetchall()
        # (name, default) of the last column of version 5 (the ordering columns follow)
        service = next(column for column in columns if column[1] == "service")
        assert service[4] == "'default'"
        names = [column[1] for column in columns]
        assert names[names.index("service") + 1 :] in ([], ["ordering_key", "ordering_sequence"])
    assert index_columns(conn, "retry_queue_handler_name") == [
        "service",
        "handler_name",
        "next_retry",
    ]
    assert index_columns(conn, "dead_letter_queue_service") == ["service", "created_at", "id"]
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "retry_queue_next_retry" not in names
    assert {"retrybus_subscriptions", "retrybus_workers"} <= names
    assert leased.lease_owner == "publisher"
    assert scheduled.next_retry > now
    conn.close()


async def test_two_processes_may_upgrade_a_version_4_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    items, _ = create_v4_database(path)
    url = f"sqlite:///{path}"
    first, second = open_store(url), open_store(url)
    await asyncio.gather(first.connect(), second.connect())
    try:
        for store in (first, second):
            assert await store.schema_version() == SCHEMA_VERSION
            assert (await store.get_retry(items[0].id)) == items[0]
            assert await store.subscriptions_revision() == 0
    finally:
        await first.close()
        await second.close()


# One service's claims, whatever the others have -------------------------------------


def pending(n: int, handler: str, service: str, *, due_in: float) -> RetryItem:
    return RetryItem.pending(
        event(n),
        handler,
        max_retries=3,
        due=START + timedelta(seconds=due_in),
        now=START,
        service=service,
    )


async def fill(store: Store, service: str, count: int, *, first: int) -> None:
    """``count`` due items of handler "mine" of ``service``, all due an hour before now."""
    items = [pending(first + n, "mine", service, due_in=-3600 + n * 0.001) for n in range(count)]
    for start in range(0, count, 1000):
        await store.record_pending(items[start : start + 1000])


async def test_another_services_backlog_of_the_same_handler_is_never_read(
    tmp_path: Path,
) -> None:
    """A stopped service's backlog (billing's 5,000 items of handler "mine", all due
    before the default service's) does not grow the work of the default service's
    claims or next_due."""
    quiet, busy = tmp_path / "quiet.db", tmp_path / "busy.db"
    for path, others in ((quiet, 0), (busy, 5000)):
        async with open_store(f"sqlite:///{path}") as store:
            await fill(store, "billing", others, first=0)
            await fill(store, "default", 10, first=100_000)
    now = START
    for handlers in (["mine"], ["mine", "other"]):
        for sql, params in (
            claim_sql(handlers, now, service="default"),
            next_due_sql(handlers, "default"),
        ):
            steps = vm_steps(busy, sql, params)
            assert steps < 1.2 * vm_steps(quiet, sql, params) + 50, (handlers, sql)
    async with open_store(f"sqlite:///{busy}") as store:
        claimed = await store.claim_due(
            now=now,
            limit=10,
            owner="w",
            lease_until=now + timedelta(seconds=30),
            service="default",
            handlers=["mine"],
        )
        assert {c.service for c in claimed if isinstance(c, RetryItem)} == {"default"}
        assert len(claimed) == 10


async def test_a_services_dead_letters_are_a_seek_in_their_index(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    conn = sqlite3.connect(path)
    cursor = (datetime(2026, 1, 1, tzinfo=UTC), "dlq_x")
    for where in (
        DeadLetterFilter(service="billing"),
        DeadLetterFilter(service="billing", cursor=cursor),
    ):
        condition, params = dead_where(where)
        for sql, extra in (
            (Q["list_dead"].format(where=condition), {"limit": 10, "offset": 0}),
            (Q["count_dead"].format(where=condition), {}),
        ):
            plan = " ".join(
                str(row[-1])
                for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", {**params, **extra})
            )
            assert "dead_letter_queue_service (service=?" in plan, plan
            assert "TEMP B-TREE" not in plan  # newest first: the index's order
    conn.close()


# One transaction each ---------------------------------------------------------------


def terms(handler: str) -> StoredSubscription:
    return StoredSubscription(
        service="billing",
        handler_name=handler,
        patterns=("order.*",),
        policy="FixedDelay(delay=1)",
        max_retries=3,
        registered_at=START,
        updated_at=START,
    )


async def test_service_writes_are_one_transaction_each_and_the_sweep_reads_first(
    tmp_path: Path,
) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        assert isinstance(store, SQLiteStore)
        items = [pending(n, "charge", "billing", due_in=-n) for n in range(5)]
        await store.record_pending(items)
        statements: list[str] = []
        conn = store._conn
        assert conn is not None
        conn.set_trace_callback(statements.append)

        def writes() -> int:
            begun = statements.count("BEGIN IMMEDIATE")
            assert statements.count("COMMIT") == begun
            statements.clear()
            return begun

        # no tombstone: one read, no write
        assert await store.dead_letter_unsubscribed(now=START, limit=10) == []
        assert writes() == 0
        registration = await store.put_subscriptions(
            "billing", [terms("charge"), terms("refund")], prune=False, now=START, actor="w"
        )
        assert registration.added == ("charge", "refund")
        assert writes() == 1
        assert await store.remove_subscriptions("billing", None, now=START, actor="alice") == [
            "charge",
            "refund",
        ]
        assert writes() == 1
        moved = await store.dead_letter_unsubscribed(now=START, limit=3)
        assert [d.event_id for d in moved] == ["event-4", "event-3", "event-2"]
        assert writes() == 1
        # a claim of one service's handlers: one statement in its transaction
        claimed = await store.claim_due(
            now=START,
            limit=10,
            owner="w",
            lease_until=START + timedelta(seconds=30),
            service="billing",
            handlers=["charge"],
        )
        assert len(claimed) == 2
        assert len(statements) == 3  # BEGIN IMMEDIATE, the UPDATE … RETURNING, COMMIT
        assert writes() == 1
        conn.set_trace_callback(None)
