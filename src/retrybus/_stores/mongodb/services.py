"""The MongoDB store's services part (issue 12): the subscriptions each service
keeps (``retrybus_subscriptions``), its workers' heartbeats (``retrybus_workers``)
and what waits for each of its handlers (``service_loads``).

``MongoServices`` is a mixin that ``MongoStore`` inherits; it reaches the database
only through the store's own helpers, which it declares (as ``MongoAdmin`` does).
The sweep of what waits for a removed handler (``dead_letter_unsubscribed``) moves
records to the dead letter queue, as ``expire_retry`` does: it is in ``store``.

Atomicity. A write of subscriptions (``put_subscriptions``,
``remove_subscriptions``) reads the service's rows and the revision, writes the
rows that change (each with the next revision), then moves the revision on
(``$inc`` of ``{_id: "subscriptions", revision}`` in ``retrybus_layout``), after
the rows: a publisher that sees the new revision finds the rows written. Where
the server has transactions this is one transaction (two concurrent writes
conflict on the revision document, and one runs again). Without them (a
standalone server) it is not one step: the rows are written one by one, and two
concurrent writes may both give their rows the same revision; the store's
revision still moves on once per write, after its rows, so it never goes back
and a publisher never misses a change.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from pymongo import ASCENDING, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from ..._services import (
    HandlerLoad,
    Registration,
    StoredSubscription,
    WorkerBeat,
    check_subscriptions,
    compare_subscriptions,
)
from ..base import ServiceStore
from .codec import (
    subscription_document,
    subscription_from_document,
    subscription_id,
    time_fields,
    worker_document,
    worker_from_document,
)
from .common import DEAD, LAYOUT, RETRY, REVISION, SUBSCRIPTIONS, WORKERS, Doc, Session
from .queries import dead_loads_pipeline, earlier, read_moment, retry_loads_pipeline

__all__ = ["MongoServices", "read_revision"]

T = TypeVar("T")
_BY_SERVICE = [("service", ASCENDING), ("handler_name", ASCENDING)]


async def read_revision(db: AsyncDatabase[Doc], session: Session = None) -> int:
    """The subscriptions' revision (0: none written yet)."""
    doc = await db[LAYOUT].find_one({"_id": REVISION}, session=session)
    value = None if doc is None else doc.get("revision")
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


async def _move_revision_on(db: AsyncDatabase[Doc], session: Session) -> None:
    """Add one to the subscriptions' revision (after the rows it covers are written)."""
    await db[LAYOUT].update_one(
        {"_id": REVISION}, {"$inc": {"revision": 1}}, upsert=True, session=session
    )


class MongoServices(ServiceStore):
    """The services part of ``MongoStore`` (``ServiceStore`` but the sweep)."""

    # the store's helpers this part uses (``MongoStore`` implements them) ---------

    @abc.abstractmethod
    async def _database(self) -> AsyncDatabase[Doc]:
        """The database, connected on first use."""

    @abc.abstractmethod
    def _errors(self) -> AbstractAsyncContextManager[AsyncDatabase[Doc]]:
        """The database; pymongo's errors raised as retrybus's."""

    @abc.abstractmethod
    async def _atomically(self, operation: Callable[[Session], Awaitable[T]]) -> T:
        """``operation`` as one step (in a transaction where the server has them)."""

    # subscriptions -----------------------------------------------------------

    async def put_subscriptions(
        self,
        service: str,
        subscriptions: Sequence[StoredSubscription],
        *,
        prune: bool,
        now: datetime,
        actor: str,
    ) -> Registration:
        check_subscriptions(service, subscriptions)
        # details that are not JSON are refused before anything is written
        for terms in subscriptions:
            subscription_document(terms)

        async def run(session: Session) -> Registration:
            db = await self._database()
            rows = db[SUBSCRIPTIONS]
            stored = {
                doc["handler_name"]: subscription_from_document(doc)
                for doc in await rows.find({"service": service}, session=session).to_list()
            }
            revision = await read_revision(db, session) + 1
            changes = compare_subscriptions(stored, subscriptions, prune=prune)
            writes = [
                replace(
                    terms,
                    registered_at=now if since is None else since,
                    updated_at=now,
                    removed_at=None,
                    removed_by=None,
                    revision=revision,
                )
                for terms, since in changes.puts
            ] + [
                replace(
                    stored[name],
                    removed_at=now,
                    removed_by=actor,
                    updated_at=now,
                    revision=revision,
                )
                for name in changes.removed
            ]
            if writes:
                await rows.bulk_write(
                    [
                        ReplaceOne(
                            {"_id": subscription_id(write.service, write.handler_name)},
                            subscription_document(write),
                            upsert=True,
                        )
                        for write in writes
                    ],
                    ordered=False,
                    session=session,
                )
                await _move_revision_on(db, session)
            return changes.registration

        return await self._atomically(run)

    async def remove_subscriptions(
        self, service: str, handlers: Collection[str] | None, *, now: datetime, actor: str
    ) -> list[str]:
        live: Doc = {"service": service, "removed_at": None}
        if handlers is not None:
            live["handler_name"] = {"$in": sorted(set(handlers))}

        async def run(session: Session) -> list[str]:
            db = await self._database()
            rows = db[SUBSCRIPTIONS]
            found = await rows.find(live, {"handler_name": 1}, session=session).to_list()
            if not found:
                return []
            revision = await read_revision(db, session) + 1
            tombstone = {
                **time_fields("removed_at", now),
                "removed_by": actor,
                **time_fields("updated_at", now),
                "revision": revision,
            }
            await rows.update_many(
                {"_id": {"$in": [doc["_id"] for doc in found]}, "removed_at": None},
                {"$set": tombstone},
                session=session,
            )
            await _move_revision_on(db, session)
            return sorted(str(doc["handler_name"]) for doc in found)

        return await self._atomically(run)

    async def list_subscriptions(
        self, service: str | None = None, *, removed: bool = False
    ) -> list[StoredSubscription]:
        query: Doc = {} if service is None else {"service": service}
        if not removed:
            query["removed_at"] = None
        async with self._errors() as db:
            docs = await db[SUBSCRIPTIONS].find(query).sort(_BY_SERVICE).to_list()
        return [subscription_from_document(doc) for doc in docs]

    async def subscriptions_revision(self) -> int:
        async with self._errors() as db:
            return await read_revision(db)

    async def forget_subscriptions(self, before: datetime) -> int:
        async with self._errors() as db:
            result = await db[SUBSCRIPTIONS].delete_many(earlier("removed_at", before))
        return result.deleted_count

    # heartbeats --------------------------------------------------------------

    async def beat(self, beat: WorkerBeat) -> None:
        doc = worker_document(beat)
        async with self._errors() as db:
            try:
                await db[WORKERS].replace_one({"_id": beat.name}, doc, upsert=True)
            except DuplicateKeyError:  # another upsert of this name inserted it first
                await db[WORKERS].replace_one({"_id": beat.name}, doc)

    async def forget_worker(self, name: str) -> bool:
        async with self._errors() as db:
            return bool((await db[WORKERS].delete_one({"_id": name})).deleted_count)

    async def list_workers(self, service: str | None = None) -> list[WorkerBeat]:
        query: Doc = {} if service is None else {"service": service}
        order = [("service", ASCENDING), ("_id", ASCENDING)]
        async with self._errors() as db:
            docs = await db[WORKERS].find(query).sort(order).to_list()
        return [worker_from_document(doc) for doc in docs]

    async def prune_workers(self, before: datetime) -> int:
        async with self._errors() as db:
            result = await db[WORKERS].delete_many(earlier("last_seen", before))
        return result.deleted_count

    # what waits --------------------------------------------------------------

    async def service_loads(self, now: datetime) -> list[HandlerLoad]:
        """Two aggregates, one per queue (each a consistent count of its own
        queue; a record moving between them in between may be counted in both
        or neither, as between any two reads)."""
        async with self._errors() as db:
            queued = await (await db[RETRY].aggregate(retry_loads_pipeline(now))).to_list()
            dead = await (await db[DEAD].aggregate(dead_loads_pipeline())).to_list()
        loads: dict[tuple[str, str], dict[str, Any]] = {}
        for doc in queued:
            oldest = doc.get("oldest")
            loads[_load_key(doc)] = {
                "pending": int(doc["pending"]),
                "scheduled": int(doc["scheduled"]),
                "retrying": int(doc["retrying"]),
                "leased": int(doc["leased"]),
                "oldest_pending_due": None if oldest is None else read_moment(oldest),
            }
        for doc in dead:
            entry = loads.setdefault(_load_key(doc), {})
            entry["dead_processed"] = int(doc["processed"])
            entry["dead_unprocessed"] = int(doc["unprocessed"])
        return [
            HandlerLoad(service=service, handler_name=handler_name, **counts)
            for (service, handler_name), counts in sorted(loads.items())
        ]


def _load_key(doc: Doc) -> tuple[str, str]:
    key = doc["_id"]
    return (str(key["service"]), str(key["handler_name"]))
