"""The MongoDB store's set-up, run on every connect: the collections' indexes, the
upgrade of the layout to ``LAYOUT_VERSION``, and the back-fill of failure groups.

Collections and indexes follow the seed: ``retry_queue`` (``_id`` = ``retry_…``)
and ``dead_letter_queue`` (``_id`` = ``dlq_…``),
plus ``retrybus_counters`` (one document per running total) and
``retrybus_control`` (control records: ``_id`` = key, ``version``, ``value``).
Dead letters also have an index in their newest-first order (``created_at``,
``created_at_us``, ``_id``, all descending), which listing and keyset paging
(``DeadLetterFilter.cursor``) walk, and one in that order within each service.
Retry items also have one in a worker's claim order within each service and
handler (``service``, ``handler_name``, ``next_retry``, ``next_retry_us``,
``_id``): a claim restricted to a service's handlers walks only their items,
earliest first, however many of other handlers or services are due (a stopped
service's backlog is never read by another's claims).

Services (issue 12) have two collections of their own: ``retrybus_subscriptions``
(one document per service and handler, ``_id`` ``"SERVICE/HANDLER"``, which is
unambiguous because a service name holds no ``/``; tombstones included) and
``retrybus_workers`` (one heartbeat per worker name, TTL of a day on
``last_seen``). The subscriptions' revision is a document of ``retrybus_layout``,
``{_id: "subscriptions", revision}``, moved on after the rows are written.

The layout has a version (``retrybus_layout``: ``{_id: "layout", version}``;
none recorded is version 1). Version 2 gives every retry item ``claims`` (the
claims made since its last outcome): items written before get ``claims: 0``
once, in one ``update_many``; an item without the field (written by an older
process meanwhile) still reads as 0, and a claim sets it. Version 3 gives every
retry item and dead letter ``service``: those written before get ``"default"``
once, in one ``update_many`` per collection; one without the field (written by
a layout-2 process meanwhile) still reads as one of the default service, and
queries for the default service match a missing field too. Its claim index
replaces layout 2's (``handler_name``, ``next_retry``, …), which is dropped
once the new one exists (on every connect: a layout-2 process that connects
meanwhile creates it again). Each layout records its compatible-from (the oldest
layout whose code can still use it, ``retrybus_layout``: ``{_id:
"compatible_from", "<layout>": version}``; ``_stores/_compatibility.py``): a
database recorded at a later layout than this package knows is left as it is
when that layout is compatible from this one or earlier, and refused otherwise.

Dead letters have no TTL index: they are deleted after the bus's
``dead_letter_retention`` (None: never) by the workers' maintenance
(``dead_letters.cleanup``), as on every engine. Earlier releases had a fixed
30-day TTL on ``created_at``, which deleted the dead letters of a bus keeping
them longer: a connect drops it (every connect, as a process of an earlier
release creates it again meanwhile).

Each dead letter carries ``failure_group`` (``DeadLetterItem.failure_group``,
computed in Python when the dead letter is written or changed; indexed), so that
filtering and grouping by it are queries of the server. Dead letters written
before the field existed get it on connect (a back-fill in batches, repeated on
every connect, so that it also catches those an older process wrote meanwhile).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure

from ..._services import DEFAULT_SERVICE
from .._compatibility import check_later_version, compatible_from
from .codec import failure_group_of
from .common import DEAD, INBOX, LAYOUT, RETRY, REVISION, SUBSCRIPTIONS, WORKERS, Doc

__all__ = [
    "BACKFILL_BATCH",
    "COMPATIBLE_FROM",
    "DEAD_INDEXES",
    "INBOX_INDEXES",
    "LAYOUT_VERSION",
    "RETIRED_DEAD_TTL",
    "RETIRED_RETRY_INDEXES",
    "RETRY_INDEXES",
    "SUBSCRIPTION_INDEXES",
    "WORKER_INDEXES",
    "WORKER_TTL",
    "layout_version",
    "set_up",
]

#: the version of the layout this package writes (1: before ``claims``; 2: before
#: ``service``)
LAYOUT_VERSION = 3
#: the oldest layout whose code can still use a database of LAYOUT_VERSION
#: (``_stores/_compatibility.py``): a process of layout 2 keeps working, its
#: records without ``service`` read as the default service's
COMPATIBLE_FROM = 2
#: the ``_id`` in ``retrybus_layout`` of ``{"<layout>": compatible-from, …}``
COMPATIBILITY = "compatible_from"
#: the keys of the fixed dead letter TTL index of earlier releases: dropped on connect
RETIRED_DEAD_TTL: list[tuple[str, int]] = [("created_at", ASCENDING)]
#: how long a heartbeat outlives its worker's last beat (workers prune sooner)
WORKER_TTL = timedelta(days=1)
_INDEX_NOT_FOUND = 27
#: dead letters given a failure group per round trip (read at each back-fill: tunable)
BACKFILL_BATCH = 500

RETRY_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("next_retry", ASCENDING)], {}),
    ([("handler_name", ASCENDING)], {}),
    ([("next_retry", ASCENDING), ("attempt", ASCENDING)], {}),
    ([("created_at", ASCENDING)], {}),
    # a claim (and next_due) restricted to a service's handlers: their items
    # only, in claim order (one range per handler, merged by the server)
    (
        [
            ("service", ASCENDING),
            ("handler_name", ASCENDING),
            ("next_retry", ASCENDING),
            ("next_retry_us", ASCENDING),
            ("_id", ASCENDING),
        ],
        {},
    ),
    # the records of an ordering key in order: the head of each (``ordering.unblock``)
    (
        [
            ("service", ASCENDING),
            ("handler_name", ASCENDING),
            ("ordering_key", ASCENDING),
            ("ordering_sequence", ASCENDING),
        ],
        {"partialFilterExpression": {"ordering_key": {"$exists": True}}},
    ),
]
DEAD_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("created_at", DESCENDING)], {}),
    # the newest-first order itself: listing and keyset paging walk it and stop
    ([("created_at", DESCENDING), ("created_at_us", DESCENDING), ("_id", DESCENDING)], {}),
    ([("processed", ASCENDING)], {}),
    ([("event_type", ASCENDING)], {}),
    ([("failure_group", ASCENDING)], {}),
    ([("handler_name", ASCENDING)], {}),
    # one service's dead letters, newest first
    (
        [
            ("service", ASCENDING),
            ("created_at", DESCENDING),
            ("created_at_us", DESCENDING),
            ("_id", DESCENDING),
        ],
        {},
    ),
]
#: indexes of an earlier layout that a later one replaced: dropped once the new exist
RETIRED_RETRY_INDEXES: list[list[tuple[str, int]]] = [
    # layout 2's claim order within each handler (now within each service first)
    [
        ("handler_name", ASCENDING),
        ("next_retry", ASCENDING),
        ("next_retry_us", ASCENDING),
        ("_id", ASCENDING),
    ],
]
SUBSCRIPTION_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    # listing, by service then handler
    ([("service", ASCENDING), ("handler_name", ASCENDING)], {}),
    ([("revision", ASCENDING)], {}),
    # the tombstones (the sweeps read them)
    ([("removed_at", ASCENDING)], {}),
]
WORKER_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("service", ASCENDING), ("_id", ASCENDING)], {}),
    ([("last_seen", ASCENDING)], {"expireAfterSeconds": int(WORKER_TTL.total_seconds())}),
]

#: the inbox's remembered successes: the server deletes them once ``until`` has
#: passed (its TTL monitor runs about once a minute: reads test ``until_at`` too),
#: and the worker's maintenance sweeps them by ``until_at``
INBOX_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("until", ASCENDING)], {"expireAfterSeconds": 0}),
    ([("until_at", ASCENDING)], {}),
]


async def set_up(db: AsyncDatabase[Doc], *, name: str = "MongoDB store") -> None:
    """Create the indexes that are missing, upgrade the layout and back-fill
    failure groups (all idempotent: every connect runs them, and several
    processes may run them at once). A database of a later layout is used when
    that layout is compatible from ``LAYOUT_VERSION`` or earlier, and refused
    (``StoreUnusable``, naming the store as ``name``) otherwise."""
    version = await layout_version(db)
    if version > LAYOUT_VERSION:
        check_later_version(
            name, version, LAYOUT_VERSION, await _recorded_compatible_from(db, version)
        )
    await _create_indexes(db)
    await _upgrade_layout(db)
    await _backfill_failure_groups(db)
    await _create_revision(db)


async def layout_version(db: AsyncDatabase[Doc]) -> int:
    """The layout version the database records (1 when it records none)."""
    doc = await db[LAYOUT].find_one({"_id": "layout"})
    version = None if doc is None else doc.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


async def _upgrade_layout(db: AsyncDatabase[Doc]) -> None:
    """Bring the layout up to ``LAYOUT_VERSION`` (each step safe to repeat)."""
    version = await layout_version(db)
    if version > LAYOUT_VERSION:
        return
    if version == LAYOUT_VERSION:
        if await _recorded_compatible_from(db, version) is None:
            await _record_compatible_from(db)
        return
    if version < 2:  # every retry item counts its claims (none made yet)
        await db[RETRY].update_many({"claims": {"$exists": False}}, {"$set": {"claims": 0}})
    if version < 3:  # every record is of a service: those before services, the default
        for name in (RETRY, DEAD):
            await db[name].update_many(
                {"service": {"$exists": False}}, {"$set": {"service": DEFAULT_SERVICE}}
            )
    record = ({"_id": "layout"}, {"$max": {"version": LAYOUT_VERSION}})
    try:
        await db[LAYOUT].update_one(*record, upsert=True)
    except DuplicateKeyError:  # another process's upsert inserted it first
        await db[LAYOUT].update_one(*record)
    await _record_compatible_from(db)


async def _recorded_compatible_from(db: AsyncDatabase[Doc], version: int) -> int | None:
    """The compatible-from recorded for layout ``version``; None when there is none."""
    doc = await db[LAYOUT].find_one({"_id": COMPATIBILITY})
    recorded = None if doc is None else doc.get(str(version))
    return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None


async def _record_compatible_from(db: AsyncDatabase[Doc]) -> None:
    """Record this layout's compatible-from, unless recorded already."""
    field = str(LAYOUT_VERSION)
    with contextlib.suppress(DuplicateKeyError):  # the document exists: the field too
        await db[LAYOUT].update_one(
            {"_id": COMPATIBILITY, field: {"$exists": False}},
            {"$set": {field: compatible_from(COMPATIBLE_FROM, LAYOUT_VERSION)}},
            upsert=True,
        )


async def _create_revision(db: AsyncDatabase[Doc]) -> None:
    """The subscriptions' revision document, at 0 (so that a write of subscriptions
    in a transaction moves it on without inserting it)."""
    with contextlib.suppress(DuplicateKeyError):  # another process's upsert came first
        await db[LAYOUT].update_one(
            {"_id": REVISION}, {"$setOnInsert": {"revision": 0}}, upsert=True
        )


async def _create_indexes(db: AsyncDatabase[Doc]) -> None:
    """Create the indexes that are missing, then drop the retired ones still there
    (the new ones exist by then: claims never go without an index)."""
    for collection, indexes in (
        (RETRY, RETRY_INDEXES),
        (DEAD, DEAD_INDEXES),
        (SUBSCRIPTIONS, SUBSCRIPTION_INDEXES),
        (WORKERS, WORKER_INDEXES),
        (INBOX, INBOX_INDEXES),
    ):
        for keys, options in indexes:
            await db[collection].create_index(keys, **options)
    async for index in await db[RETRY].list_indexes():
        if _keys(index) in RETIRED_RETRY_INDEXES:
            await _drop_index(db, RETRY, index["name"])
    async for index in await db[DEAD].list_indexes():
        if _keys(index) == RETIRED_DEAD_TTL and "expireAfterSeconds" in index:
            await _drop_index(db, DEAD, index["name"])


def _keys(index: Mapping[str, Any]) -> list[tuple[str, int]]:
    return [(str(name), int(direction)) for name, direction in index["key"].items()]


async def _drop_index(db: AsyncDatabase[Doc], collection: str, name: str) -> None:
    try:
        await db[collection].drop_index(name)
    except OperationFailure as exc:
        if exc.code != _INDEX_NOT_FOUND:  # another process dropped it first
            raise


async def _backfill_failure_groups(db: AsyncDatabase[Doc]) -> None:
    """Give ``failure_group`` to the dead letters that lack it (written before the
    field existed, or by hand), in batches by id."""
    batch = BACKFILL_BATCH
    dead = db[DEAD]
    after: Any = None
    projection = {"handler_name": 1, "error_type": 1, "error": 1, "service": 1}
    while True:
        query: Doc = {"failure_group": None}
        if after is not None:
            query["_id"] = {"$gt": after}
        docs = (
            await dead.find(query, projection=projection)
            .sort("_id", ASCENDING)
            .limit(batch)
            .to_list()
        )
        if not docs:
            return
        await dead.bulk_write(
            [
                UpdateOne(
                    {"_id": doc["_id"], "failure_group": None},
                    {"$set": {"failure_group": failure_group_of(doc)}},
                )
                for doc in docs
            ],
            ordered=False,
        )
        if len(docs) < batch:
            return
        after = docs[-1]["_id"]
