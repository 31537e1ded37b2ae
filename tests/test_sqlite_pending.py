"""What only the SQLite store has to show about pending deliveries: the upgrade of a
version 3 file (claims), claims by handler straight from an index, record_pending
in one transaction, and watch() waking an idle worker when another connection
or process commits."""

from __future__ import annotations

import asyncio
import resource
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from retrybus import (
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    RetryItem,
    RetryWorker,
    Store,
    open_store,
)
from retrybus._outcomes import Counters, Rescheduled, Succeeded
from retrybus._records import ErrorInfo, delivery_id
from retrybus._stores.sqlite import SCHEMA_VERSION
from retrybus._stores.sqlite.sql import MAX_HANDLER_ARMS, Q, handler_query

# the target of the issue: another process's commit wakes an idle worker within this
#: at once, compared with a check interval of 30 s (the figure is a benchmark's)
WAKE_TARGET = 1.0


def pending(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    *,
    owner: str | None = None,
    due_in: float = 0.0,
) -> RetryItem:
    """A first delivery not yet made, due in ``due_in`` seconds, leased to ``owner``."""
    now = clock.now()
    event = Event("x", {"n": n}, source="svc", id=f"e{n}", time=now)
    item = RetryItem.for_failure(
        event,
        handler,
        ErrorInfo("", ""),
        attempt=0,
        max_retries=3,
        next_retry=now + timedelta(seconds=due_in),
        now=now,
    )
    item = replace(item, id=delivery_id(event.source, event.id, handler))
    if owner is None:
        return item
    return replace(item, lease_owner=owner, lease_until=now + timedelta(seconds=60), claims=1)


async def claim(
    store: Store, clock: ManualClock, handlers: list[str] | None, limit: int = 10
) -> list[RetryItem]:
    now = clock.now()
    claimed = await store.claim_due(
        now=now, limit=limit, owner="w", lease_until=now + timedelta(seconds=30), handlers=handlers
    )
    items = [record for record in claimed if isinstance(record, RetryItem)]
    assert len(items) == len(claimed)
    return items


# The upgrade from version 3 -------------------------------------------------------

# The schema of version 3, as retrybus created it up to commit c934c41
# (`git show c934c41:src/retrybus/_stores/sqlite/queries.sql`): no claims column,
# the handler index on handler_name alone.
SCHEMA_V3 = """
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
PRAGMA user_version = 3;
"""

# what a version 3 process wrote: no claims column
INSERT_RETRY_V3 = (
    "INSERT INTO retry_queue (id, event_id, event_type, event_data, event_source,"
    " event_timestamp, event_subject, event_extensions, handler_name, error, error_type,"
    " traceback, attempt, max_retries, next_retry, created_at, updated_at, lease_owner,"
    " lease_until, metadata)"
    " VALUES (?, ?, 'order.placed', '{\"n\":1}', 'svc', '2025-01-07T09:00:00.000000+00:00',"
    " NULL, '{}', ?, 'boom', 'RuntimeError', '', 2, 5, ?, '2025-01-07T09:00:00.000000+00:00',"
    " '2025-01-07T09:00:00.000000+00:00', NULL, NULL, '{}')"
)
DUE = "2025-01-07T10:00:00.000000+00:00"


def index_columns(conn: sqlite3.Connection, index: str) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM pragma_index_info(?)", (index,))]


async def test_a_version_3_database_keeps_its_items_and_reads_them_with_claims_0(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V3)
    conn.execute(INSERT_RETRY_V3, ("retry_old1", "e1", "billing", DUE))
    conn.execute(INSERT_RETRY_V3, ("retry_old2", "e2", "mail", DUE))
    conn.commit()
    conn.close()
    clock = ManualClock(datetime(2025, 1, 7, 10, 0, 1, tzinfo=UTC))
    async with open_store(f"sqlite:///{path}") as store:
        old = await store.get_retry("retry_old1")
        assert old is not None
        assert (old.attempt, old.claims, old.handler_name, old.error) == (2, 0, "billing", "boom")
        assert await store.counters() == Counters(5, 2, 3, 1)  # the totals are kept
        # the new handler index serves the old rows
        assert await store.next_due(["mail"]) == datetime(2025, 1, 7, 10, tzinfo=UTC)
        (claimed,) = await claim(store, clock, ["billing"])
        assert (claimed.id, claimed.claims) == ("retry_old1", 1)
        assert await store.release([claimed.id], "w") == 1
        assert (await store.get_retry("retry_old1")).claims == 0  # type: ignore[union-attr]
        # a process still at version 3 goes on writing, without the column
        late = sqlite3.connect(path)
        late.execute(INSERT_RETRY_V3, ("retry_late", "e3", "billing", DUE))
        late.commit()
        late.close()
        got = await store.get_retry("retry_late")
        assert got is not None
        assert got.claims == 0
        assert await store.release(["retry_late"], "nobody") == 0
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    assert [row[1] for row in conn.execute("PRAGMA table_info(retry_queue)")][-4:] == [
        "claims",
        "service",
        "ordering_key",
        "ordering_sequence",
    ]
    assert index_columns(conn, "retry_queue_handler_name") == [
        "service",
        "handler_name",
        "next_retry",
    ]
    conn.close()


async def test_two_processes_may_upgrade_a_version_3_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V3)
    conn.execute(INSERT_RETRY_V3, ("retry_old1", "e1", "billing", DUE))
    conn.commit()
    conn.close()
    url = f"sqlite:///{path}"
    first, second = open_store(url), open_store(url)
    await asyncio.gather(first.connect(), second.connect())
    try:
        for store in (first, second):
            assert await store.schema_version() == SCHEMA_VERSION
            assert (await store.get_retry("retry_old1")).claims == 0  # type: ignore[union-attr]
    finally:
        await first.close()
        await second.close()


# Claims by handler -----------------------------------------------------------------


async def fill(store: Store, clock: ManualClock, others: int, mine: int) -> list[RetryItem]:
    """``others`` due items of handler "other", all due before ``mine`` of "mine"
    (returned, earliest first)."""
    ahead = [pending(clock, n, "other", due_in=-3600 + n * 0.001) for n in range(others)]
    own = [pending(clock, 100_000 + n, "mine", due_in=-60 + n) for n in range(mine)]
    for start in range(0, len(ahead), 1000):
        await store.record_pending(ahead[start : start + 1000])
    await store.record_pending(own)
    return own


def vm_steps(path: Path, sql: str, params: dict[str, Any]) -> int:
    """How many SQLite virtual machine instructions ``sql`` takes (rolled back)."""
    conn = sqlite3.connect(path, isolation_level=None)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    conn.execute("BEGIN")
    conn.execute(sql, params).fetchall()
    conn.execute("ROLLBACK")
    conn.close()
    return steps


def claim_sql(
    handlers: list[str], now: datetime, limit: int = 10, service: str | None = "default"
) -> tuple[str, dict[str, Any]]:
    """The claim of ``handlers`` of ``service`` (None: of any)."""
    params: dict[str, Any] = {
        "owner": "w",
        "lease_until": (now + timedelta(seconds=30)).isoformat(timespec="microseconds"),
        "now": now.isoformat(timespec="microseconds"),
        "limit": limit,
    }
    sql = handler_query(
        Q["claim_due_of_handlers"],
        Q["due_of_handler"],
        Q["due_of_many_handlers"],
        handlers,
        params,
        service,
    )
    return sql, params


def next_due_sql(
    handlers: list[str], service: str | None = "default"
) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {}
    sql = handler_query(
        Q["next_due_of_handlers"],
        Q["first_of_handler"],
        Q["first_of_many_handlers"],
        handlers,
        params,
        service,
    )
    return sql, params


async def test_thousands_of_other_handlers_items_ahead_do_not_slow_a_claim(
    tmp_path: Path, clock: ManualClock
) -> None:
    quiet, busy = tmp_path / "quiet.db", tmp_path / "busy.db"
    async with open_store(f"sqlite:///{quiet}") as store:
        await fill(store, clock, 0, 10)
    async with open_store(f"sqlite:///{busy}") as store:
        own = await fill(store, clock, 5000, 10)
        # the work does not grow with the other handler's 5,000 items ahead, for
        # the service's handlers or those of any service
        for handlers in (["mine"], ["mine", "nobody"], ["nobody", "mine", "x"]):
            for service in ("default", None):
                for sql, params in (
                    claim_sql(handlers, clock.now(), service=service),
                    next_due_sql(handlers, service),
                ):
                    steps = vm_steps(busy, sql, params)
                    assert steps < 1.2 * vm_steps(quiet, sql, params) + 50, (handlers, sql)
        # one worker's claim gets its own ten, earliest first
        claimed = await claim(store, clock, ["mine"], limit=10)
        assert [i.id for i in claimed] == [i.id for i in own]
        assert {i.claims for i in claimed} == {1}
        assert await claim(store, clock, ["mine"]) == []
        assert await store.next_due(["mine"]) == claimed[0].lease_until
        assert [i.handler_name for i in await claim(store, clock, ["mine", "other"], limit=3)] == [
            "other"
        ] * 3


async def test_a_claim_by_handler_is_a_seek_in_the_handler_index(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    conn = sqlite3.connect(path)
    now = datetime(2025, 1, 7, tzinfo=UTC)

    def plan_of(sql: str, params: dict[str, Any]) -> list[str]:
        return [str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]

    for handlers in (["a"], ["a", "b", "c"]):
        for service in ("default", None):
            for sql, params in (
                claim_sql(handlers, now, service=service),
                next_due_sql(handlers, service),
            ):
                plan = plan_of(sql, params)
                # one seek to each (service, handler); for any service, a seek to each
                # service the queue holds first (queued_services, the covering steps)
                # (the in_turn look-ups in retry_queue_ordering run for keyed records only)
                plan = [step for step in plan if "retry_queue_ordering" not in step]
                seeks = [step for step in plan if "(service=? AND handler_name=?" in step]
                assert len(seeks) == len(handlers), plan
                assert all("retry_queue_handler_name" in step for step in seeks), plan
                others = [s for s in plan if "retry_queue_handler_name" in s and s not in seeks]
                assert all("COVERING INDEX" in step for step in others), plan
                assert (service is None) == bool(others), plan
                assert not any(step.startswith("SCAN retry_queue") for step in plan), plan
        # a claim seeks each handler's due items in due order (the only sort is of the
        # handlers' first few together); next_due reads one item a handler, no sort
        plan = plan_of(*claim_sql(handlers, now))
        assert all(
            "next_retry<?" in step
            for step in plan
            if "handler_name=?" in step and "retry_queue_ordering" not in step
        ), plan
        assert sum("TEMP B-TREE" in step for step in plan) == 1, plan
        plan = plan_of(*next_due_sql(handlers))
        assert not any("TEMP B-TREE" in step for step in plan), plan
        assert any("retry_queue_lease_until" in step for step in plan), plan
    conn.close()


async def test_a_handlers_own_backlog_does_not_slow_its_claims(
    tmp_path: Path, clock: ManualClock
) -> None:
    quiet, backlog = tmp_path / "quiet.db", tmp_path / "backlog.db"
    for path, count in ((quiet, 10), (backlog, 5000)):
        async with open_store(f"sqlite:///{path}") as store:
            items = [pending(clock, n, "mine", due_in=-3600 + n * 0.01) for n in range(count)]
            for start in range(0, count, 1000):
                await store.record_pending(items[start : start + 1000])
    for handlers in (["mine"], ["mine", "other"]):
        for service in ("default", None):
            for sql, params in (
                claim_sql(handlers, clock.now(), service=service),
                next_due_sql(handlers, service),
            ):
                steps = vm_steps(backlog, sql, params)
                assert steps < 1.2 * vm_steps(quiet, sql, params) + 50, (handlers, sql)


async def test_a_worker_of_very_many_handlers_claims_its_own_in_due_order(
    tmp_path: Path, clock: ManualClock
) -> None:
    handlers = [f"h{n}" for n in range(MAX_HANDLER_ARMS + 10)]
    async with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        items = [pending(clock, n, handlers[n % 20], due_in=-n) for n in range(40)]
        others = [pending(clock, 1000 + n, "unknown", due_in=-100 - n) for n in range(5)]
        await store.record_pending(items + others)
        earliest = sorted(items, key=lambda item: (item.next_retry, item.id))
        assert await store.next_due(handlers) == earliest[0].next_retry
        claimed = await claim(store, clock, handlers, limit=25)
        assert [i.id for i in claimed] == [i.id for i in earliest[:25]]
        rest = await claim(store, clock, [*handlers, *handlers[:3]], limit=100)  # repeats
        assert [i.id for i in rest] == [i.id for i in earliest[25:]]
        # all leased now: the earliest end of a lease
        assert await store.next_due(handlers) == clock.now() + timedelta(seconds=30)
        assert len(await claim(store, clock, None, limit=100)) == 5


async def test_claims_of_several_handlers_come_earliest_first_within_the_limit(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        a = [pending(clock, n, "a", due_in=-10 + 2 * n) for n in range(5)]
        b = [pending(clock, 10 + n, "b", due_in=-9 + 2 * n) for n in range(5)]
        await store.record_pending(a + b)
        claimed = await claim(store, clock, ["a", "b"], limit=4)
        assert [i.id for i in claimed] == [a[0].id, b[0].id, a[1].id, b[1].id]
        # leased items are skipped; the earliest end of a lease counts for next_due
        assert await store.next_due(["a"]) == a[2].next_retry
        for item in a[2:]:
            await store.complete([Succeeded(item)], None, clock.now())
        assert await store.next_due(["a"]) == claimed[0].lease_until


# record_pending -------------------------------------------------------------------


async def test_many_pending_records_are_one_transaction(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        stored = pending(clock, 0, owner="p")
        await store.record_pending([stored])
        items = [pending(clock, n, owner="p") for n in range(1, 301)]
        statements: list[str] = []
        conn = store._conn  # type: ignore[attr-defined]
        conn.set_trace_callback(statements.append)
        twice = replace(items[5], handler_name="changed")  # the same id again: the first counts
        added = await store.record_pending([stored, *items, twice])
        conn.set_trace_callback(None)
        assert added == {item.id for item in items}
        assert statements.count("BEGIN IMMEDIATE") == 1
        assert statements.count("COMMIT") == 1
        assert sum("json_each" in s for s in statements) == 1  # one look-up of the ids
        assert (await store.get_retry(items[5].id)) == items[5]
        assert await store.retry_count() == 301
        assert await store.counters() == Counters()
        assert await store.record_pending([]) == set()


async def test_a_rescheduled_first_delivery_is_written_whole(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        item = pending(clock, 1, owner="p")
        await store.record_pending([item])
        retry = replace(
            item.rescheduled(
                attempt=1,
                next_retry=clock.now() + timedelta(seconds=5),
                error=ErrorInfo("boom", "RuntimeError", "tb"),
                now=clock.now(),
            ),
            max_retries=7,
            event_data={"changed": True},
        )
        assert await store.complete([Rescheduled(retry, first_delivery=True)], "p", clock.now())
        assert await store.get_retry(item.id) == retry
        assert await store.counters() == Counters(retry_added=1)


async def test_an_expired_pending_record_is_a_dead_letter_of_attempt_0(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        item = pending(clock, 1, due_in=3600)
        await store.record_pending([item])
        clock.advance(10)
        # not before its time: only once due since before `before`
        assert await store.expire_retry(before=clock.now(), now=clock.now(), reason="x") == []
        clock.advance(3600)
        (dead,) = await store.expire_retry(
            before=clock.now(), now=clock.now(), reason="expired in retry queue"
        )
        assert (dead.attempt, dead.event_id) == (0, "e1")
        assert await store.get_dead(dead.id) == dead


# watch() -------------------------------------------------------------------------


async def wait_for_wake(woken: asyncio.Event, write: Any) -> float:
    woken.clear()
    await write()
    started = time.monotonic()
    await asyncio.wait_for(woken.wait(), 2.0)
    return time.monotonic() - started


async def test_another_stores_deferred_record_wakes_a_watcher_within_the_target(
    tmp_path: Path, clock: ManualClock
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    async with open_store(url) as watched, open_store(url) as other:
        woken = asyncio.Event()
        stop = await watched.watch(woken.set)
        assert stop is not None
        waits = []
        for n in range(5):
            item = pending(clock, n, due_in=3600)  # deferred: no lease, due in an hour
            waits.append(await wait_for_wake(woken, lambda i=item: other.record_pending([i])))
            await asyncio.sleep(0.03)
        assert max(waits) < WAKE_TARGET, waits
        await stop()


async def test_the_stores_own_commits_do_not_wake_its_watcher(
    tmp_path: Path, clock: ManualClock
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    async with open_store(url) as watched, open_store(url) as other:
        wakes: list[float] = []
        stop = await watched.watch(lambda: wakes.append(time.monotonic()))
        assert stop is not None
        # 300 commits of its own: past the checkpoint the store runs every 100
        for n in range(150):
            item = pending(clock, n, owner="p")
            await watched.record_pending([item])
            await watched.complete([Succeeded(item)], "p", clock.now())
        await asyncio.sleep(0.25)
        assert wakes == []
        await other.record_pending([pending(clock, 999, due_in=60)])
        await asyncio.sleep(0.25)
        assert len(wakes) == 1
        await stop()
        await other.record_pending([pending(clock, 1000, due_in=60)])
        await asyncio.sleep(0.15)
        assert len(wakes) == 1  # stopped


async def test_closing_the_store_stops_its_watchers(tmp_path: Path, clock: ManualClock) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    async with open_store(url) as other:
        watched = open_store(url)
        stop = await watched.watch(lambda: None)
        assert stop is not None
        assert any(t.get_name().startswith("retrybus-watch") for t in asyncio.all_tasks())
        await watched.close()
        assert not any(t.get_name().startswith("retrybus-watch") for t in asyncio.all_tasks())
        await stop()  # after close: nothing left to stop, no error
        await other.record_pending([pending(clock, 1, due_in=60)])


async def test_an_idle_watch_costs_little_cpu(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        stop = await store.watch(lambda: None)
        assert stop is not None
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(2.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        await stop()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.5  # no busy loop: measured ~0.4 % of a core (20 reads a second)


WRITER = """
import asyncio, sys, time
import retrybus
from retrybus import Event, EventBus, FixedDelay

async def main(url):
    async with retrybus.open_store(url) as store:
        bus = EventBus(store, default_policy=FixedDelay(delay=0))
        print("ready", flush=True)
        for line in sys.stdin:
            await bus.retry_queue.add(Event("x", {"n": int(line)}), "h", "failed elsewhere")
            print(time.time(), flush=True)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
async def test_an_idle_worker_wakes_when_another_process_adds_an_item(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    handled: asyncio.Queue[float] = asyncio.Queue()
    async with open_store(url) as store:
        bus = EventBus(store, default_policy=FixedDelay(delay=0))
        bus.subscribe("x", lambda event: handled.put_nowait(time.time()), name="h")
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            url,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert writer.stdin is not None
        assert writer.stdout is not None
        try:
            assert (await asyncio.wait_for(writer.stdout.readline(), 30)).strip() == b"ready"
            async with RetryWorker(bus, check_interval=30):
                waits = []
                for n in range(5):
                    await asyncio.sleep(0.3)  # the worker found nothing and sleeps for 30 s
                    writer.stdin.write(f"{n}\n".encode())
                    await writer.stdin.drain()
                    committed = float(await asyncio.wait_for(writer.stdout.readline(), 10))
                    waits.append(await asyncio.wait_for(handled.get(), 2.0) - committed)
            assert max(waits) < WAKE_TARGET, waits
        finally:
            writer.stdin.close()
            await asyncio.wait_for(writer.wait(), 10)
        assert await store.retry_count() == 0


async def test_one_publish_after_another_is_one_write_each(tmp_path: Path) -> None:
    """A durable publisher's removals ride on its next publish's write: one
    transaction per publish, not two (the last removal is written on its own)."""
    store = open_store(f"sqlite:///{tmp_path / 'bus.db'}")
    calls = {"record_pending": 0, "complete": 0, "remove_then_record_pending": 0}
    for name in calls:
        method = getattr(store, name)

        def counted(*args: Any, _method: Any = method, _name: str = name) -> Any:
            calls[_name] += 1
            return _method(*args)

        setattr(store, name, counted)
    bus = EventBus(store)
    handled: list[int] = []

    async def count(event: Event) -> None:
        handled.append(event.data["n"])

    bus.subscribe("order.*", count, name="count")
    async with bus:
        for n in range(10):
            result = await bus.publish(Event("order.placed", {"n": n}))
            assert result.succeeded == ("count",)
        await bus.core.ledger.flush()
        assert await store.retry_count() == 0
    assert handled == list(range(10))
    assert calls == {"record_pending": 1, "remove_then_record_pending": 9, "complete": 1}
