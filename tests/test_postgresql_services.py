"""Services (issue 12) on PostgreSQL, beyond the conformance suite: the version 6
migration (a version 5 schema with records and dead letters migrates without
rewriting either table, and every record reads back as the default service's;
the handler index is led by the service, and still names no lease column), a
worker's claim reading nothing of another service's backlog (the plans asked of
the server), the sweep of a removed handler's records (its plan, a damaged
record, a handler put back while it runs) and subscription writes from many
stores at once taking turns on the revision.

Every test works in a schema of its own (dropped afterwards) and skips when the
server is unreachable (fails with CI=true); see tests/engines/postgresql.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from engines.postgresql import URL, fresh_schema, url_with_schema
from retrybus import DeadLetterFilter, Event, RetryItem, open_store
from retrybus._records import DeadLetterItem, ErrorInfo
from retrybus._services import StoredSubscription
from retrybus._stores._fields import DEAD_LETTER_FIELDS, RETRY_FIELDS
from retrybus._stores.postgresql import SCHEMA_VERSION, PostgresStore, Q
from retrybus._stores.postgresql import migrate as postgresql_migrate
from retrybus._stores.postgresql.codec import CODEC

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with fresh_schema() as name:
        yield name


@pytest.fixture
def url(schema: str) -> str:
    return url_with_schema(schema)


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresStore]:
    opened = open_store(url)
    assert isinstance(opened, PostgresStore)
    async with opened:
        yield opened


async def raw_connection(schema: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(PostgresStore.from_url(URL)._dsn)
    await conn.execute(f'SET search_path = "{schema}"')
    return conn


def event(n: int) -> Event:
    return Event("order.placed", {"n": n}, source="shop", id=f"event-{n}", time=NOW)


def pending(
    n: int,
    handler: str = "h",
    service: str = "default",
    *,
    due_in: float = 0.0,
    owner: str | None = None,
) -> RetryItem:
    """A first delivery of ``event(n)``, due in ``due_in`` seconds; with ``owner``,
    a durable publish's, leased to it for a minute."""
    return RetryItem.pending(
        event(n),
        handler,
        max_retries=3,
        due=NOW + timedelta(seconds=due_in),
        now=NOW,
        lease_owner=owner,
        lease_until=None if owner is None else NOW + timedelta(seconds=60),
        service=service,
    )


def failed(n: int, handler: str = "h", *, attempt: int = 2, due_in: float = 0.0) -> RetryItem:
    return RetryItem.for_failure(
        event(n),
        handler,
        ErrorInfo(f"order {n} not found", "KeyError"),
        attempt=attempt,
        max_retries=3,
        next_retry=NOW + timedelta(seconds=due_in),
        now=NOW,
    )


def dead(n: int, handler: str = "h", *, processed: bool = False) -> DeadLetterItem:
    item = DeadLetterItem.for_failure(
        event(n),
        handler,
        ErrorInfo(f"smtp 10.0.0.{n}:25 refused", "ConnectionError"),
        reason="failed after 3 retries",
        attempt=3,
        max_retries=3,
        now=NOW + timedelta(seconds=n),
    )
    return replace(item, processed=True, processed_at=NOW) if processed else item


def subscription(service: str, handler: str, *patterns: str) -> StoredSubscription:
    return StoredSubscription(
        service=service,
        handler_name=handler,
        patterns=patterns or ("order.*",),
        policy="ExponentialBackoff(max_retries=3)",
        max_retries=3,
        registered_at=NOW,
        updated_at=NOW,
    )


# the version 6 migration -------------------------------------------------------

#: the columns of each table before version 6: all but the service
RETRY_BEFORE = tuple(name for name in RETRY_FIELDS if name != "service")
DEAD_BEFORE = tuple(name for name in DEAD_LETTER_FIELDS if name != "service")
#: the columns a claim, a lease extension or a release writes: no index may hold one
LEASE_COLUMNS = ("lease_owner", "lease_until", "updated_at", "claims")


async def insert_as_version_5(
    conn: asyncpg.Connection, items: list[RetryItem], letters: list[DeadLetterItem]
) -> None:
    """Records and dead letters as a retrybus of schema version 5 wrote them: every
    column but the service (its failure groups those of the default service)."""
    for table, columns, rows in (
        ("retry_queue", RETRY_BEFORE, [CODEC.retry_fields(item) for item in items]),
        ("dead_letter_queue", DEAD_BEFORE, [CODEC.dead_letter_fields(d) for d in letters]),
    ):
        if not rows:
            continue
        values = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
        await conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})",
            [[row[name] for name in columns] for row in rows],
        )


async def layout(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """The indexes (name: definition) of the schema, and each queue's file node
    (it changes when a table is rewritten)."""
    indexes = {
        row[0]: row[1]
        for row in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema
        )
    }
    nodes = {
        table: await conn.fetchval("SELECT pg_relation_filenode($1::regclass)", table)
        for table in ("retry_queue", "dead_letter_queue")
    }
    return {"indexes": indexes, "nodes": nodes}


def unkeyed(reads: dict[str, int]) -> set[str]:
    """The indexes a query over unkeyed records read: the ordering index appears in
    its plan (the in_turn condition) but is never read for them."""
    assert reads.get("retry_queue_ordering", 0) == 0, reads
    return set(reads) - {"retry_queue_ordering"}


async def test_a_version_5_schema_with_records_and_dead_letters_migrates_to_6(
    url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SCHEMA_VERSION >= 6
    with monkeypatch.context() as patched:
        patched.setattr(postgresql_migrate, "SCHEMA_VERSION", 5)  # what the last release made
        async with open_store(url) as old:
            assert await old.schema_version() == 5
    deferred = pending(1, due_in=-30)
    scheduled = pending(2, due_in=3600)
    running = pending(3, "g", owner="publisher")
    retrying = failed(4, attempt=2, due_in=-10)
    letters = [dead(5), dead(6, processed=True), dead(7, "g")]
    items = [deferred, scheduled, running, retrying]
    conn = await raw_connection(schema)
    try:
        await insert_as_version_5(conn, items, letters)
        before = await layout(conn, schema)
    finally:
        await conn.close()
    assert "(handler_name, next_retry)" in before["indexes"]["retry_queue_handler_name"]

    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        assert await store.migrate() == SCHEMA_VERSION
        # every record and dead letter reads back whole, of the default service
        for item in items:
            assert (await store.get_retry(item.id)) == item
            assert item.service == "default"
        for letter in letters:
            assert (await store.get_dead(letter.id)) == letter
            assert letter.service == "default"
        listed = await store.list_retry(limit=10, offset=0, service="default")
        assert {item.id for item in listed} == {item.id for item in items}
        assert await store.list_retry(limit=10, offset=0, service="billing") == []
        assert await store.count_dead(DeadLetterFilter(service="default")) == 3
        assert await store.count_dead(DeadLetterFilter(service="billing")) == 0
        (group,) = await store.group_dead("service", DeadLetterFilter(), limit=10)
        assert (group.key, group.count) == ("default", 3)
        # the failure groups version 5 stored are the default service's
        same = DeadLetterFilter(failure_group=letters[0].failure_group)
        assert await store.count_dead(same) == 2
        # a worker of the default service claims what is due, from the new index
        claimed = await store.claim_due(
            now=NOW,
            limit=10,
            owner="w",
            lease_until=NOW + timedelta(seconds=30),
            service="default",
            handlers=["h", "g"],
        )
        assert {item.id for item in claimed} == {deferred.id, retrying.id}
        assert await store.next_due(["g"], service="default") == running.lease_until
        # a retrybus of version 5 still running (a rolling upgrade) goes on writing
        # records without a service: they are the default service's
        conn = await raw_connection(schema)
        try:
            await conn.execute("SET enable_seqscan = off")  # a tiny table: what it could do
            late = pending(8, due_in=-1)
            await insert_as_version_5(conn, [late], [dead(9)])
            after = await layout(conn, schema)
            versions = await conn.fetch("SELECT version FROM retrybus_schema_version")
            options = await conn.fetchval(
                "SELECT reloptions FROM pg_class WHERE oid = 'retry_queue'::regclass"
            )
            plan = await conn.fetch(
                f"EXPLAIN {Q['claim_due_for']}",
                "w",
                NOW + timedelta(seconds=30),
                NOW,
                10,
                ["h"],
                "default",
            )
        finally:
            await conn.close()
        assert (await store.get_retry(late.id)) == late
        assert [
            item.id
            for item in await store.claim_due(
                now=NOW,
                limit=10,
                owner="w",
                lease_until=NOW + timedelta(seconds=30),
                service="default",
                handlers=["h"],
            )
        ] == [late.id]
        assert await store.count_dead(DeadLetterFilter(service="default")) == 4
    assert sorted(row[0] for row in versions) == list(range(1, SCHEMA_VERSION + 1))
    # no table was rewritten: the columns came with their default
    assert after["nodes"] == before["nodes"]
    # the handler index is led by the service now (the old one is gone), and the
    # dead letters have one by service
    indexes = after["indexes"]
    assert "(service, handler_name, next_retry)" in indexes["retry_queue_handler_name"]
    assert not [d for d in indexes.values() if "(handler_name, next_retry)" in d], indexes
    assert "(service, created_at DESC, id DESC)" in indexes["dead_letter_queue_service"]
    assert "retry_queue_handler_name" in "\n".join(row[0] for row in plan)
    # claims, lease extensions and releases stay HOT updates (version 5)
    for name, definition in indexes.items():
        if name.startswith("retry_queue"):
            assert not [c for c in LEASE_COLUMNS if c in definition], definition
    assert options == ["fillfactor=80"]


# a worker's claim reads only its service's handlers' records ---------------------


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(map(literal, value)) + "]::text[]"
    assert isinstance(value, int)
    return str(value)


async def retry_queue_reads(
    conn: asyncpg.Connection, query: str, *args: Any, generic: bool
) -> dict[str, int]:
    """Rows each scan of retry_queue read (returned and filtered out), by index,
    when the server ran ``query`` (then rolled back) as a prepared statement with
    a plan for these values, or the generic plan."""
    mode = "force_generic_plan" if generic else "force_custom_plan"
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
        await conn.execute(f"PREPARE retrybus_probe AS {query}")
        values = f"({', '.join(map(literal, args))})" if args else ""
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE retrybus_probe{values}")
    finally:
        await transaction.rollback()
        await conn.execute("DEALLOCATE retrybus_probe")
    reads: dict[str, int] = {}
    nodes = list(plan_nodes(json.loads(text)[0]["Plan"]))
    for node in nodes:
        if node.get("Relation Name") != "retry_queue" or "Scan" not in node["Node Type"]:
            continue
        if node["Node Type"] == "Bitmap Heap Scan":
            continue  # its Bitmap Index Scan child is counted
        name = node.get("Index Name", node["Node Type"])
        rows = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        reads[name] = reads.get(name, 0) + rows
    for node in nodes:
        if node["Node Type"] == "Bitmap Index Scan":
            name = node["Index Name"]
            reads[name] = reads.get(name, 0) + node["Actual Rows"] * node["Actual Loops"]
    return reads


async def seed_a_stopped_service(store: PostgresStore) -> list[RetryItem]:
    """5,000 due records of the handlers "mine" and "other" of a stopped service,
    half of them leased (its last worker's claims), all due before ten of "mine"
    of the service "live"; those ten."""
    backlog = [
        replace(
            pending(n, ("mine", "other")[n % 2], "stopped", owner="gone" if n % 4 < 2 else None),
            next_retry=NOW - timedelta(hours=1) + timedelta(seconds=n / 10),
        )
        for n in range(5000)
    ]
    for first in range(0, len(backlog), 1000):
        await store.record_pending(backlog[first : first + 1000])
    mine = [pending(100_000 + n, "mine", "live", due_in=-10 + n) for n in range(10)]
    await store.record_pending(mine)
    return mine


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_a_claim_reads_none_of_another_services_backlog_of_the_same_handler(
    store: PostgresStore, schema: str, analyzed: bool
) -> None:
    mine = await seed_a_stopped_service(store)
    conn = await raw_connection(schema)
    try:
        if analyzed:  # statistics: almost every record is of the stopped service
            await conn.execute("ANALYZE retry_queue")
        lease_until = NOW + timedelta(seconds=30)
        for generic in (False, True):
            for query, args in [
                ("claim_due_for", ("w", lease_until, NOW, 10, ["mine", "nobody"], "live")),
                ("next_due_for", (["mine", "nobody"], "live")),
            ]:
                reads = await retry_queue_reads(conn, Q[query], *args, generic=generic)
                assert unkeyed(reads) <= {"retry_queue_handler_name", "retry_queue_pkey"}, reads
                assert reads["retry_queue_handler_name"] <= 50, (query, reads)
    finally:
        await conn.close()
    assert await store.next_due(["mine"], service="live") == mine[0].next_retry
    claimed = await store.claim_due(
        now=NOW, limit=10, owner="w", lease_until=lease_until, service="live", handlers=["mine"]
    )
    assert [item.id for item in claimed] == [item.id for item in mine]
    assert await store.next_due(["mine"], service="live") == lease_until
    # the stopped service's own are all there, for when it comes back
    first_unleased = NOW - timedelta(hours=1) + timedelta(seconds=0.2)  # its third
    assert await store.next_due(["mine"], service="stopped") == first_unleased
    assert len(await store.list_retry(limit=10_000, offset=0, service="stopped")) == 5000


# the sweep of a removed handler's records ----------------------------------------


async def test_the_sweep_reads_only_the_removed_handlers_records(
    store: PostgresStore, schema: str
) -> None:
    await seed_a_stopped_service(store)
    removed = [pending(200_000 + n, "gone", "live", due_in=-n) for n in range(5)]
    await store.record_pending(removed)
    terms = [subscription("live", "mine"), subscription("live", "gone")]
    await store.put_subscriptions("live", terms, prune=False, now=NOW, actor="w")
    await store.remove_subscriptions("live", ["gone"], now=NOW, actor="alice")
    conn = await raw_connection(schema)
    try:
        for generic in (False, True):
            reads = await retry_queue_reads(
                conn, Q["take_unsubscribed"], NOW, 100, ["live"], ["gone"], generic=generic
            )
            assert unkeyed(reads) <= {"retry_queue_handler_name", "retry_queue_pkey"}, reads
            assert sum(reads.values()) <= 50, reads
    finally:
        await conn.close()
    moved = await store.dead_letter_unsubscribed(now=NOW, limit=100)
    assert [letter.event_id for letter in moved] == [f"event-{200_004 - n}" for n in range(5)]
    assert {letter.reason for letter in moved} == {"subscription removed: live/gone (by alice)"}
    assert await store.retry_count() == 5010


async def test_a_damaged_record_of_a_removed_handler_is_dead_lettered_with_the_reason(
    store: PostgresStore, schema: str
) -> None:
    await store.put_subscriptions(
        "billing", [subscription("billing", "h")], prune=False, now=NOW, actor="w"
    )
    conn = await raw_connection(schema)
    try:
        # a row without its event's fields (written by hand)
        await conn.execute(
            "INSERT INTO retry_queue (id, event_id, event_type, handler_name, next_retry,"
            " created_at, updated_at, service)"
            " VALUES ('retry_hand', 'e1', 'x', 'h', $1, $1, $1, 'billing')",
            NOW,
        )
    finally:
        await conn.close()
    await store.remove_subscriptions("billing", None, now=NOW, actor="alice")
    (letter,) = await store.dead_letter_unsubscribed(now=NOW, limit=10)
    assert letter.reason == "subscription removed: billing/h (by alice)"
    assert (letter.service, letter.handler_name, letter.event_id) == ("billing", "h", "e1")
    assert letter.error_type == "retrybus.CorruptRecord"
    assert letter.metadata["raw_record"]["service"] == "billing"
    assert (await store.get_dead(letter.id)) == letter
    assert await store.retry_count() == 0


async def test_a_handler_put_back_while_the_sweep_waits_keeps_its_records(
    store: PostgresStore, schema: str
) -> None:
    item = pending(1, service="billing")
    await store.record_pending([item])
    terms = [subscription("billing", "h")]
    await store.put_subscriptions("billing", terms, prune=False, now=NOW, actor="w")
    await store.remove_subscriptions("billing", None, now=NOW, actor="alice")
    conn = await raw_connection(schema)
    try:
        transaction = conn.transaction()
        await transaction.start()
        # another store putting the handler back, not committed yet
        await conn.execute(
            "UPDATE retrybus_subscriptions SET removed_at = NULL, removed_by = NULL"
            " WHERE service = 'billing'"
        )
        sweep = asyncio.create_task(store.dead_letter_unsubscribed(now=NOW, limit=10))
        await asyncio.sleep(0.3)
        assert not sweep.done()  # it waits for the tombstone's row
        await transaction.commit()
        assert await asyncio.wait_for(sweep, 5.0) == []
    finally:
        await conn.close()
    assert (await store.get_retry(item.id)) == item


# subscriptions written from many stores at once ----------------------------------


async def test_subscription_writes_from_many_stores_take_turns_on_the_revision(url: str) -> None:
    stores = [open_store(url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.connect() for s in stores))
        seen: list[int] = []

        async def register(n: int) -> None:
            s = stores[n % 4]
            service = f"svc{n % 5}"
            terms = [subscription(service, f"h{n}")]
            await s.put_subscriptions(service, terms, prune=False, now=NOW, actor=f"w{n}")
            seen.append(await s.subscriptions_revision())

        await asyncio.gather(*(register(n) for n in range(40)))
        listed = await stores[0].list_subscriptions()
        # one revision per write, none shared, none skipped, none gone back
        assert sorted(s.revision for s in listed) == list(range(1, 41))
        assert await stores[1].subscriptions_revision() == 40
        assert all(1 <= revision <= 40 for revision in seen)
        # every write of a handler named by the revision a reader saw is there
        for revision in seen:
            assert len([s for s in listed if s.revision <= revision]) == revision
        # removals with prune racing: each live handler is tombstoned once
        removed, pruned = await asyncio.gather(
            asyncio.gather(
                *(
                    s.remove_subscriptions(f"svc{n}", None, now=NOW, actor="ops")
                    for n, s in enumerate(stores)
                )
            ),
            asyncio.gather(
                *(
                    s.put_subscriptions(f"svc{n}", [], prune=True, now=NOW, actor="deploy")
                    for n, s in enumerate(stores)
                )
            ),
        )
        assert await stores[2].list_subscriptions("svc0") == []
        assert await stores[2].subscriptions_revision() > 40
        tombstoned = [name for names in removed for name in names] + [
            name for registration in pruned for name in registration.removed
        ]
        assert sorted(tombstoned) == sorted(
            s.handler_name for s in listed if s.service in ("svc0", "svc1", "svc2", "svc3")
        )
    finally:
        await asyncio.gather(*(s.close() for s in stores))
