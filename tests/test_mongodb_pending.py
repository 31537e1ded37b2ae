"""Pending deliveries on MongoDB: what the conformance suite does not see.

The layout upgrade that gives retry items ``claims``; ``record_pending`` as one
unordered insert; claims restricted to a worker's handlers through an index and
leased by compare-and-set; and ``watch()``, a change stream on ``retry_queue``.

Runs against the session's SecantusDB server (tests/engines/mongodb.py), or a
real mongod when ``MONGODB_URI`` is set (a replica set, for the change streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, OperationFailure

from engines._common import unique_name
from engines.mongodb import database_url, drop_database, open_test_store, server_uri
from retrybus import Event, ManualClock, RecordRejected, RetryItem, StoreUnavailable
from retrybus._outcomes import Counters, DeadLettered, Rescheduled, Succeeded
from retrybus._records import ErrorInfo, delivery_id
from retrybus._stores.mongodb import MongoStore
from retrybus._stores.mongodb import store as store_module
from retrybus._stores.mongodb.codec import retry_document
from retrybus._stores.mongodb.migrate import LAYOUT_VERSION, layout_version
from retrybus._stores.mongodb.queries import claim_candidates

START = datetime(2025, 1, 7, 10, 0, 0, tzinfo=UTC)
#: how soon an idle worker must hear of a change made elsewhere (as on PostgreSQL)
WAKE_TARGET = 1.0
REAL_MONGOD = bool(os.environ.get("MONGODB_URI"))


@pytest.fixture
async def mongo() -> AsyncIterator[MongoStore]:
    async with open_test_store() as store:
        yield store


@contextlib.asynccontextmanager
async def second_store(first: MongoStore) -> AsyncIterator[MongoStore]:
    """Another store object (another process, as far as the server can tell) on
    the same database."""
    other = MongoStore.from_url(database_url(first.database_name, timeout="10"))
    async with other:
        yield other


def pending(
    clock: ManualClock,
    n: int = 1,
    handler: str = "h",
    *,
    owner: str | None = None,
    lease: float = 60.0,
    due_in: float = 0.0,
) -> RetryItem:
    """A first delivery not yet made: leased to ``owner`` (a durable publish) or,
    without one, due in ``due_in`` seconds (a deferred one)."""
    now = clock.now()
    event = Event("like.added", {"post_id": n}, source="social-service", id=f"event-{n}")
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
    return replace(item, lease_owner=owner, lease_until=now + timedelta(seconds=lease), claims=1)


async def claim(
    store: MongoStore,
    clock: ManualClock,
    *,
    owner: str = "w",
    limit: int = 100,
    handlers: list[str] | None = None,
    service: str | None = None,
) -> list[RetryItem]:
    now = clock.now()
    claimed = await store.claim_due(
        now=now,
        limit=limit,
        owner=owner,
        lease_until=now + timedelta(hours=1),
        service=service,
        handlers=handlers,
    )
    items = [record for record in claimed if isinstance(record, RetryItem)]
    assert len(items) == len(claimed)
    return items


def count_calls(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> list[str]:
    """Record every call of these ``AsyncCollection`` methods (each one command)."""
    calls: list[str] = []
    for name in names:
        original = getattr(AsyncCollection, name)

        def counting(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(AsyncCollection, name, counting)
    return calls


WRITES = ("insert_one", "insert_many", "update_one", "update_many", "bulk_write", "replace_one")


# the layout upgrade ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[tuple[str, AsyncMongoClient[dict[str, Any]]]]:
    """A database no store has set up yet, and a plain client on it."""
    name = unique_name()
    url = database_url(name, timeout="10")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server_uri(), tz_aware=True)
    try:
        yield url, client
    finally:
        await client.close()
        await drop_database(url, name)


def layout_1_document(item: RetryItem) -> dict[str, Any]:
    """A retry item as layout 1 wrote it: no ``claims`` (nor ``service``)."""
    doc = retry_document(item)
    del doc["claims"], doc["service"]
    return doc


async def test_items_of_layout_1_get_claims_0_and_the_layout_is_recorded() -> None:
    clock = ManualClock(START)
    async with fresh_database() as (url, client):
        name = url.rsplit("/", 1)[1].split("?")[0]
        raw = client[name]
        waiting = replace(pending(clock, 1), attempt=2)
        leased = pending(clock, 2, owner="old-worker")
        await raw.retry_queue.insert_many([layout_1_document(waiting), layout_1_document(leased)])
        assert await layout_version(raw) == 1

        async with MongoStore.from_url(url) as store:
            # layout 2, then layout 3 (every record of the default service) at once
            assert await layout_version(raw) == LAYOUT_VERSION == 3
            stored = await raw.retry_queue.find({}).sort("_id").to_list()
            assert [doc.get("claims") for doc in stored] == [0, 0]
            assert [doc.get("service") for doc in stored] == ["default", "default"]
            got = await store.get_retry(waiting.id)
            assert got == replace(waiting, claims=0)
            (claimed,) = await claim(store, clock)
            assert (claimed.id, claimed.claims, claimed.attempt) == (waiting.id, 1, 2)
            # the old worker's lease is given back: its claim was not counted, none to take back
            assert await store.release([leased.id], "old-worker") == 1
            assert (await store.get_retry(leased.id)) == replace(
                leased, lease_owner=None, lease_until=None, claims=0
            )

        # connecting again changes nothing
        async with MongoStore.from_url(url) as store:
            assert await layout_version(raw) == LAYOUT_VERSION
            assert (await store.get_retry(waiting.id)) == claimed


async def test_an_item_an_older_process_writes_later_reads_as_claims_0(mongo: MongoStore) -> None:
    clock = ManualClock(START)
    db = await mongo._database()
    item = pending(clock)
    await db.retry_queue.insert_one(layout_1_document(item))  # after the upgrade
    assert await mongo.get_retry(item.id) == item
    (claimed,) = await claim(mongo, clock, service="default")
    assert claimed.claims == 1
    assert await mongo.release([item.id], "w") == 1
    released = await mongo.get_retry(item.id)
    assert released is not None
    assert (released.claims, released.lease_owner) == (0, None)
    # an older process's lease on an item without the field: freed, claims not below 0
    await db.retry_queue.update_one(
        {"_id": item.id}, {"$set": {"lease_owner": "old"}, "$unset": {"claims": ""}}
    )
    assert await mongo.release([item.id], "old") == 1
    doc = await db.retry_queue.find_one({"_id": item.id})
    assert doc is not None
    assert (doc["lease_owner"], doc.get("claims")) == (None, None)


async def test_a_layout_recorded_by_a_later_version_is_left_alone() -> None:
    clock = ManualClock(START)
    async with fresh_database() as (url, client):
        name = url.rsplit("/", 1)[1].split("?")[0]
        raw = client[name]
        await raw.retrybus_layout.insert_one({"_id": "layout", "version": 9})
        # layout 9 says this package (layout 3) can still use it
        await raw.retrybus_layout.insert_one({"_id": "compatible_from", "9": 3})
        item = pending(clock)
        await raw.retry_queue.insert_one(layout_1_document(item))
        async with MongoStore.from_url(url) as store:
            assert await store.get_retry(item.id) == item
        assert await layout_version(raw) == 9
        doc = await raw.retry_queue.find_one({"_id": item.id})
        assert doc is not None
        assert "claims" not in doc  # no step of an older layout ran
        assert "service" not in doc


async def test_the_claim_index_leads_with_the_service_then_the_handler(mongo: MongoStore) -> None:
    db = await mongo._database()
    keys = [tuple(i["key"]) for i in (await db.retry_queue.index_information()).values()]
    claim_order = (("next_retry", 1), ("next_retry_us", 1), ("_id", 1))
    assert (("service", 1), ("handler_name", 1), *claim_order) in keys
    assert (("handler_name", 1), *claim_order) not in keys  # layout 2's, replaced


# record_pending --------------------------------------------------------------------


async def test_record_pending_is_one_insert_and_skips_what_is_stored(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    first = [pending(clock, n, owner="publisher") for n in range(0, 300, 3)]
    assert await mongo.record_pending(first) == {item.id for item in first}
    again = [pending(clock, n, due_in=60) for n in range(300)]  # a third already stored
    twice = pending(clock, 1000)
    calls = count_calls(monkeypatch, WRITES)
    added = await mongo.record_pending([*again, twice, twice])
    assert calls == ["insert_many"]
    assert added == {item.id for item in again[1::3] + again[2::3]} | {twice.id}
    assert await mongo.retry_count() == 301
    assert await mongo.get_retry(first[5].id) == first[5]  # as the first write left it
    assert await mongo.counters() == Counters()


async def test_record_pending_raises_what_is_not_a_duplicate(mongo: MongoStore) -> None:
    clock = ManualClock(START)
    item = pending(clock)
    # a document the server refuses for another reason: the write is not taken as done
    error = BulkWriteError(
        {
            "writeErrors": [
                {"index": 0, "code": 11000, "errmsg": "duplicate"},
                {"index": 1, "code": 121, "errmsg": "document failed validation"},
            ],
            "writeConcernErrors": [],
            "nInserted": 0,
        }
    )
    with pytest.raises(BulkWriteError):
        store_module._duplicates(error)
    only_duplicates = BulkWriteError(
        {"writeErrors": [{"index": 3, "code": 11000}], "writeConcernErrors": []}
    )
    assert store_module._duplicates(only_duplicates) == {3}

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise error

    too_large = BulkWriteError(
        {"writeErrors": [{"index": 1, "code": 10334, "errmsg": "BSONObjectTooLarge"}]}
    )

    async def refuse_as_too_large(*args: Any, **kwargs: Any) -> None:
        raise too_large

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AsyncCollection, "insert_many", refuse)
        with pytest.raises(StoreUnavailable, match="document failed validation"):
            await mongo.record_pending([item, pending(clock, 2)])
        patch.setattr(AsyncCollection, "insert_many", refuse_as_too_large)
        with pytest.raises(RecordRejected, match="BSONObjectTooLarge"):
            await mongo.record_pending([item, pending(clock, 2)])


async def test_a_pending_record_past_its_age_is_dead_lettered_as_attempt_0(
    mongo: MongoStore,
) -> None:
    clock = ManualClock(START)
    item = pending(clock, due_in=3600)
    await mongo.record_pending([item])
    clock.advance(10)
    # not before its time: only once due since before `before`
    assert await mongo.expire_retry(before=clock.now(), now=clock.now(), reason="x") == []
    clock.advance(3600)
    (dead,) = await mongo.expire_retry(before=clock.now(), now=clock.now(), reason="too old")
    assert (dead.attempt, dead.reason) == (0, "too old")


# complete: the successes of a durable publish ------------------------------------------


def count_sessions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every session the store's client starts (a transaction needs one)."""
    started: list[int] = []
    original = AsyncMongoClient.start_session

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        started.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncMongoClient, "start_session", counting)
    return started


async def test_successes_are_two_statements_fenced_and_no_transaction(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    firsts = [pending(clock, n, owner="p") for n in range(3)]
    retries = [replace(pending(clock, 10 + n, owner="p"), attempt=2) for n in range(2)]
    theirs = pending(clock, 20, owner="other")
    await mongo.record_pending([*firsts, *retries, theirs])
    calls = count_calls(monkeypatch, ("find", "find_one_and_delete", "delete_one", "delete_many"))
    sessions = count_sessions(monkeypatch)
    everything = [*firsts, *retries, theirs]
    applied = await mongo.complete([Succeeded(item) for item in everything], "p", clock.now())
    assert applied == {item.id for item in [*firsts, *retries]}
    assert calls == ["find", "delete_many"]
    assert sessions == []  # one document each: nothing for a killed process to leave open
    assert [item.id for item in await mongo.list_retry(limit=10, offset=0)] == [theirs.id]
    assert await mongo.counters() == Counters(retry_succeeded=2, retry_succeeded_attempts=4)


async def test_outcomes_with_a_move_to_the_dead_letter_queue_run_in_a_transaction(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not mongo._transactions:
        pytest.skip("the server has no transactions (a standalone server's code path)")
    clock = ManualClock(START)
    done, failed = pending(clock, 1, owner="p"), pending(clock, 2, owner="p")
    await mongo.record_pending([done, failed])
    sessions = count_sessions(monkeypatch)
    dead = failed.to_dead_letter(reason="non-retryable", now=clock.now(), attempt=0)
    outcomes = [Succeeded(done), DeadLettered(failed.id, dead, first_delivery=True)]
    assert await mongo.complete(outcomes, "p", clock.now()) == {done.id, failed.id}
    assert sessions == [1]
    assert await mongo.retry_count() == 0
    assert await mongo.get_dead(dead.id) == dead


async def test_a_success_taken_over_before_its_delete_is_not_applied(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the read of what the fence holds and the delete, another worker takes
    one over: it is left to its new holder, and not counted."""
    clock = ManualClock(START)
    items = [replace(pending(clock, n, owner="p"), attempt=1) for n in range(3)]
    await mongo.record_pending(items)
    async with second_store(mongo) as other:
        thief = await other._database()
        delete_many = AsyncCollection.delete_many
        runs: list[int] = []

        async def taken_over_first(self: Any, *args: Any, **kwargs: Any) -> Any:
            runs.append(1)
            if len(runs) == 1:
                await thief.retry_queue.update_one(
                    {"_id": items[0].id}, {"$set": {"lease_owner": "thief"}}
                )
            return await delete_many(self, *args, **kwargs)

        monkeypatch.setattr(AsyncCollection, "delete_many", taken_over_first)
        applied = await mongo.complete([Succeeded(item) for item in items], "p", clock.now())
    assert applied == {items[1].id, items[2].id}
    kept = await mongo.get_retry(items[0].id)
    assert kept is not None
    assert kept.lease_owner == "thief"
    assert await mongo.counters() == Counters(retry_succeeded=2, retry_succeeded_attempts=2)


# claims ------------------------------------------------------------------------------


async def test_a_claim_of_a_workers_handlers_is_not_slowed_by_other_handlers_due_first(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5,000 items of another handler fall due before the worker's own: a claim of
    its handlers (and next_due) reads only theirs. On a real mongod: the plan is
    an index scan of (service, handler_name, next_retry, …) with no blocking sort. On
    SecantusDB, whose explain mirrors only part of its planner (it reports a
    collection scan for any query with two ranges, yet runs this one on an
    index): no collection scan of ``retry_queue`` runs during the claim."""
    clock = ManualClock(START)
    others = [pending(clock, n, "mail.send", due_in=-100 + n / 1000) for n in range(5000)]
    for start in range(0, len(others), 1000):
        await mongo.record_pending(others[start : start + 1000])
    mine = [pending(clock, 10_000 + n, "billing.charge", due_in=-10 + n) for n in range(10)]
    await mongo.record_pending(mine)
    clock.advance(60)
    scans = [] if REAL_MONGOD else count_collection_scans(monkeypatch)

    assert await mongo.next_due(["billing.charge"], service="default") == mine[0].next_retry
    started = time.perf_counter()
    claimed = await claim(mongo, clock, limit=10, handlers=["billing.charge"], service="default")
    took = time.perf_counter() - started
    assert [item.id for item in claimed] == [item.id for item in mine]
    assert {item.claims for item in claimed} == {1}
    print(f"a claim of 10 behind 5,000 of another handler: {took * 1000:.1f} ms")
    assert scans == []

    if REAL_MONGOD:
        db = await mongo._database()
        query = claim_candidates(clock.now(), ["billing.charge"], "default")
        order = [("next_retry", 1), ("next_retry_us", 1), ("_id", 1)]
        plan = (await db.retry_queue.find(query).sort(order).limit(10).explain())["queryPlanner"]
        text = str(plan["winningPlan"])
        assert "IXSCAN" in text, text
        assert "service_1_handler_name_1_next_retry_1" in text, text
        assert "'SORT'" not in text, text  # the index gives the order: nothing to sort


def count_collection_scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The collections SecantusDB (in this process) scans whole from now on."""
    try:
        from secantus.storage import Storage
    except ImportError:
        pytest.skip("SecantusDB is not installed")
    scans: list[str] = []
    for name in ("_scan_docs", "_scan_docs_natural"):
        original = getattr(Storage, name, None)
        if original is None:
            pytest.skip(f"SecantusDB has no Storage.{name} any more: update this test")

        def scanning(self: Any, db: str, coll: str, _original: Any = original) -> Any:
            if coll == "retry_queue":
                scans.append(coll)
            return _original(self, db, coll)

        monkeypatch.setattr(Storage, name, scanning)
    return scans


async def test_a_claim_that_loses_an_item_to_another_claimer_takes_the_next(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    items = [pending(clock, n, due_in=-10 + n) for n in range(4)]
    await mongo.record_pending(items)
    db = await mongo._database()
    lease = MongoStore._lease
    stolen: list[str] = []

    async def another_claimer_first(retry: Any, docs: list[dict[str, Any]], fields: Any) -> Any:
        if not stolen:  # between the read and the compare-and-set, someone claims one
            stolen.append(docs[0]["_id"])
            await db.retry_queue.update_one(
                {"_id": docs[0]["_id"]},
                {"$set": {"lease_owner": "thief", "lease_until": START + timedelta(days=1)}},
            )
        return await lease(retry, docs, fields)

    monkeypatch.setattr(MongoStore, "_lease", staticmethod(another_claimer_first))
    claimed = await claim(mongo, clock, limit=3)
    assert stolen == [items[0].id]
    assert [item.id for item in claimed] == [item.id for item in items[1:]]
    assert [item.claims for item in claimed] == [1, 1, 1]
    for item in claimed:
        assert await mongo.get_retry(item.id) == item  # what it returned is what is stored
    thief = await db.retry_queue.find_one({"_id": items[0].id})
    assert thief is not None
    assert (thief["lease_owner"], thief["claims"]) == ("thief", 0)


async def test_a_document_without_a_handler_name_is_every_workers(mongo: MongoStore) -> None:
    """Damaged, or written by hand: no worker has its handler, so every worker
    claims it (and dead-letters it as undecodable) rather than leave it lingering."""
    clock = ManualClock(START)
    db = await mongo._database()
    due = START - timedelta(seconds=5)
    await db.retry_queue.insert_one({"_id": "retry_nameless", "next_retry": due})
    assert await mongo.next_due(["billing.charge"]) == due
    claimed = await mongo.claim_due(
        now=clock.now(),
        limit=10,
        owner="w",
        lease_until=clock.now() + timedelta(seconds=30),
        handlers=["billing.charge"],
    )
    assert [record.id for record in claimed] == ["retry_nameless"]
    assert await mongo.next_due([]) is None


async def test_a_lease_running_out_later_in_the_same_millisecond_is_not_claimable(
    mongo: MongoStore,
) -> None:
    clock = ManualClock(START + timedelta(microseconds=400))
    held = pending(clock, 1, due_in=-10)
    free = pending(clock, 2, due_in=-5)
    await mongo.record_pending(
        [replace(held, lease_owner="other", lease_until=clock.now() + timedelta(microseconds=1))]
    )
    await mongo.record_pending([free])
    (claimed,) = await claim(mongo, clock, limit=1)  # the held one comes first, and is passed
    assert claimed.id == free.id
    clock.advance(0.000001)
    (taken,) = await claim(mongo, clock, limit=1, owner="w2")
    assert (taken.id, taken.lease_owner, taken.claims) == (held.id, "w2", 1)


async def test_concurrent_claimers_never_share_an_item(mongo: MongoStore) -> None:
    clock = ManualClock(START)
    items = [pending(clock, n, f"h{n % 3}", due_in=-n / 100) for n in range(90)]
    await mongo.record_pending(items)
    async with second_store(mongo) as other, second_store(mongo) as third:
        stores = (mongo, other, third)
        got: dict[str, list[RetryItem]] = {}

        async def keep_claiming(n: int) -> None:
            store = stores[n]
            mine = got.setdefault(f"w{n}", [])
            while batch := await claim(store, clock, owner=f"w{n}", limit=7):
                mine += batch

        await asyncio.gather(*(keep_claiming(n) for n in range(3)))
    ids = [item.id for batch in got.values() for item in batch]
    assert sorted(ids) == sorted(item.id for item in items)
    assert {item.claims for batch in got.values() for item in batch} == {1}


# watching ----------------------------------------------------------------------------


class Wakes:
    """Counts ``on_change()`` calls and tells when the next one comes."""

    def __init__(self) -> None:
        self.count = 0
        self.at: list[float] = []
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.at.append(time.perf_counter())
        self._event.set()

    async def after(self, change: Callable[[], Any], within: float = WAKE_TARGET) -> float:
        """Make ``change`` and return how long until the next wake (fails after ``within``)."""
        self._event.clear()
        started = time.perf_counter()
        await change()
        await asyncio.wait_for(self._event.wait(), within)
        return time.perf_counter() - started

    async def first(self, within: float) -> None:
        """Wait for a wake (one that came already counts)."""
        await asyncio.wait_for(self._event.wait(), within)

    async def none_after(self, change: Callable[[], Any], quiet: float = 0.3) -> None:
        before = self.count
        await change()
        await asyncio.sleep(quiet)
        assert self.count == before


async def test_watch_wakes_for_a_deferred_delivery_recorded_elsewhere(
    mongo: MongoStore,
) -> None:
    clock = ManualClock(START)
    wakes = Wakes()
    stop = await mongo.watch(wakes)
    assert stop is not None
    try:
        async with second_store(mongo) as other:
            latencies = [
                await wakes.after(lambda n=n: other.record_pending([pending(clock, n, due_in=30)]))
                for n in range(20)
            ]
            # a durable publish's own records (leased to it) wake nobody
            await wakes.none_after(lambda: other.record_pending([pending(clock, 99, owner="p")]))
    finally:
        await stop()
    assert max(latencies) < WAKE_TARGET
    print(
        f"wake latency: median {statistics.median(latencies) * 1000:.1f} ms, max "
        f"{max(latencies) * 1000:.1f} ms over {len(latencies)}"
    )


async def test_watch_wakes_for_what_makes_an_item_claimable_and_not_for_claims(
    mongo: MongoStore,
) -> None:
    clock = ManualClock(START)
    item = pending(clock, due_in=30)
    wakes = Wakes()
    async with second_store(mongo) as other:
        await other.record_pending([item])
        stop = await mongo.watch(wakes)
        assert stop is not None
        try:
            clock.advance(30)  # it falls due: the worker knew when (next_due)
            await wakes.none_after(lambda: claim(other, clock))
            await wakes.none_after(
                lambda: other.extend_leases([item.id], "w", clock.now() + timedelta(hours=2))
            )
            await wakes.after(lambda: other.release([item.id], "w"))
            (claimed,) = await claim(other, clock)
            retry = claimed.rescheduled(
                attempt=1,
                next_retry=clock.now() + timedelta(seconds=5),
                error=ErrorInfo("boom", "RuntimeError"),
                now=clock.now(),
            )
            await wakes.after(
                lambda: other.complete([Rescheduled(retry, first_delivery=True)], "w", clock.now())
            )
        finally:
            await stop()


async def test_watch_opens_the_stream_again_when_it_is_lost(
    mongo: MongoStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(START)
    db = await mongo._database()
    wakes = Wakes()
    stop = await mongo.watch(wakes)
    assert stop is not None
    try:
        try:  # the next getMore of the stream fails, not resumable
            await db.client.admin.command(
                "configureFailPoint",
                "failCommand",
                mode={"times": 1},
                data={"failCommands": ["getMore"], "errorCode": 280},
            )
        except OperationFailure as exc:
            pytest.skip(f"the server has no failCommand fail point: {exc}")
        with caplog.at_level(logging.WARNING, logger="retrybus.store.mongodb"):
            # the stream is opened again at once, and wakes the worker for what it missed
            await wakes.first(within=5.0)
        assert "change stream" in caplog.text
        assert "lost" in caplog.text
        async with second_store(mongo) as other:
            await wakes.after(lambda: other.record_pending([pending(clock, due_in=30)]))
    finally:
        await stop()


async def test_watch_returns_none_where_the_server_has_no_change_streams(
    mongo: MongoStore, caplog: pytest.LogCaptureFixture
) -> None:
    db = await mongo._database()
    try:  # the server answers $changeStream as a standalone mongod does
        await db.client.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 1},
            data={"failCommands": ["aggregate"], "errorCode": 40573},
        )
    except OperationFailure as exc:
        pytest.skip(f"the server has no failCommand fail point: {exc}")
    with caplog.at_level(logging.DEBUG, logger="retrybus.store.mongodb"):
        assert await mongo.watch(lambda: None) is None
        assert await mongo.watch(lambda: None) is None  # not tried again, not said again
    said = [r for r in caplog.records if "no change streams" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]


async def test_closing_the_store_stops_its_watchers(mongo: MongoStore) -> None:
    stop = await mongo.watch(lambda: None)
    assert stop is not None
    (task,) = mongo._watchers
    await mongo.close()
    assert task.done()
    await stop()  # still safe
