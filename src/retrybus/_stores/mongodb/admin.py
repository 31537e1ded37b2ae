"""The MongoDB store's admin half: browsing, counting and grouping both queues,
changing, requeueing and deleting dead letters, and control records.

``MongoAdmin`` is a mixin that ``MongoStore`` inherits; it reaches the database
only through the store's own helpers, which it declares: ``_database``,
``_errors`` (pymongo's errors mapped to retrybus's), ``_atomically`` (a
transaction, or the safe order without one) and ``_count`` (the running totals).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, TypeVar

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from ..._event import encode_json
from ..._filters import DeadLetterFilter
from ..._groups import GroupCount
from ..._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from .._newest import check_limit, newest_first
from ..base import (
    AdminStore,
    ControlRecord,
    DeadLetterField,
    RetryField,
    check_retry_kind,
)
from . import ordering
from .codec import (
    control_from_document,
    dead_letter_from_document,
    json_update,
    retry_document,
    retry_from_document,
    time_fields,
)
from .common import CONTROL, DEAD, RETRY, Doc, Session
from .queries import (
    DEAD_GROUP_DEFAULTS,
    RETRY_GROUP_DEFAULTS,
    dead_letter_query,
    earlier,
    group_counts,
    group_pipeline,
    kind_counts_pipeline,
    kind_query,
    lease_free,
    newest_failures_pipeline,
    service_scope,
)

__all__ = ["MongoAdmin"]

T = TypeVar("T")
_DELETE_CHUNK = 1000


class MongoAdmin(AdminStore):
    """The admin half of ``MongoStore`` (everything in ``AdminStore``)."""

    # the store's helpers this half uses (``MongoStore`` implements them) ---------

    @abc.abstractmethod
    async def _database(self) -> AsyncDatabase[Doc]:
        """The database, connected on first use."""

    @abc.abstractmethod
    def _errors(self) -> AbstractAsyncContextManager[AsyncDatabase[Doc]]:
        """The database; pymongo's errors raised as retrybus's."""

    @abc.abstractmethod
    async def _atomically(self, operation: Callable[[Session], Awaitable[T]]) -> T:
        """``operation`` as one step (in a transaction where the server has them)."""

    @abc.abstractmethod
    async def _count(self, **deltas: int) -> None:
        """Add to the running totals."""

    # retry queue -----------------------------------------------------------

    async def retry_count(self) -> int:
        async with self._errors() as db:
            return await db[RETRY].count_documents({})

    async def count_due(self, before: datetime) -> int:
        async with self._errors() as db:
            return await db[RETRY].count_documents(earlier("next_retry", before))

    async def get_retry(self, item_id: str) -> RetryItem | None:
        async with self._errors() as db:
            doc = await db[RETRY].find_one({"_id": item_id})
        return None if doc is None else retry_from_document(doc)

    async def list_retry(
        self,
        *,
        limit: int,
        offset: int,
        handler_name: str | None = None,
        event_type: str | None = None,
        kind: RetryKind | None = None,
        now: datetime | None = None,
        service: str | None = None,
    ) -> list[RetryItem]:
        check_retry_kind(kind, now)
        if limit <= 0:
            return []
        query: Doc = {} if kind is None else kind_query(kind, now)
        if service is not None:
            query["service"] = service_scope(service)
        if handler_name is not None:
            query["handler_name"] = handler_name
        if event_type is not None:
            query["event_type"] = event_type
        async with self._errors() as db:
            docs = (
                await db[RETRY]
                .find(query)
                .sort([("next_retry", ASCENDING), ("next_retry_us", ASCENDING), ("_id", ASCENDING)])
                .skip(offset)
                .limit(limit)
                .to_list()
            )
        return [retry_from_document(doc) for doc in docs]

    async def count_retry_kinds(self, now: datetime) -> dict[RetryKind, int]:
        async with self._errors() as db:
            docs = await (await db[RETRY].aggregate(kind_counts_pipeline(now))).to_list()
        counted = docs[0] if docs else {}
        return {kind: int(counted.get(kind, 0)) for kind in RETRY_KINDS}

    async def find_retry_ids(self, prefix: str, *, limit: int) -> list[str]:
        if limit <= 0:
            return []
        # strings compare by their bytes here: ids with the prefix sort below prefix + U+FFFF
        query = {"_id": {"$gte": prefix, "$lt": prefix + "\uffff"}}
        async with self._errors() as db:
            docs = await db[RETRY].find(query, {"_id": 1}).sort("_id", 1).limit(limit).to_list()
        return [str(doc["_id"]) for doc in docs]

    async def cancel_delivery(self, item_id: str, *, now: datetime) -> bool:
        return await self._delete_retry({"_id": item_id, "attempt": 0, **lease_free(now)})

    async def delete_retry(self, item_id: str) -> bool:
        return await self._delete_retry({"_id": item_id})

    async def _delete_retry(self, query: Doc) -> bool:
        """Delete the record ``query`` matches, if any; the next record of its
        ordering key (if it has one) is no longer held back."""
        async with self._errors() as db:
            doc = await db[RETRY].find_one_and_delete(
                query, projection={"service": 1, "handler_name": 1, "ordering_key": 1}
            )
            if doc is None:
                return False
            key = doc.get("ordering_key")
            if isinstance(key, str):
                group = (str(doc.get("service")), str(doc.get("handler_name")), key)
                await ordering.unblock(db[RETRY], [group])
            return True

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        if by not in RETRY_GROUP_DEFAULTS:
            raise ValueError(f"cannot group retry items by {by!r}")
        if limit <= 0:
            return []
        pipeline = group_pipeline(
            {},
            by=by,
            default=RETRY_GROUP_DEFAULTS[by],
            moment="next_retry",
            newest=False,
            limit=limit,
        )
        async with self._errors() as db:
            docs = await (await db[RETRY].aggregate(pipeline)).to_list()
        return group_counts(docs, newest=False)

    async def newest_failures(self, *, service: str | None = None, limit: int) -> list[RetryItem]:
        check_limit(limit)
        pipeline = newest_failures_pipeline(service)
        async with self._errors() as db:
            groups = await (await db[RETRY].aggregate(pipeline)).to_list()
            ids = [group["newest"]["id"] for group in groups]
            docs = await db[RETRY].find({"_id": {"$in": ids}}).to_list() if ids else []
        return newest_first((retry_from_document(doc) for doc in docs), limit)

    # dead letter queue -----------------------------------------------------

    async def list_dead(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterItem]:
        if limit <= 0:
            return []
        order = [("created_at", DESCENDING), ("created_at_us", DESCENDING), ("_id", DESCENDING)]
        query = dead_letter_query(where)
        async with self._errors() as db:
            docs = await db[DEAD].find(query).sort(order).skip(offset).limit(limit).to_list()
        return [dead_letter_from_document(doc) for doc in docs]

    async def count_dead(self, where: DeadLetterFilter) -> int:
        async with self._errors() as db:
            return await db[DEAD].count_documents(dead_letter_query(where))

    async def group_dead(
        self, by: DeadLetterField, where: DeadLetterFilter, *, limit: int
    ) -> list[GroupCount]:
        if by not in DEAD_GROUP_DEFAULTS:
            raise ValueError(f"cannot group dead letters by {by!r}")
        if limit <= 0:
            return []
        pipeline = group_pipeline(
            dead_letter_query(where),
            by=by,
            default=DEAD_GROUP_DEFAULTS[by],
            moment="created_at",
            newest=True,
            limit=limit,
        )
        async with self._errors() as db:
            docs = await (await db[DEAD].aggregate(pipeline)).to_list()
        return group_counts(docs, newest=True)

    async def get_dead(self, item_id: str) -> DeadLetterItem | None:
        async with self._errors() as db:
            doc = await db[DEAD].find_one({"_id": item_id})
        return None if doc is None else dead_letter_from_document(doc)

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        if limit <= 0:
            return []
        # strings compare by their bytes here: ids with the prefix sort below prefix + U+FFFF
        query = {"_id": {"$gte": prefix, "$lt": prefix + "\uffff"}}
        async with self._errors() as db:
            docs = await db[DEAD].find(query, {"_id": 1}).sort("_id", 1).limit(limit).to_list()
        return [str(doc["_id"]) for doc in docs]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        metadata, unset_metadata = json_update("metadata", dict(item.metadata))
        data, unset_data = json_update("event_data", item.event_data)
        update: Doc = {
            "$set": {
                "error": item.error,
                "error_type": item.error_type,
                "traceback": item.traceback,
                "attempt": item.attempt,
                "processed": item.processed,
                **time_fields("processed_at", item.processed_at),
                **metadata,
                **data,
                "reason": item.reason,
                "failure_group": item.failure_group,  # a new error may change it
            }
        }
        if unset_metadata or unset_data:
            update["$unset"] = {**unset_metadata, **unset_data}
        async with self._errors() as db:
            result = await db[DEAD].update_one({"_id": item.id}, update)
        return bool(result.matched_count)

    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        doc = retry_document(retry_item)
        async with self._errors() as db:
            groups = await ordering.number(db, [retry_item], [doc])

        async def run(session: Session) -> bool:
            db = await self._database()
            if session is not None:
                if not (await db[DEAD].delete_one({"_id": item_id}, session=session)).deleted_count:
                    return False
                await db[RETRY].insert_one(doc, session=session)
                return True
            # without a transaction: add the retry item first, so nothing is lost
            await db[RETRY].insert_one(doc)
            if (await db[DEAD].delete_one({"_id": item_id})).deleted_count:
                return True
            await db[RETRY].delete_one({"_id": doc["_id"]})
            return False

        requeued = await self._atomically(run)
        if requeued:
            if groups:
                async with self._errors() as db:
                    await ordering.unblock(db[RETRY], groups)
            await self._count(retry_added=1)
        return requeued

    async def delete_dead(self, item_id: str) -> bool:
        async with self._errors() as db:
            return bool((await db[DEAD].delete_one({"_id": item_id})).deleted_count)

    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        unique = sorted(set(ids))
        deleted = 0
        async with self._errors() as db:
            for start in range(0, len(unique), _DELETE_CHUNK):
                chunk = unique[start : start + _DELETE_CHUNK]
                deleted += (await db[DEAD].delete_many({"_id": {"$in": chunk}})).deleted_count
        return deleted

    # control records -------------------------------------------------------

    async def get_control(self, key: str) -> ControlRecord | None:
        async with self._errors() as db:
            doc = await db[CONTROL].find_one({"_id": key})
        return None if doc is None else control_from_document(doc)

    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        # refuses what is not strict JSON (NaN, objects) before anything is written
        stored = json.loads(encode_json(dict(value), f"control record {key!r}"))
        fields, unset = json_update("value", stored)
        async with self._errors() as db:
            control = db[CONTROL]
            if version == 0:
                try:
                    await control.insert_one({"_id": key, "version": 1, **fields})
                except DuplicateKeyError:
                    return None
                return 1
            update: Doc = {"$set": {"version": version + 1, **fields}}
            if unset:
                update["$unset"] = unset
            written = await control.find_one_and_update(
                {"_id": key, "version": version}, update, projection={"_id": 1}
            )
        return None if written is None else version + 1

    async def list_control(self, prefix: str) -> list[ControlRecord]:
        records: list[ControlRecord] = []
        async with self._errors() as db:
            # keys in order from the prefix on: those with it come first, then stop
            cursor = db[CONTROL].find({"_id": {"$gte": prefix}}).sort("_id", ASCENDING)
            async with cursor:
                async for doc in cursor:
                    if not str(doc["_id"]).startswith(prefix):
                        break
                    records.append(control_from_document(doc))
        return records

    async def delete_control(self, key: str) -> bool:
        async with self._errors() as db:
            return bool((await db[CONTROL].delete_one({"_id": key})).deleted_count)
