"""Ordering keys in the MongoDB store: a keyed record is claimed only while no
earlier record of its (service, handler, key) is in the retry queue.

A keyed record's document has ``ordering_key``, ``ordering_sequence`` (from a
counter document, ``$inc`` by the batch's size) and, while an earlier record of
its group may hold it back, ``ordering_blocked: true``: claims and ``next_due``
skip blocked documents (``queries.claim_candidates``: ``ordering_blocked`` null or
missing, a plain value). Every keyed record is written blocked; after each write
or removal of keyed records, ``unblock`` clears the flag of the head of each group
it touched (its record with the lowest sequence). Computed from what is stored,
it needs no transaction: of a write and a removal racing on one group, the one
that finishes last sees the other's change and unblocks the right head.

A group stays blocked only if a process dies between its write and its
``unblock``, or a process that predates ordering keys removes a head (it claims
keyed records without looking at the flag, and unblocks nothing): ``heal``
(run with the expiry sweep) unblocks the head of every group that has blocked
records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ..._ordering import ordering_key_of
from ..._records import DeadLetterItem, RetryItem
from .common import LAYOUT, Doc

__all__ = ["BLOCKED", "Group", "groups_of", "heal", "number", "unblock"]

#: the field set on a keyed record while an earlier one may hold it back
BLOCKED = "ordering_blocked"
#: the ``_id`` in ``LAYOUT`` of the counter that numbers keyed records
_SEQUENCE = "ordering_sequence"

#: (service, handler name, ordering key)
Group = tuple[str, str, str]


def groups_of(items: Iterable[RetryItem | DeadLetterItem]) -> set[Group]:
    """The ordering groups of the keyed records among ``items``."""
    groups: set[Group] = set()
    for item in items:
        key = ordering_key_of(item.event_extensions)
        if key is not None:
            groups.add((item.service, item.handler_name, key))
    return groups


async def number(
    db: AsyncDatabase[Doc], items: Sequence[RetryItem], docs: Sequence[Doc]
) -> set[Group]:
    """Give the documents of the keyed ``items`` (``docs``, in the same order) their
    key, the next sequence numbers in order, and the blocked flag; returns their
    groups (to ``unblock`` once the documents are written)."""
    keyed = [
        (doc, key)
        for item, doc in zip(items, docs, strict=True)
        if (key := ordering_key_of(item.event_extensions)) is not None
    ]
    if not keyed:
        return set()
    counter = await db[LAYOUT].find_one_and_update(
        {"_id": _SEQUENCE},
        {"$inc": {"value": len(keyed)}},
        upsert=True,
        return_document=ReturnDocument.AFTER,
    )
    assert counter is not None  # an upsert returning the document after it
    first = int(counter["value"]) - len(keyed) + 1
    for offset, (doc, key) in enumerate(keyed):
        doc["ordering_key"] = key
        doc["ordering_sequence"] = first + offset
        doc[BLOCKED] = True
    return groups_of(items)


async def unblock(retry: AsyncCollection[Doc], groups: Iterable[Group]) -> None:
    """Clear the blocked flag of the head of each group (a no-op where it is clear,
    or the group is empty)."""
    for service, handler, key in groups:
        head = await retry.find_one(
            {"service": service, "handler_name": handler, "ordering_key": key},
            projection={BLOCKED: 1},
            sort=[("ordering_sequence", ASCENDING)],
        )
        if head is not None and head.get(BLOCKED):
            await retry.update_one({"_id": head["_id"], BLOCKED: True}, {"$unset": {BLOCKED: ""}})


async def heal(retry: AsyncCollection[Doc]) -> None:
    """``unblock`` every group that has a blocked record (see the module)."""
    pipeline: list[Doc] = [
        {"$match": {BLOCKED: True}},
        {"$group": {"_id": {"s": "$service", "h": "$handler_name", "k": "$ordering_key"}}},
    ]
    found: list[Any] = await (await retry.aggregate(pipeline)).to_list()
    await unblock(
        retry,
        [
            (doc["_id"]["s"], doc["_id"]["h"], doc["_id"]["k"])
            for doc in found
            if isinstance(doc["_id"].get("k"), str)
        ],
    )
