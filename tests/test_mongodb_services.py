"""Services (issue 12) on MongoDB: what the conformance suite does not see.

Layout 3: records written before it (or by a layout-2 process during a rolling
upgrade, without ``service``) are the default service's; the claim index leads
with the service, so a stopped service's backlog is never read by another
service's claims; the documents of subscriptions and heartbeats and the
subscriptions' revision; the sweep of a removed handler's records fenced as
claims are.

Runs against the session's SecantusDB server (tests/engines/mongodb.py), or a
real mongod when ``MONGODB_URI`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import ASCENDING, AsyncMongoClient

from engines._common import unique_name
from engines.mongodb import database_url, drop_database, open_test_store, server_uri
from retrybus import DeadLetterFilter, Event, ManualClock, RetryItem, failure_group_key
from retrybus._records import DeadLetterItem, ErrorInfo, dead_letter_id_for
from retrybus._services import HandlerLoad, Registration, StoredSubscription, WorkerBeat
from retrybus._stores.mongodb import MongoStore
from retrybus._stores.mongodb.codec import dead_letter_document, retry_document
from retrybus._stores.mongodb.migrate import LAYOUT_VERSION, layout_version
from retrybus._stores.mongodb.queries import claim_candidates

START = datetime(2025, 1, 7, 10, 0, 0, 250_000, tzinfo=UTC)
REAL_MONGOD = bool(os.environ.get("MONGODB_URI"))
CLAIM_ORDER = [("next_retry", 1), ("next_retry_us", 1), ("_id", 1)]


@pytest.fixture
async def mongo() -> AsyncIterator[MongoStore]:
    async with open_test_store() as store:
        yield store


@pytest.fixture
async def standalone() -> AsyncIterator[MongoStore]:
    """A store that behaves as on a standalone server: no transactions."""
    async with open_test_store(transactions=False) as store:
        yield store


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[tuple[str, Any]]:
    """A database no store has set up yet (its URL), and a plain client's handle on it."""
    name = unique_name()
    url = database_url(name, timeout="10")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server_uri(), tz_aware=True)
    try:
        yield url, client[name]
    finally:
        await client.close()
        await drop_database(url, name)


def event(n: int) -> Event:
    return Event("order.placed", {"n": n}, source="shop", id=f"event-{n}", time=START)


def pending(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    service: str = "default",
    *,
    due_in: float = 0.0,
    owner: str | None = None,
) -> RetryItem:
    now = clock.now()
    return RetryItem.pending(
        event(n),
        handler,
        max_retries=3,
        due=now + timedelta(seconds=due_in),
        now=now,
        lease_owner=owner,
        lease_until=None if owner is None else now + timedelta(seconds=60),
        service=service,
    )


def failed(clock: ManualClock, n: int, handler: str = "h", service: str = "default") -> RetryItem:
    return RetryItem.for_failure(
        event(n),
        handler,
        ErrorInfo(f"order {n} not found", "KeyError"),
        attempt=2,
        max_retries=3,
        next_retry=clock.now(),
        now=clock.now(),
        service=service,
    )


def dead(
    clock: ManualClock, n: int, handler: str = "h", service: str = "default"
) -> DeadLetterItem:
    return DeadLetterItem.for_failure(
        event(n),
        handler,
        ErrorInfo(f"order {n} not found", "KeyError"),
        reason="non-retryable: KeyError",
        attempt=0,
        max_retries=3,
        now=clock.now(),
        service=service,
    )


def layout_2(doc: dict[str, Any]) -> dict[str, Any]:
    """A document as layout 2 wrote it: no ``service``."""
    return {name: value for name, value in doc.items() if name != "service"}


async def claim(
    store: MongoStore,
    clock: ManualClock,
    service: str | None,
    handlers: list[str] | None = None,
    *,
    owner: str = "w",
) -> list[str]:
    now = clock.now()
    claimed = await store.claim_due(
        now=now,
        limit=100,
        owner=owner,
        lease_until=now + timedelta(hours=1),
        service=service,
        handlers=handlers,
    )
    return sorted(record.id for record in claimed)


def subscription(service: str, handler: str, **details: Any) -> StoredSubscription:
    return StoredSubscription(
        service=service,
        handler_name=handler,
        patterns=("order.*",),
        policy="ExponentialBackoff(max_retries=3)",
        max_retries=3,
        registered_at=START,
        updated_at=START,
        details=details,
    )


# the layout upgrade ----------------------------------------------------------------


LAYOUT_2_CLAIM_INDEX = [
    ("handler_name", ASCENDING),
    ("next_retry", ASCENDING),
    ("next_retry_us", ASCENDING),
    ("_id", ASCENDING),
]  # ASCENDING is 1: the index information's keys compare equal


async def test_records_of_layout_2_are_the_default_services_and_get_the_field() -> None:
    clock = ManualClock(START)
    waiting = pending(clock, 1)
    leased = pending(clock, 2, owner="old-publisher")
    later = pending(clock, 3, due_in=600)
    retry = failed(clock, 4)
    letters = [dead(clock, 5), replace(dead(clock, 6), processed=True, processed_at=START)]
    async with fresh_database() as (url, raw):
        await raw.retry_queue.insert_many(
            [layout_2(retry_document(item)) for item in (waiting, leased, later, retry)]
        )
        await raw.dead_letter_queue.insert_many(
            [layout_2(dead_letter_document(letter)) for letter in letters]
        )
        await raw.retry_queue.create_index(LAYOUT_2_CLAIM_INDEX)
        await raw.retrybus_layout.insert_one({"_id": "layout", "version": 2})

        async with MongoStore.from_url(url) as store:
            assert await layout_version(raw) == LAYOUT_VERSION == 3
            for collection in (raw.retry_queue, raw.dead_letter_queue):
                services = await collection.distinct("service")
                assert services == ["default"]
                assert await collection.count_documents({"service": {"$exists": False}}) == 0
            # every record reads back as it was written: of the default service
            for item in (waiting, leased, later, retry):
                assert await store.get_retry(item.id) == item
                assert item.service == "default"
            for letter in letters:
                assert await store.get_dead(letter.id) == letter
            # their failure groups are what they were (the default's has no service)
            stored = await raw.dead_letter_queue.find_one({"_id": letters[0].id})
            assert stored["failure_group"] == failure_group_key(
                "h", "KeyError", "order 5 not found"
            )
            # layout 2's claim index is replaced by the one that leads with the service
            indexes = await raw.retry_queue.index_information()
            keys = [[(k, int(v)) for k, v in i["key"]] for i in indexes.values()]
            assert LAYOUT_2_CLAIM_INDEX not in keys
            assert [("service", 1), *LAYOUT_2_CLAIM_INDEX] in keys
            # they are found, claimed and counted as the default service's
            assert await store.list_retry(limit=10, offset=0, service="billing") == []
            assert len(await store.list_retry(limit=10, offset=0, service="default")) == 4
            assert await claim(store, clock, "billing", ["h"]) == []
            assert await claim(store, clock, "default", ["h"]) == sorted([waiting.id, retry.id])
            assert await store.count_dead(DeadLetterFilter(service="default")) == 2
            assert await store.count_dead(DeadLetterFilter(service="billing")) == 0
            (group,) = await store.group_dead("service", DeadLetterFilter(), limit=10)
            assert (group.key, group.count) == ("default", 2)

        # connecting again changes nothing
        async with MongoStore.from_url(url) as store:
            assert await layout_version(raw) == LAYOUT_VERSION
            assert await store.get_dead(letters[1].id) == letters[1]
            assert len(await store.list_retry(limit=10, offset=0, service="default")) == 4


async def test_what_a_layout_2_process_writes_after_the_upgrade_is_the_default_services(
    mongo: MongoStore,
) -> None:
    """During a rolling upgrade, processes of the previous version write records
    without ``service``: every query for the default service finds them."""
    clock = ManualClock(START)
    db = await mongo._database()
    item = pending(clock, 1, due_in=-5)
    letter = dead(clock, 2)
    await db.retry_queue.insert_one(layout_2(retry_document(item)))
    await db.dead_letter_queue.insert_one(layout_2(dead_letter_document(letter)))
    await mongo.record_pending([pending(clock, 3, service="billing")])

    assert await mongo.get_retry(item.id) == item
    assert [i.id for i in await mongo.list_retry(limit=10, offset=0, service="default")] == [
        item.id
    ]
    assert await mongo.next_due(["h"], service="default") == item.next_retry
    groups = await mongo.group_retry("service", limit=10)
    assert [(g.key, g.count) for g in groups] == [("billing", 1), ("default", 1)]
    assert await mongo.count_dead(DeadLetterFilter(service="default")) == 1
    assert [
        d.id for d in await mongo.list_dead(DeadLetterFilter(service="default"), limit=5, offset=0)
    ] == [letter.id]
    loads = await mongo.service_loads(clock.now())
    assert [(load.service, load.handler_name) for load in loads] == [
        ("billing", "h"),
        ("default", "h"),
    ]
    assert loads[1] == HandlerLoad(
        service="default",
        handler_name="h",
        pending=1,
        dead_unprocessed=1,
        oldest_pending_due=item.next_retry,
    )
    assert await claim(mongo, clock, "default", ["h"]) == [item.id]

    # its handler removed in the default service: the sweep takes it too
    await mongo.release([item.id], "w")
    await mongo.put_subscriptions(
        "default", [subscription("default", "h")], prune=False, now=START, actor="w"
    )
    await mongo.remove_subscriptions("default", None, now=START, actor="alice")
    (moved,) = await mongo.dead_letter_unsubscribed(now=clock.now(), limit=10)
    assert (moved.id, moved.service, moved.reason) == (
        dead_letter_id_for(item.id),
        "default",
        "subscription removed: default/h (by alice)",
    )
    assert [i.service for i in await mongo.list_retry(limit=10, offset=0)] == ["billing"]


async def test_dead_letters_back_filled_with_a_failure_group_get_their_services(
    mongo: MongoStore,
) -> None:
    clock = ManualClock(START)
    db = await mongo._database()
    letters = [dead(clock, 1, service="billing"), dead(clock, 2)]
    for letter in letters:
        doc = dead_letter_document(letter)
        del doc["failure_group"]
        await db.dead_letter_queue.insert_one(doc)
    await mongo.close()
    await mongo.connect()  # the back-fill runs on connect
    for letter in letters:
        where = DeadLetterFilter(failure_group=letter.failure_group)
        assert [d.id for d in await mongo.list_dead(where, limit=5, offset=0)] == [letter.id]
    assert letters[0].failure_group != letters[1].failure_group


async def test_a_layout_recorded_by_a_later_version_keeps_its_records_as_they_are() -> None:
    clock = ManualClock(START)
    item = pending(clock, 1)
    async with fresh_database() as (url, raw):
        await raw.retrybus_layout.insert_one({"_id": "layout", "version": 9})
        # layout 9 says this package (layout 3) can still use it
        await raw.retrybus_layout.insert_one({"_id": "compatible_from", "9": 3})
        await raw.retry_queue.insert_one(layout_2(retry_document(item)))
        async with MongoStore.from_url(url) as store:
            assert await store.get_retry(item.id) == item
        doc = await raw.retry_queue.find_one({"_id": item.id})
        assert "service" not in doc  # no step of an older layout ran
        assert await layout_version(raw) == 9


# indexes --------------------------------------------------------------------------------


async def test_the_service_collections_and_indexes_exist(mongo: MongoStore) -> None:
    db = await mongo._database()

    async def keys(name: str) -> dict[tuple[tuple[str, int], ...], dict[str, Any]]:
        indexes = await db[name].index_information()
        return {tuple((k, int(v)) for k, v in i["key"]): i for i in indexes.values()}

    dead = await keys("dead_letter_queue")
    newest_first = (("created_at", -1), ("created_at_us", -1), ("_id", -1))
    assert (("service", 1), *newest_first) in dead
    subscriptions = await keys("retrybus_subscriptions")
    assert (("service", 1), ("handler_name", 1)) in subscriptions
    assert (("revision", 1),) in subscriptions
    workers = await keys("retrybus_workers")
    assert workers[(("last_seen", 1),)]["expireAfterSeconds"] == 24 * 3600
    assert await db.retrybus_layout.find_one({"_id": "subscriptions"}) == {
        "_id": "subscriptions",
        "revision": 0,
    }


async def test_a_stopped_services_backlog_is_not_read_by_another_services_claims(
    mongo: MongoStore,
) -> None:
    """2,000 records of a stopped service fall due before another service's own:
    its claims and next_due read only its records. On a real mongod: the plan is
    an index scan of (service, handler_name, next_retry, …) that examines only
    the other service's keys, even for a handler of the same name. On
    SecantusDB (which looks a query up by its first indexed field: the handler's
    name): no collection scan, and the backlog's handler is another."""
    clock = ManualClock(START)
    backlog = [pending(clock, n, "charge", "billing", due_in=-100 + n / 1000) for n in range(2000)]
    if REAL_MONGOD:  # the same handler name too
        backlog += [pending(clock, n, "pack", "billing", due_in=-100) for n in range(2000)]
    for start in range(0, len(backlog), 1000):
        await mongo.record_pending(backlog[start : start + 1000])
    mine = [pending(clock, 10_000 + n, "pack", "shipping", due_in=-10 + n) for n in range(5)]
    await mongo.record_pending(mine)

    assert await mongo.next_due(["pack"], service="shipping") == mine[0].next_retry
    assert await claim(mongo, clock, "shipping", ["pack"]) == sorted(i.id for i in mine)
    assert await claim(mongo, clock, "shipping") == []
    if REAL_MONGOD:
        db = await mongo._database()
        query = claim_candidates(clock.now(), ["pack"], "shipping")
        cursor = db.retry_queue.find(query).sort(CLAIM_ORDER).limit(10)
        stats = (await cursor.explain())["executionStats"]
        assert stats["totalKeysExamined"] <= 12, stats
        assert stats["totalDocsExamined"] <= 12, stats


async def test_a_claim_for_the_default_service_takes_what_has_no_service_or_handler(
    mongo: MongoStore,
) -> None:
    """A document without a handler name (damaged, or written by hand) is every
    handler's of its service: one without a service too is the default service's."""
    clock = ManualClock(START)
    db = await mongo._database()
    await db.retry_queue.insert_one({"_id": "retry_nameless", "next_retry": START})
    assert await claim(mongo, clock, "billing", ["h"]) == []
    assert await mongo.next_due(["h"], service="billing") is None
    assert await mongo.next_due(["h"], service="default") == START
    assert await claim(mongo, clock, "default", ["h"]) == ["retry_nameless"]


# subscriptions and heartbeats -----------------------------------------------------


async def test_a_subscription_is_a_document_named_service_slash_handler(
    mongo: MongoStore,
) -> None:
    await mongo.put_subscriptions(
        "billing",
        [subscription("billing", "charge", big=2**70, versions=[1, 2])],
        prune=False,
        now=START,
        actor="w",
    )
    db = await mongo._database()
    doc = await db.retrybus_subscriptions.find_one({"_id": "billing/charge"})
    assert doc is not None
    assert (doc["service"], doc["handler_name"], doc["patterns"], doc["revision"]) == (
        "billing",
        "charge",
        ["order.*"],
        1,
    )
    assert doc["removed_at"] is None
    assert "details_json" in doc  # 2**70 does not fit BSON: kept exactly as JSON text
    (stored,) = await mongo.list_subscriptions()
    assert stored.details == {"big": 2**70, "versions": [1, 2]}
    revision = await db.retrybus_layout.find_one({"_id": "subscriptions"})
    assert revision == {"_id": "subscriptions", "revision": 1}


async def test_details_that_are_not_json_are_refused_before_anything_is_written(
    mongo: MongoStore,
) -> None:
    # refused as the memory store refuses them (encode_json: TypeError)
    with pytest.raises(TypeError, match="details of refund"):
        await mongo.put_subscriptions(
            "billing",
            [subscription("billing", "charge"), subscription("billing", "refund", x=float("nan"))],
            prune=False,
            now=START,
            actor="w",
        )
    assert await mongo.list_subscriptions(removed=True) == []
    assert await mongo.subscriptions_revision() == 0


@pytest.mark.parametrize("transactions", [True, False], ids=["transactions", "standalone"])
async def test_concurrent_writes_of_subscriptions_each_move_the_revision_on(
    transactions: bool,
) -> None:
    """Four store objects (four processes) register at once: every row is
    written, and the revision moves on once per write. In transactions each
    write has a revision of its own; without them, two may share one."""
    context = open_test_store() if transactions else open_test_store(transactions=False)
    async with context as first:
        if transactions and not first._transactions:
            pytest.skip("the server has no transactions")
        others = [
            MongoStore.from_url(database_url(first.database_name, timeout="10")) for _ in range(3)
        ]
        for other in others:
            other._want_transactions = transactions
        try:
            stores = [first, *others]
            await asyncio.gather(
                *(
                    store.put_subscriptions(
                        f"service-{n}",
                        [subscription(f"service-{n}", "h")],
                        prune=False,
                        now=START,
                        actor="w",
                    )
                    for n, store in enumerate(stores)
                )
            )
        finally:
            for other in others:
                await other.close()
        stored = await first.list_subscriptions()
        assert [s.service for s in stored] == [f"service-{n}" for n in range(4)]
        assert await first.subscriptions_revision() == 4
        revisions = sorted(s.revision for s in stored)
        if transactions:
            assert revisions == [1, 2, 3, 4]
        else:
            assert all(1 <= revision <= 4 for revision in revisions)


async def test_a_heartbeat_is_a_document_named_by_the_worker(mongo: MongoStore) -> None:
    beat = WorkerBeat(
        name="host-1:4242:ab12",
        service="billing",
        host="host-1",
        pid=4242,
        started_at=START,
        last_seen=START + timedelta(microseconds=123),
        interval=10.0,
        lanes=8,
        lanes_busy=2,
        handlers=("charge",),
        version="1.2.3",
    )
    await mongo.beat(beat)
    await mongo.beat(beat)
    db = await mongo._database()
    doc = await db.retrybus_workers.find_one({"_id": beat.name})
    assert doc is not None
    assert (doc["service"], doc["last_seen"], doc["last_seen_us"], doc["handlers"]) == (
        "billing",
        START,
        123,
        ["charge"],
    )
    assert await mongo.list_workers() == [beat]
    assert await mongo.prune_workers(beat.last_seen) == 0
    assert await mongo.prune_workers(beat.last_seen + timedelta(microseconds=1)) == 1


# the sweep of a removed handler's records --------------------------------------------


async def test_the_sweep_leaves_a_record_claimed_meanwhile_to_its_worker(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    items = [pending(clock, n, service="billing", due_in=-10 + n) for n in range(3)]
    await mongo.record_pending(items)
    await mongo.put_subscriptions(
        "billing", [subscription("billing", "h")], prune=False, now=START, actor="w"
    )
    await mongo.remove_subscriptions("billing", None, now=START, actor="alice")
    db = await mongo._database()
    move = MongoStore._move
    stolen: list[str] = []

    async def a_worker_claims_first(self: MongoStore, *args: Any) -> bool:
        if not stolen:  # between the read and the move, a worker claims the first
            stolen.append(items[0].id)
            lease = {"lease_owner": "worker", "lease_until": START + timedelta(days=1)}
            await db.retry_queue.update_one({"_id": items[0].id}, {"$set": lease})
        return await move(self, *args)

    monkeypatch.setattr(MongoStore, "_move", a_worker_claims_first)
    moved = await mongo.dead_letter_unsubscribed(now=clock.now(), limit=10)
    assert sorted(d.event_id for d in moved) == ["event-1", "event-2"]
    assert [i.id for i in await mongo.list_retry(limit=10, offset=0)] == [items[0].id]
    assert await mongo.dead_letter_unsubscribed(now=clock.now(), limit=10) == []
    assert (await mongo.counters()).retry_dead_lettered == 2


async def test_without_transactions_the_sweep_and_the_subscriptions_work_alike(
    standalone: MongoStore,
) -> None:
    clock = ManualClock(START)
    items = [pending(clock, n, service="billing", due_in=-n) for n in range(3)]
    await standalone.record_pending([*items, pending(clock, 9, service="shipping")])
    await standalone.put_subscriptions(
        "billing", [subscription("billing", "h")], prune=False, now=START, actor="w"
    )
    assert await standalone.put_subscriptions(
        "billing", [], prune=True, now=START, actor="deploy"
    ) == Registration(removed=("h",))
    assert await standalone.subscriptions_revision() == 2
    first = await standalone.dead_letter_unsubscribed(now=clock.now(), limit=2)
    assert [d.event_id for d in first] == ["event-2", "event-1"]  # due first
    rest = await standalone.dead_letter_unsubscribed(now=clock.now(), limit=10)
    assert [d.reason for d in rest] == ["subscription removed: billing/h (by deploy)"]
    assert [i.service for i in await standalone.list_retry(limit=10, offset=0)] == ["shipping"]
