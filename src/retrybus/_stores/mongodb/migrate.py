"""The MongoDB store's set-up, run on every connect: the collections' indexes, the
upgrade of the layout to ``LAYOUT_VERSION``, and the back-fill of failure groups.

Collections and indexes follow the seed: ``retry_queue`` (``_id`` = ``retry_…``)
and ``dead_letter_queue`` (``_id`` = ``dlq_…``, TTL of 30 days on ``created_at``),
plus ``retrybus_counters`` (one document per running total) and
``retrybus_control`` (control records: ``_id`` = key, ``version``, ``value``).
Dead letters also have an index in their newest-first order (``created_at``,
``created_at_us``, ``_id``, all descending), which listing and keyset paging
(``DeadLetterFilter.cursor``) walk. Retry items also have one in a worker's
claim order within each handler (``handler_name``, ``next_retry``,
``next_retry_us``, ``_id``): a claim restricted to a worker's handlers walks
only their items, earliest first, however many of other handlers are due.

The layout has a version (``retrybus_layout``: ``{_id: "layout", version}``;
none recorded is version 1). Version 2 gives every retry item ``claims`` (the
claims made since its last outcome): items written before get ``claims: 0``
once, in one ``update_many``; an item without the field (written by an older
process meanwhile) still reads as 0, and a claim sets it. A database recorded
at a later version than this package knows is left as it is.

Each dead letter carries ``failure_group`` (``DeadLetterItem.failure_group``,
computed in Python when the dead letter is written or changed; indexed), so that
filtering and grouping by it are queries of the server. Dead letters written
before the field existed get it on connect (a back-fill in batches, repeated on
every connect, so that it also catches those an older process wrote meanwhile).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from .codec import failure_group_of
from .common import DEAD, LAYOUT, RETRY, Doc

__all__ = [
    "BACKFILL_BATCH",
    "DEAD_INDEXES",
    "DEAD_LETTER_TTL",
    "LAYOUT_VERSION",
    "RETRY_INDEXES",
    "layout_version",
    "set_up",
]

#: the version of the layout this package writes (1: before ``claims``)
LAYOUT_VERSION = 2
DEAD_LETTER_TTL = timedelta(days=30)
#: dead letters given a failure group per round trip (read at each back-fill: tunable)
BACKFILL_BATCH = 500

RETRY_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("next_retry", ASCENDING)], {}),
    ([("handler_name", ASCENDING)], {}),
    ([("next_retry", ASCENDING), ("attempt", ASCENDING)], {}),
    ([("created_at", ASCENDING)], {}),
    # a claim (and next_due) restricted to a worker's handlers: their items only,
    # in claim order (one range per handler, merged by the server)
    (
        [
            ("handler_name", ASCENDING),
            ("next_retry", ASCENDING),
            ("next_retry_us", ASCENDING),
            ("_id", ASCENDING),
        ],
        {},
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
    (
        [("created_at", ASCENDING)],
        {"expireAfterSeconds": int(DEAD_LETTER_TTL.total_seconds())},
    ),
]


async def set_up(db: AsyncDatabase[Doc]) -> None:
    """Create the indexes that are missing, upgrade the layout and back-fill
    failure groups (all idempotent: every connect runs them, and several
    processes may run them at once)."""
    await _create_indexes(db)
    await _upgrade_layout(db)
    await _backfill_failure_groups(db)


async def layout_version(db: AsyncDatabase[Doc]) -> int:
    """The layout version the database records (1 when it records none)."""
    doc = await db[LAYOUT].find_one({"_id": "layout"})
    version = None if doc is None else doc.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


async def _upgrade_layout(db: AsyncDatabase[Doc]) -> None:
    """Bring the layout up to ``LAYOUT_VERSION`` (each step safe to repeat)."""
    if await layout_version(db) >= LAYOUT_VERSION:
        return
    # version 2: every retry item counts its claims (none made yet)
    await db[RETRY].update_many({"claims": {"$exists": False}}, {"$set": {"claims": 0}})
    record = ({"_id": "layout"}, {"$max": {"version": LAYOUT_VERSION}})
    try:
        await db[LAYOUT].update_one(*record, upsert=True)
    except DuplicateKeyError:  # another process's upsert inserted it first
        await db[LAYOUT].update_one(*record)


async def _create_indexes(db: AsyncDatabase[Doc]) -> None:
    for keys, options in RETRY_INDEXES:
        await db[RETRY].create_index(keys, **options)
    for keys, options in DEAD_INDEXES:
        await db[DEAD].create_index(keys, **options)


async def _backfill_failure_groups(db: AsyncDatabase[Doc]) -> None:
    """Give ``failure_group`` to the dead letters that lack it (written before the
    field existed, or by hand), in batches by id."""
    batch = BACKFILL_BATCH
    dead = db[DEAD]
    after: Any = None
    projection = {"handler_name": 1, "error_type": 1, "error": 1}
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
