"""The MongoDB store's own guarantees (the conformance suites cover the rest:
reopening a database, damaged documents, bad URLs, an unreachable server and four
worker processes are in tests/test_conformance_engines.py, for every engine).

Runs against the session's SecantusDB server (tests/engines/mongodb.py), or a
real mongod when ``MONGODB_URI`` is set. SecantusDB is slow: queues here hold
at most a few hundred items, and leases outlast the tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engines.mongodb import open_test_store
from engines.mongodb import server_uri as mongodb_server_uri
from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    ManualClock,
    StoreUnavailable,
    failure_group_key,
)
from retrybus._records import dead_letter_id_for
from retrybus._stores.mongodb import MongoStore
from retrybus._stores.mongodb.migrate import set_up

EVENT_TIME = datetime(2025, 1, 7, 9, 59, 59, 123456, tzinfo=UTC)


@pytest.fixture
async def mongo() -> AsyncIterator[MongoStore]:
    async with open_test_store() as store:
        yield store


@pytest.fixture
async def standalone() -> AsyncIterator[MongoStore]:
    """A store that behaves as on a standalone server: no transactions."""
    async with open_test_store(transactions=False) as store:
        yield store


def make_event(n: int = 1) -> Event:
    return Event(
        "like.added",
        {"post_id": n, "nested": {"x": 1.5, "ok": True, "none": None}, "big": 2**70},
        source="social-service",
        time=EVENT_TIME,
        subject=f"post/{n}",
        extensions={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


# The seed's collections and indexes ----------------------------------------------


async def test_the_seed_collections_and_indexes_exist(mongo: MongoStore) -> None:
    db = await mongo._database()
    retry = {tuple(i["key"]): i for i in (await db.retry_queue.index_information()).values()}
    dead = {tuple(i["key"]): i for i in (await db.dead_letter_queue.index_information()).values()}
    for keys in ((("next_retry", 1),), (("handler_name", 1),), (("next_retry", 1), ("attempt", 1))):
        assert keys in retry, retry
    assert (("created_at", 1),) in retry
    assert "expireAfterSeconds" not in retry[(("created_at", 1),)]  # retry items never vanish
    for keys in (
        (("created_at", -1),),
        (("processed", 1),),
        (("event_type", 1),),
        (("failure_group", 1),),
    ):
        assert keys in dead, dead
    assert (("created_at", -1), ("created_at_us", -1), ("_id", -1)) in dead  # newest first
    # dead letters follow the bus's dead_letter_retention (workers' cleanup), no TTL
    assert not [i for i in dead.values() if "expireAfterSeconds" in i], dead


async def test_connecting_drops_the_fixed_dead_letter_ttl_of_earlier_releases(
    mongo: MongoStore,
) -> None:
    """A store set up by an earlier release has a 30-day TTL on dead letters, which
    would delete them before a longer dead_letter_retention: connecting drops it."""
    db = await mongo._database()
    await db.dead_letter_queue.create_index([("created_at", 1)], expireAfterSeconds=30 * 24 * 3600)
    old = datetime.now(UTC) - timedelta(days=90)
    await db.dead_letter_queue.insert_one({"_id": "dlq_old", "created_at": old})
    await set_up(db)
    indexes = (await db.dead_letter_queue.index_information()).values()
    assert not [i for i in indexes if "expireAfterSeconds" in i], indexes
    await set_up(db)  # again: nothing to drop
    bus = EventBus(mongo, dead_letter_retention=None)
    assert await bus.dead_letters.cleanup() == 0
    assert await db.dead_letter_queue.count_documents({"_id": "dlq_old"}) == 1


async def test_documents_use_the_seed_field_names_and_bson_dates(mongo: MongoStore) -> None:
    clock = ManualClock(datetime(2025, 1, 7, 10, 0, 0, 250_777, tzinfo=UTC))
    bus = EventBus(mongo, clock=clock)
    item = await bus.retry_queue.add(make_event(), "SocialStatisticsHandler", "connection timeout")
    dead = await bus.retry_queue.mark_failed(item, reason="failed after 3 retries")
    assert dead is not None
    db = await mongo._database()
    doc = await db.dead_letter_queue.find_one({"_id": dead.id})
    assert doc is not None
    assert doc["_id"] == dead_letter_id_for(item.id)
    for field in ("event_type", "event_source", "handler_name", "error", "attempt", "reason"):
        assert field in doc
    assert doc["processed"] is False
    assert doc["event_data_json"]  # 2**70 does not fit BSON: kept exactly as JSON text
    assert isinstance(doc["created_at"], datetime)
    assert doc["created_at"] == datetime(2025, 1, 7, 10, 0, 0, 250_000, tzinfo=UTC)
    assert doc["created_at_us"] == 777
    assert doc["event_timestamp_us"] == 456
    assert await bus.dead_letters.get(dead.id) == dead
    # a JSON value BSON holds as such is stored as such
    plain = await bus.retry_queue.add(Event("like.added", {"post_id": 7}), "h", "boom")
    raw = await db.retry_queue.find_one({"_id": plain.id})
    assert raw is not None
    assert raw["event_data"] == {"post_id": 7}
    assert "event_data_json" not in raw


async def test_times_compare_to_the_microsecond(mongo: MongoStore) -> None:
    clock = ManualClock(datetime(2025, 1, 7, 10, 0, 0, 500, tzinfo=UTC))  # 0.5 ms
    bus = EventBus(mongo, clock=clock)
    soon = clock.now() + timedelta(microseconds=300)  # same millisecond, later
    item = await bus.retry_queue.add(make_event(), "h", "e", next_retry=soon)
    assert await bus.retry_queue.claim_due(10) == []
    assert await bus.retry_queue.count_due(within=0) == 0
    assert await bus.retry_queue.next_due() == soon
    clock.set(soon)
    [claimed] = await bus.retry_queue.claim_due(10, lease=0.0002)
    assert claimed.id == item.id
    clock.set(soon + timedelta(microseconds=199))
    assert await bus.retry_queue.claim_due(10, owner="b") == []
    clock.set(soon + timedelta(microseconds=200))
    assert [i.id for i in await bus.retry_queue.claim_due(10, owner="b")] == [item.id]


# Records written by hand ------------------------------------------------------------


async def test_a_dead_letter_written_by_hand_is_still_listed(mongo: MongoStore) -> None:
    db = await mongo._database()
    await db.dead_letter_queue.insert_one(
        {
            "_id": "dlq_seed_example",
            "event_type": "comment.created",
            "event_data": {"comment_id": 9},
            "handler_name": "CommentNotificationHandler",
            "error": "email service unavailable",
            "attempt": 3,
            "reason": "重试 3 次后仍然失败",
            "processed": False,
            "created_at": datetime(2025, 1, 7, 10, 0, 5, tzinfo=UTC),
            "metadata": {},
        }
    )
    [dead] = await EventBus(mongo).dead_letters.list()
    assert (dead.id, dead.event_type, dead.attempt, dead.reason) == (
        "dlq_seed_example",
        "comment.created",
        3,
        "重试 3 次后仍然失败",
    )
    assert dead.event_data == {"comment_id": 9}


# Failure groups and control records ------------------------------------------------------


async def test_every_write_of_a_dead_letter_stores_its_failure_group(mongo: MongoStore) -> None:
    clock = ManualClock()
    bus = EventBus(mongo, clock=clock)
    item = await bus.retry_queue.add(make_event(), "h", TimeoutError("timeout after 30 s"))
    dead = await bus.retry_queue.mark_failed(item)
    assert dead is not None
    db = await mongo._database()
    doc = await db.dead_letter_queue.find_one({"_id": dead.id})
    assert doc is not None
    assert doc["failure_group"] == dead.failure_group
    assert dead.failure_group == failure_group_key("h", "TimeoutError", "timeout after 5 s")
    changed = dataclasses.replace(dead, error="token expired", error_type="PermissionError")
    assert await mongo.update_dead(changed)
    doc = await db.dead_letter_queue.find_one({"_id": dead.id})
    assert doc is not None
    assert doc["failure_group"] == changed.failure_group != dead.failure_group


async def test_dead_letters_written_without_a_failure_group_get_one_on_connect(
    mongo: MongoStore,
) -> None:
    """Dead letters of the previous version (no ``failure_group`` field) are back-filled
    when a store connects, in batches, and are then filtered and grouped as any other."""
    db = await mongo._database()
    old = [
        {
            "_id": f"dlq_old_{n:04d}",
            "event_type": "comment.created",
            "event_data": {"comment_id": n},
            "handler_name": "CommentNotificationHandler",
            "error": f"smtp 10.0.0.{n % 250}:25 refused",
            "error_type": "ConnectionError",
            "attempt": 3,
            "reason": "failed after 3 retries",
            "processed": False,
            "created_at": datetime(2025, 1, 7, 10, 0, n % 60, tzinfo=UTC),
            "metadata": {},
        }
        for n in range(7)
    ]
    old.append({"_id": "dlq_bare", "created_at": datetime(2025, 1, 7, 9, 0, tzinfo=UTC)})
    await db.dead_letter_queue.insert_many(old)
    await mongo.close()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("retrybus._stores.mongodb.migrate.BACKFILL_BATCH", 3)
        await mongo.connect()
    db = await mongo._database()
    assert await db.dead_letter_queue.count_documents({"failure_group": None}) == 0
    key = failure_group_key(
        "CommentNotificationHandler", "ConnectionError", "smtp 1.2.3.4:25 refused"
    )
    assert await mongo.count_dead(DeadLetterFilter(failure_group=key)) == 7
    groups = await mongo.group_dead("failure_group", DeadLetterFilter(), limit=10)
    assert [(g.key, g.count) for g in groups] == [
        (key, 7),
        (failure_group_key("unknown", "", ""), 1),  # what a bare document reads back as
    ]
    assert groups[0].sample_id == "dlq_old_0006"
    assert groups[0].first_at == datetime(2025, 1, 7, 10, 0, 0, tzinfo=UTC)
    assert groups[0].last_at == datetime(2025, 1, 7, 10, 0, 6, tzinfo=UTC)


async def test_filters_and_groups_compare_times_to_the_microsecond(mongo: MongoStore) -> None:
    start = datetime(2025, 1, 7, 10, 0, 0, 250_100, tzinfo=UTC)
    clock = ManualClock(start)
    bus = EventBus(mongo, clock=clock)
    letters = []
    for n in range(3):  # 100 µs apart: all in one millisecond
        item = await bus.retry_queue.add(make_event(n), "h", "boom")
        letters.append(await bus.retry_queue.mark_failed(item))
        clock.advance(0.0001)
    middle = letters[1]
    assert middle is not None
    where = DeadLetterFilter(
        created_after=middle.created_at,
        created_before=middle.created_at + timedelta(microseconds=1),
    )
    assert [d.id for d in await bus.dead_letters.list(where=where)] == [middle.id]
    after = DeadLetterFilter(created_after=middle.created_at + timedelta(microseconds=1))
    assert await mongo.count_dead(after) == 1
    [group] = await mongo.group_dead("handler_name", DeadLetterFilter(), limit=5)
    assert (group.count, group.first_at, group.last_at) == (
        3,
        start,
        start + timedelta(microseconds=200),
    )


async def test_a_cursor_compares_times_to_the_microsecond(mongo: MongoStore) -> None:
    """Keyset paging within one millisecond: by the microseconds, then by id; a
    document written without ``created_at_us`` counts as 0 µs."""
    start = datetime(2025, 1, 7, 10, 0, 0, 250_000, tzinfo=UTC)
    db = await mongo._database()
    await db.dead_letter_queue.insert_one(
        {"_id": "dlq_by_hand", "handler_name": "h", "created_at": start, "failure_group": ""}
    )
    clock = ManualClock(start + timedelta(microseconds=100))
    bus = EventBus(mongo, clock=clock)
    positions = [(start, "dlq_by_hand")]
    for n in range(4):  # two at 250.100 ms, two at 251.000 ms
        if n == 2:
            clock.advance(0.0009)
        item = await bus.retry_queue.add(make_event(n), "h", "boom")
        dead = await bus.retry_queue.mark_failed(item)
        assert dead is not None
        positions.append((dead.created_at, dead.id))
    newest_first = sorted(positions, reverse=True)
    listed = await bus.dead_letters.list(where=DeadLetterFilter())
    assert [(d.created_at, d.id) for d in listed] == newest_first
    for n, position in enumerate(newest_first):
        after = [i for _, i in newest_first[n + 1 :]]
        where = DeadLetterFilter(cursor=position)
        assert [d.id for d in await bus.dead_letters.list(where=where)] == after
        assert await mongo.count_dead(where) == len(after)
    for moment, item_id, count in (
        (start, "dlq_a", 0),
        (start, "dlq_z", 1),
        (start + timedelta(microseconds=50), "", 1),
        (start + timedelta(microseconds=101), "", 3),
        (start + timedelta(milliseconds=1), "", 3),
        (start + timedelta(milliseconds=1), "dlq_z", 5),
    ):
        assert await mongo.count_dead(DeadLetterFilter(cursor=(moment, item_id))) == count


async def test_control_records_are_documents_with_a_version(mongo: MongoStore) -> None:
    assert await mongo.put_control("redrive:x", {"state": "running", "big": 2**70}, version=0) == 1
    db = await mongo._database()
    doc = await db.retrybus_control.find_one({"_id": "redrive:x"})
    assert doc is not None
    assert doc["version"] == 1
    assert "value_json" in doc  # 2**70 does not fit BSON: kept exactly as JSON text
    assert await mongo.put_control("redrive:x", {"state": "done"}, version=1) == 2
    doc = await db.retrybus_control.find_one({"_id": "redrive:x"})
    assert doc is not None
    assert (doc["version"], doc["value"], "value_json" in doc) == (2, {"state": "done"}, False)
    record = await mongo.get_control("redrive:x")
    assert record is not None
    assert dict(record.value) == {"state": "done"}


# Moving to the DLQ without a transaction -------------------------------------------------


async def test_without_transactions_a_repeated_move_inserts_nothing_and_still_deletes(
    standalone: MongoStore,
) -> None:
    assert standalone._transactions is False
    clock = ManualClock()
    bus = EventBus(standalone, clock=clock)
    item = await bus.retry_queue.add(make_event(), "h", "boom", next_retry=clock.now())
    [claimed] = await bus.retry_queue.claim_due(1, owner="worker")
    # a crash after the first write of an earlier move left its dead letter behind
    earlier = claimed.to_dead_letter(reason="failed after 3 retries", now=clock.now())
    db = await standalone._database()
    await db.dead_letter_queue.insert_one(
        {"_id": earlier.id, "reason": earlier.reason, "created_at": clock.now()}
    )
    clock.advance(1)
    dead = await bus.retry_queue.mark_failed(claimed, reason="failed after 3 retries")
    assert dead is not None
    assert dead.id == earlier.id == dead_letter_id_for(item.id)
    assert await bus.retry_queue.count() == 0
    assert await bus.dead_letters.count() == 1
    stored = await db.dead_letter_queue.find_one({"_id": dead.id})
    assert stored is not None
    assert stored["created_at"] == earlier.created_at  # the insert was a no-op
    assert await bus.retry_queue.mark_failed(claimed) is None  # and so is a repeat
    assert await bus.dead_letters.count() == 1
    assert (await standalone.counters()).retry_dead_lettered == 1


async def test_without_transactions_a_move_by_a_worker_that_lost_its_lease_leaves_no_trace(
    standalone: MongoStore,
) -> None:
    clock = ManualClock()
    bus = EventBus(standalone, clock=clock)
    await bus.retry_queue.add(make_event(), "h", "boom", next_retry=clock.now())
    [a] = await bus.retry_queue.claim_due(1, lease=10, owner="worker-a")
    clock.advance(11)
    [b] = await bus.retry_queue.claim_due(1, lease=10, owner="worker-b")
    assert await bus.retry_queue.mark_failed(a) is None
    assert await bus.dead_letters.count() == 0
    assert [i.lease_owner for i in await bus.retry_queue.list()] == ["worker-b"]
    dead = await bus.retry_queue.mark_failed(b)
    assert dead is not None
    assert [d.id for d in await bus.dead_letters.list()] == [dead.id]
    assert await bus.retry_queue.count() == 0


async def test_without_transactions_requeue_and_cleanup_lose_nothing(
    standalone: MongoStore,
) -> None:
    clock = ManualClock()
    bus = EventBus(standalone, clock=clock)
    bus.subscribe("like.added", lambda event: None, name="h")
    item = await bus.retry_queue.add(make_event(), "h", "boom")
    dead = await bus.retry_queue.mark_failed(item)
    assert dead is not None
    retry = await bus.dead_letters.requeue(dead.id)
    assert [i.id for i in await bus.retry_queue.list()] == [retry.id]
    assert await bus.dead_letters.count() == 0
    clock.advance(8 * 24 * 3600)
    assert await bus.retry_queue.cleanup() == 1
    assert await bus.retry_queue.count() == 0
    [expired] = await bus.dead_letters.list()
    assert expired.reason == "expired in retry queue"


# A server gone ---------------------------------------------------


async def test_a_server_gone_after_connecting_raises_store_unavailable(tmp_path: Path) -> None:
    """A server of its own, stopped under a connected store: calls raise StoreUnavailable."""
    if os.environ.get("MONGODB_URI"):
        pytest.skip("needs a SecantusDB server of its own")
    mongodb_server_uri()  # skips (or fails in CI) when SecantusDB cannot run
    from secantus import SecantusDBServer

    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(tmp_path / "data"))
    server.start()
    host, port = server.address
    store = MongoStore.from_url(f"mongodb://{host}:{port}/retrybus?timeout=0.3")
    try:
        await store.connect()
        await EventBus(store).retry_queue.add(make_event(), "h", "boom")
        assert await store.retry_count() == 1
        await asyncio.to_thread(server.stop)
        calls = (
            store.health(),
            store.retry_count(),
            store.next_due(),
            store.count_dead(DeadLetterFilter()),
        )
        for call in calls:
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}/retrybus"):
                await call
    finally:
        await store.close()
        await asyncio.to_thread(server.stop)
