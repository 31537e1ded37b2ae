"""What only the SQLite store has to show: WAL, its tables and indexes, upgrades.

Reopening a file, damaged rows, two stores on one file, bad URLs and a file that
cannot be opened: tests/test_conformance_engines.py, for every engine.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    ManualClock,
    failure_group_key,
    open_store,
)
from retrybus._stores.sqlite import SCHEMA_VERSION
from retrybus._stores.sqlite.sql import Q, dead_where


async def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_the_tables_and_indexes_follow_the_seed(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    conn = sqlite3.connect(path)
    indexes = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
    }
    assert {
        "retry_queue_handler_name",
        "retry_queue_next_retry_attempt",
        "retry_queue_created_at",
        "dead_letter_queue_created_at",
        "dead_letter_queue_processed",
        "dead_letter_queue_event_type",
        "dead_letter_queue_failure_group",
        "dead_letter_queue_service",
        "retrybus_subscriptions_removed",
    } <= indexes
    # version 5 dropped it: retry_queue_next_retry_attempt serves what it did
    assert "retry_queue_next_retry" not in indexes
    assert index_columns(conn, "retry_queue_handler_name") == [
        "service",
        "handler_name",
        "next_retry",
    ]
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"retrybus_subscriptions", "retrybus_workers"} <= tables
    conn.close()


# The schema of version 1 (before failure groups and control records), as
# retrybus created it up to commit 1f74f2c (`git show 1f74f2c:src/retrybus/_stores/sqlite.sql`).
SCHEMA_V1 = """
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
    metadata         TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX retry_queue_next_retry ON retry_queue (next_retry);
CREATE INDEX retry_queue_handler_name ON retry_queue (handler_name);
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
    metadata         TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX dead_letter_queue_created_at ON dead_letter_queue (created_at DESC);
CREATE INDEX dead_letter_queue_processed ON dead_letter_queue (processed);
CREATE INDEX dead_letter_queue_event_type ON dead_letter_queue (event_type);
CREATE INDEX dead_letter_queue_handler_name ON dead_letter_queue (handler_name);

CREATE TABLE retrybus_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO retrybus_counters (name, value) VALUES
    ('retry_added', 7), ('retry_succeeded', 0), ('retry_succeeded_attempts', 0),
    ('retry_dead_lettered', 7);
PRAGMA user_version = 1;
"""

# what a version 1 process wrote: no failure_group column
INSERT_DEAD_V1 = (
    "INSERT INTO dead_letter_queue (id, event_id, event_type, event_data, event_source,"
    " event_timestamp, handler_name, error, error_type, attempt, reason, created_at)"
    " VALUES (?, ?, 'order.placed', '{\"n\": 1}', 'svc', ?, ?, ?, ?, 3,"
    " 'failed after 3 retries', ?)"
)


def index_columns(conn: sqlite3.Connection, index: str) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM pragma_index_info(?)", (index,))]


def write_v1_dead_letters(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """Dead letters ``(id, handler, error, error_type)`` written as version 1 did, a
    second apart, the first oldest."""
    conn = sqlite3.connect(path)
    for n, (item_id, handler, error, error_type) in enumerate(rows):
        at = f"2025-01-07T10:{n // 60:02d}:{n % 60:02d}.000000+00:00"
        conn.execute(INSERT_DEAD_V1, (item_id, f"e{n}", at, handler, error, error_type, at))
    conn.commit()
    conn.close()


def create_v1_database(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V1)
    conn.close()
    write_v1_dead_letters(path, rows)


async def test_a_version_1_database_is_upgraded_and_its_dead_letters_grouped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    create_v1_database(
        path,
        [
            ("dlq_a1", "Mailer", "order 17 not found", "KeyError"),
            ("dlq_a2", "Mailer", "order 8812 not found", "KeyError"),
            ("dlq_b", "Mailer", "order 17 not found", "ValueError"),
            ("dlq_a3", "Mailer", "order 5 not found", "KeyError"),
        ],
    )
    a = failure_group_key("Mailer", "KeyError", "order 1 not found")
    b = failure_group_key("Mailer", "ValueError", "order 1 not found")
    async with open_store(f"sqlite:///{path}") as store:
        groups = await store.group_dead("failure_group", DeadLetterFilter(), limit=10)
        assert [(g.key, g.count, g.sample_id) for g in groups] == [
            (a, 3, "dlq_a3"),
            (b, 1, "dlq_b"),
        ]
        members = await store.list_dead(DeadLetterFilter(failure_group=a), limit=10, offset=0)
        assert [d.id for d in members] == ["dlq_a3", "dlq_a2", "dlq_a1"]
        assert all(d.failure_group == a for d in members)
        assert await store.count_dead(DeadLetterFilter(failure_group=b)) == 1
        assert (await store.counters()).retry_dead_lettered == 7  # the old rows are kept
        assert await store.put_control("k", {"n": 1}, version=0) == 1  # the new table
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    assert index_columns(conn, "dead_letter_queue_failure_group") == [
        "failure_group",
        "created_at",
        "id",
    ]
    assert index_columns(conn, "dead_letter_queue_created_at") == ["created_at", "id"]
    assert (
        conn.execute("SELECT COUNT(*) FROM dead_letter_queue WHERE failure_group = ''").fetchone()[
            0
        ]
        == 0
    )
    conn.close()


async def test_the_back_fill_of_many_rows_runs_in_batches_and_two_processes_may_share_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    rows = [
        (f"dlq_{n:05d}", f"H{n % 3}", f"timeout after {n} ms", "TimeoutError") for n in range(1234)
    ]
    create_v1_database(path, rows)
    url = f"sqlite:///{path}"
    first, second = open_store(url), open_store(url)
    await asyncio.gather(first.connect(), second.connect())  # both upgrade at once
    try:
        for store in (first, second):
            groups = await store.group_dead("failure_group", DeadLetterFilter(), limit=10)
            assert sorted(g.count for g in groups) == [411, 411, 412]
            assert await store.count_dead(DeadLetterFilter()) == 1234
    finally:
        await first.close()
        await second.close()


async def test_dead_letters_written_by_a_version_1_process_get_their_group_on_the_next_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.db"
    url = f"sqlite:///{path}"
    async with open_store(url) as store:
        await store.health()
    # a process not yet upgraded goes on writing, without the column
    write_v1_dead_letters(path, [("dlq_late", "Mailer", "order 3 not found", "KeyError")])
    async with open_store(url) as store:
        key = failure_group_key("Mailer", "KeyError", "order 3 not found")
        listed = await store.list_dead(DeadLetterFilter(failure_group=key), limit=10, offset=0)
        assert [d.id for d in listed] == ["dlq_late"]


async def test_reprocessing_rewrites_the_stored_failure_group(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        bus = EventBus(store, clock=clock)
        item = await bus.retry_queue.add(Event("x", {}), "h", TimeoutError("slow"))
        dead = await bus.retry_queue.mark_failed(item)
        assert dead is not None

        def handler(event: Event) -> None:
            raise PermissionError("token expired")

        bus.subscribe("x", handler, name="h")
        after = await bus.dead_letters.reprocess(dead.id)
    stored = sqlite3.connect(path).execute(
        "SELECT failure_group FROM dead_letter_queue WHERE id = ?", (dead.id,)
    )
    assert stored.fetchone()[0] == after.failure_group != dead.failure_group


async def test_dead_letter_filters_use_indexes(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    conn = sqlite3.connect(path)
    for where, index in [
        (DeadLetterFilter(failure_group="grp_x"), "dead_letter_queue_failure_group"),
        (DeadLetterFilter(event_id="e1"), "dead_letter_queue_event_id"),
        (DeadLetterFilter(handler_name="h"), "dead_letter_queue_handler_name"),
        (DeadLetterFilter(event_type="t"), "dead_letter_queue_event_type"),
    ]:
        condition, params = dead_where(where)
        sql = Q["list_dead"].format(where=condition)
        plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}", {**params, "limit": 10, "offset": 0})
        assert index in " ".join(str(row[-1]) for row in plan)
    conn.close()


# What version 2 (failure groups, control records; up to commit 271581e) added to
# version 1: its newest-first indexes end at created_at.
SCHEMA_V2_CHANGES = """
ALTER TABLE dead_letter_queue ADD COLUMN failure_group TEXT NOT NULL DEFAULT '';
CREATE INDEX dead_letter_queue_event_id ON dead_letter_queue (event_id);
CREATE INDEX dead_letter_queue_failure_group ON dead_letter_queue (failure_group, created_at);
CREATE TABLE retrybus_control (
    key     TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    value   TEXT NOT NULL
);
PRAGMA user_version = 2;
"""


async def test_a_version_2_database_gets_the_newest_first_indexes_with_the_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    create_v1_database(
        path,
        [("dlq_1", "Mailer", "order 1 not found", "KeyError")]
        + [(f"dlq_{n}", "Mailer", "slow", "TimeoutError") for n in range(2, 5)],
    )
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V2_CHANGES)
    conn.execute("UPDATE dead_letter_queue SET created_at = '2025-01-07T10:00:00.000000+00:00'")
    for item_id, handler, error_type, error in conn.execute(
        "SELECT id, handler_name, error_type, error FROM dead_letter_queue"
    ).fetchall():
        conn.execute(
            "UPDATE dead_letter_queue SET failure_group = ? WHERE id = ?",
            (failure_group_key(handler, error_type, error), item_id),
        )
    conn.commit()
    conn.close()
    async with open_store(f"sqlite:///{path}") as store:
        first = await store.list_dead(DeadLetterFilter(), limit=2, offset=0)
        assert [d.id for d in first] == ["dlq_4", "dlq_3"]
        cursor = (first[-1].created_at, first[-1].id)
        rest = await store.list_dead(DeadLetterFilter(cursor=cursor), limit=10, offset=0)
        assert [d.id for d in rest] == ["dlq_2", "dlq_1"]
        slow = failure_group_key("Mailer", "TimeoutError", "slow")
        assert await store.count_dead(DeadLetterFilter(failure_group=slow, cursor=cursor)) == 1
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert index_columns(conn, "dead_letter_queue_created_at") == ["created_at", "id"]
    assert index_columns(conn, "dead_letter_queue_failure_group") == [
        "failure_group",
        "created_at",
        "id",
    ]
    conn.close()


async def test_a_cursor_is_a_seek_in_the_newest_first_indexes(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    conn = sqlite3.connect(path)
    cursor = (datetime(2026, 1, 1, tzinfo=UTC), "dlq_x")
    for where, index in [
        (DeadLetterFilter(cursor=cursor), "dead_letter_queue_created_at"),
        (DeadLetterFilter(failure_group="grp_x", cursor=cursor), "dead_letter_queue_failure_group"),
    ]:
        condition, params = dead_where(where)
        sql = Q["list_dead"].format(where=condition)
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN {sql}", {**params, "limit": 10, "offset": 0}
            )
        )
        assert index in plan
        assert "(created_at,id)<(?,?)" in plan  # a seek, not a filter
        assert "TEMP B-TREE" not in plan  # the order is the index's
    conn.close()
