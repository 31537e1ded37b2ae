"""The MongoDB store (``mongodb://host:27017/dbname``), on pymongo's native async client.

Collections and indexes follow the seed: ``retry_queue`` (``_id`` = ``retry_…``)
and ``dead_letter_queue`` (``_id`` = ``dlq_…``, TTL of 30 days on ``created_at``),
plus ``retrybus_counters`` (one document per running total) and
``retrybus_control`` (control records: ``_id`` = key, ``version``, ``value``).
Dead letters also have an index in their newest-first order (``created_at``,
``created_at_us``, ``_id``, all descending), which listing and keyset paging
(``DeadLetterFilter.cursor``) walk.

Each dead letter carries ``failure_group`` (``DeadLetterItem.failure_group``,
computed in Python when the dead letter is written or changed; indexed), so that
filtering and grouping by it are queries of the server. Dead letters written
before the field existed get it on connect (a back-fill in batches, repeated on
every connect, so that it also catches those an older process wrote meanwhile).

Times. BSON datetimes keep milliseconds, retrybus keeps microseconds (jittered
schedules, event times). Each time field ``t`` is stored as a BSON datetime
(the time truncated to the millisecond: indexes, the TTL and other tools use
it) plus ``t_us``, the microseconds within that millisecond (0–999) that BSON
drops. Records read back equal the records written, and every comparison
(due, lease expired, older than) is exact: ``t < x`` is ``t < ms(x)`` or
``t == ms(x) and t_us < us(x)``. A document without ``t_us`` (written by
another tool) counts as ``t_us = 0``.

JSON values (event data, extensions, metadata) are stored as BSON values, so
they can be read and queried in place; a value BSON cannot hold as such (keys
with ``.``/``$``/NUL, integers beyond 64 bits) is stored as JSON text in
``<field>_json`` instead.

Atomicity. A claim reads the ids of the earliest claimable items (due, lease
free or expired), then leases with one ``update_many`` those still claimable
(the filter is checked and the lease set atomically per document, so two
claimers never both get one), and reads back what it got; it repeats while
others took some. On SecantusDB this is far faster than one
``find_one_and_update`` per item (each scans the collection), and claims
through one store object take turns. On a replica set or sharded
cluster (what transactions need) every multi-document change runs in a
transaction. On a standalone server the moves run in an order that loses
nothing: to dead-letter an item, the dead letter (its id derived from the
item's) is upserted first, then the item deleted under the fencing filter;
if the delete finds nothing (the lease was lost) the dead letter is removed
again, but only if this move created it and nobody else's move has met it
since. A repeated move is a no-op. The running totals (``bus.stats()``) are
incremented after the change, outside any transaction: they are statistics,
and one hot counter document inside every transaction would make concurrent
workers conflict on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bson.codec_options import CodecOptions
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from .._errors import RecordRejected, StoreUnavailable
from .._event import compact_json, encode_json
from .._filters import DeadLetterFilter
from .._groups import GroupCount, failure_group_key
from .._outcomes import (
    CorruptRecord,
    Counters,
    DeadLettered,
    Outcome,
    Rescheduled,
    Succeeded,
    corrupt_to_dead_letter,
)
from .._records import DeadLetterItem, RetryItem
from ._codec import decode_or_corrupt
from ._mongo_queries import (
    DEAD_GROUP_DEFAULTS,
    dead_letter_query,
    group_counts,
    group_pipeline,
    split_time,
)
from ._mongo_queries import earlier as _earlier
from ._url import redact
from .base import (
    ControlRecord,
    DeadLetterField,
    RetryField,
    Store,
)

__all__ = ["MongoStore"]

T = TypeVar("T")
# server errors about a document too large to store (BSONObjectTooLarge and kin)
_TOO_LARGE_CODES = frozenset({10334, 17419, 17420})

logger = logging.getLogger("retrybus.store.mongodb")
Doc = dict[str, Any]
Session = AsyncClientSession | None

RETRY = "retry_queue"
DEAD = "dead_letter_queue"
COUNTERS = "retrybus_counters"
CONTROL = "retrybus_control"
DEAD_LETTER_TTL = timedelta(days=30)
DEFAULT_TIMEOUT = 5.0
_EXPIRE_CHUNK = 500
_BACKFILL_BATCH = 500
_DELETE_CHUNK = 1000
_MAX_INT64 = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DB_NAME_FORBIDDEN = re.compile(r'[/\\. "$\x00]')

RETRY_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("next_retry", ASCENDING)], {}),
    ([("handler_name", ASCENDING)], {}),
    ([("next_retry", ASCENDING), ("attempt", ASCENDING)], {}),
    ([("created_at", ASCENDING)], {}),
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


# times -----------------------------------------------------------------------


def _time_fields(name: str, moment: datetime | None) -> Doc:
    if moment is None:
        return {name: None, f"{name}_us": None}
    ms, extra = split_time(moment)
    return {name: ms, f"{name}_us": extra}


def _time(doc: Mapping[str, Any], name: str) -> datetime:
    value = doc[name]
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a date, got {value!r}")
    extra = doc.get(f"{name}_us") or 0
    if not isinstance(extra, int) or isinstance(extra, bool) or not 0 <= extra < 1000:
        raise ValueError(f"{name}_us must be an integer 0-999, got {extra!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value + timedelta(microseconds=extra)


def _time_or_none(doc: Mapping[str, Any], name: str) -> datetime | None:
    return None if doc.get(name) is None else _time(doc, name)


def _lease_free(now: datetime) -> Doc:
    """Filter: no live lease at ``now`` (none, or one that ran out)."""
    return {"$or": [{"lease_until": None}, _earlier("lease_until", now, or_equal=True)]}


def _fence(owner: str | None, now: datetime) -> Doc:
    """Filter: what ``complete`` may touch (the owner's items, or items no lease holds)."""
    return {"lease_owner": owner} if owner is not None else _lease_free(now)


# JSON values -------------------------------------------------------------------


def _bson_safe(value: Any) -> bool:
    """Whether a JSON value is stored as the same BSON value and read back equal."""
    if value is None or isinstance(value, str | bool | float):
        return True
    if isinstance(value, int):
        return -_MAX_INT64 - 1 <= value <= _MAX_INT64
    if isinstance(value, list):
        return all(_bson_safe(item) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, str)
            and not key.startswith("$")
            and "." not in key
            and "\x00" not in key
            and _bson_safe(item)
            for key, item in value.items()
        )
    return False


def _json_fields(name: str, value: Any) -> Doc:
    if _bson_safe(value):
        return {name: value}
    return {name: None, f"{name}_json": compact_json(value)}


def _json_update(name: str, value: Any) -> tuple[Doc, Doc]:
    """``$set`` and ``$unset`` parts storing ``value`` in field ``name``."""
    fields = _json_fields(name, value)
    unset = {} if f"{name}_json" in fields else {f"{name}_json": ""}
    return fields, unset


def _json_value(doc: Mapping[str, Any], name: str, default: Any = ...) -> Any:
    text = doc.get(f"{name}_json")
    if text is not None:
        if not isinstance(text, str):
            raise TypeError(f"{name}_json must be JSON text, got {text!r}")
        return json.loads(text)
    if default is not ... and doc.get(name) is None:
        return default
    return doc[name]


def _object(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = _json_value(doc, name, {})
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be an object, got {value!r}")
    return value


def _text(doc: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = doc.get(name, default)
    if value is None and default is not None:
        value = default
    if value is None and name not in doc:
        raise KeyError(name)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def _optional_text(doc: Mapping[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def _int(doc: Mapping[str, Any], name: str) -> int:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


# records <-> documents -----------------------------------------------------------


def _retry_doc(item: RetryItem) -> Doc:
    return {
        "_id": item.id,
        "event_id": item.event_id,
        "event_type": item.event_type,
        **_json_fields("event_data", item.event_data),
        "event_source": item.event_source,
        **_time_fields("event_timestamp", item.event_timestamp),
        "event_subject": item.event_subject,
        **_json_fields("event_extensions", dict(item.event_extensions)),
        "handler_name": item.handler_name,
        "error": item.error,
        "error_type": item.error_type,
        "traceback": item.traceback,
        "attempt": item.attempt,
        "max_retries": item.max_retries,
        **_time_fields("next_retry", item.next_retry),
        **_time_fields("created_at", item.created_at),
        **_time_fields("updated_at", item.updated_at),
        "lease_owner": item.lease_owner,
        **_time_fields("lease_until", item.lease_until),
        **_json_fields("metadata", dict(item.metadata)),
    }


def _dead_doc(item: DeadLetterItem) -> Doc:
    return {
        "_id": item.id,
        "event_id": item.event_id,
        "event_type": item.event_type,
        **_json_fields("event_data", item.event_data),
        "event_source": item.event_source,
        **_time_fields("event_timestamp", item.event_timestamp),
        "event_subject": item.event_subject,
        **_json_fields("event_extensions", dict(item.event_extensions)),
        "handler_name": item.handler_name,
        "error": item.error,
        "error_type": item.error_type,
        "traceback": item.traceback,
        "attempt": item.attempt,
        "max_retries": item.max_retries,
        "reason": item.reason,
        "failure_group": item.failure_group,
        "processed": item.processed,
        **_time_fields("created_at", item.created_at),
        **_time_fields("processed_at", item.processed_at),
        **_time_fields("first_failed_at", item.first_failed_at),
        **_json_fields("metadata", dict(item.metadata)),
    }


def _retry_from_doc(doc: Mapping[str, Any]) -> RetryItem:
    return RetryItem(
        id=_text(doc, "_id"),
        event_id=_text(doc, "event_id"),
        event_type=_text(doc, "event_type"),
        event_data=_json_value(doc, "event_data"),
        event_source=_text(doc, "event_source"),
        event_timestamp=_time(doc, "event_timestamp"),
        event_subject=_optional_text(doc, "event_subject"),
        event_extensions=_object(doc, "event_extensions"),
        handler_name=_text(doc, "handler_name"),
        error=_text(doc, "error", ""),
        error_type=_text(doc, "error_type", ""),
        traceback=_text(doc, "traceback", ""),
        attempt=_int(doc, "attempt"),
        max_retries=_int(doc, "max_retries"),
        next_retry=_time(doc, "next_retry"),
        created_at=_time(doc, "created_at"),
        updated_at=_time(doc, "updated_at"),
        lease_owner=_optional_text(doc, "lease_owner"),
        lease_until=_time_or_none(doc, "lease_until"),
        metadata=_object(doc, "metadata"),
    )


def _dead_from_doc(doc: Mapping[str, Any]) -> DeadLetterItem:
    """A dead letter; a damaged one (written by hand, say) is still shown, with defaults."""
    created_at = _time(doc, "created_at") if isinstance(doc.get("created_at"), datetime) else _EPOCH
    metadata: dict[str, Any]
    try:
        data = _json_value(doc, "event_data", None)
        metadata = _object(doc, "metadata")
    except (TypeError, ValueError):
        data = doc.get("event_data_json", doc.get("event_data"))
        metadata = {"undecodable": True}

    def text(name: str, default: str = "") -> str:
        value = doc.get(name)
        return value if isinstance(value, str) else default

    def number(name: str) -> int:
        value = doc.get(name)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0

    def moment(name: str) -> datetime | None:
        try:
            return _time_or_none(doc, name)
        except (TypeError, ValueError):
            return None

    try:
        extensions = _object(doc, "event_extensions")
    except (TypeError, ValueError):
        extensions = {}
    return DeadLetterItem(
        id=str(doc["_id"]),
        event_id=text("event_id"),
        event_type=text("event_type", "unknown"),
        event_data=data,
        event_source=text("event_source"),
        event_timestamp=moment("event_timestamp") or created_at,
        event_subject=doc.get("event_subject")
        if isinstance(doc.get("event_subject"), str)
        else None,
        event_extensions=extensions,
        handler_name=text("handler_name", "unknown"),
        error=text("error"),
        error_type=text("error_type"),
        traceback=text("traceback"),
        attempt=number("attempt"),
        max_retries=number("max_retries"),
        reason=text("reason"),
        processed=bool(doc.get("processed", False)),
        created_at=created_at,
        processed_at=moment("processed_at"),
        first_failed_at=moment("first_failed_at"),
        metadata=metadata,
    )


def _failure_group_of(doc: Mapping[str, Any]) -> str:
    """The failure group of a stored dead letter, as ``_dead_from_doc`` would read it."""

    def text(name: str, default: str = "") -> str:
        value = doc.get(name)
        return value if isinstance(value, str) else default

    return failure_group_key(text("handler_name", "unknown"), text("error_type"), text("error"))


def _control_from_doc(doc: Mapping[str, Any]) -> ControlRecord:
    value = _object(doc, "value")
    return ControlRecord(key=str(doc["_id"]), version=_int(doc, "version"), value=value)


def _reschedule_update(item: RetryItem) -> Doc:
    metadata, unset = _json_update("metadata", dict(item.metadata))
    update: Doc = {
        "$set": {
            "attempt": item.attempt,
            **_time_fields("next_retry", item.next_retry),
            "error": item.error,
            "error_type": item.error_type,
            "traceback": item.traceback,
            **_time_fields("updated_at", item.updated_at),
            **metadata,
            "lease_owner": None,
            **_time_fields("lease_until", None),
        }
    }
    if unset:
        update["$unset"] = unset
    return update


def _first_line(exc: BaseException) -> str:
    text = str(exc).split(", Timeout:")[0].split(", Topology Description:")[0]
    line = (text.strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= 300 else line[:299] + "…"


def _claim_order(record: RetryItem | CorruptRecord) -> tuple[int, datetime, str]:
    if isinstance(record, CorruptRecord):
        return (0, _EPOCH, record.id)
    return (1, record.next_retry, record.id)


class MongoStore(Store):
    """Both queues in one MongoDB database (``mongodb://host:27017/dbname``).

    URL options: ``timeout`` (seconds, default 5) bounds how long an operation
    waits for a reachable server; every other option is pymongo's.
    """

    def __init__(
        self,
        url: str,
        *,
        database: str,
        timeout: float = DEFAULT_TIMEOUT,
        transactions: bool | None = None,
        client_url: str | None = None,
    ) -> None:
        """``url`` is what the store reports (its password is removed); ``client_url``
        what pymongo connects to (default ``url``); ``transactions`` None uses them
        when the server supports them (replica set or mongos)."""
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.url = redact(url)
        self.database_name = database
        self._client_url = client_url or url
        self._timeout = timeout
        self._want_transactions = transactions
        self._transactions = False
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None
        self._opening: asyncio.Lock | None = None
        self._claiming: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str) -> MongoStore:
        """``mongodb://[user:password@]host[:port][,host…]/dbname[?options]`` (or
        ``mongodb+srv://``). Raises ``ValueError`` naming the URL when it is malformed."""
        shown = redact(url)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ValueError(f"malformed MongoDB store URL {shown!r}: {exc}") from None
        if parts.scheme.lower() not in ("mongodb", "mongodb+srv") or not parts.netloc:
            raise ValueError(
                f"malformed MongoDB store URL {shown!r}: expected mongodb://host:27017/dbname"
            )
        database = parts.path.lstrip("/")
        if not database:
            raise ValueError(
                f"malformed MongoDB store URL {shown!r}: no database name "
                "(mongodb://host:27017/dbname)"
            )
        if _DB_NAME_FORBIDDEN.search(database) or len(database) > 63:
            raise ValueError(
                f"malformed MongoDB store URL {shown!r}: invalid database name {database!r}"
            )
        options = parse_qsl(parts.query, keep_blank_values=True)
        timeout = DEFAULT_TIMEOUT
        kept: list[tuple[str, str]] = []
        for key, value in options:
            if key == "timeout":
                try:
                    timeout = float(value)
                except ValueError:
                    timeout = -1.0
                if not timeout > 0:
                    raise ValueError(
                        f"timeout in MongoDB store URL {shown!r} must be a number of "
                        f"seconds > 0, got {value!r}"
                    )
            else:
                kept.append((key, value))
        client_url = urlunsplit(parts._replace(query=urlencode(kept)))
        if parts.scheme.lower() == "mongodb":
            from pymongo.uri_parser import parse_uri

            try:
                parse_uri(client_url)
            except Exception as exc:  # InvalidURI, ConfigurationError, ValueError…
                raise ValueError(
                    f"malformed MongoDB store URL {shown!r}: {_first_line(exc)}"
                ) from None
        return cls(url, database=database, timeout=timeout, client_url=client_url)

    # connection ------------------------------------------------------------

    async def connect(self) -> None:
        await self._database()

    async def _database(self) -> AsyncDatabase[Doc]:
        if self._db is not None:
            return self._db
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._db is None:
                await self._open()
        assert self._db is not None
        return self._db

    async def _open(self) -> None:
        options: dict[str, Any] = {"appname": "retrybus"}
        given = {key.lower() for key, _ in parse_qsl(urlsplit(self._client_url).query)}
        millis = int(self._timeout * 1000)
        for name in ("serverSelectionTimeoutMS", "connectTimeoutMS"):
            if name.lower() not in given:
                options[name] = millis
        try:
            client: AsyncMongoClient[Doc] = AsyncMongoClient(
                self._client_url, tz_aware=True, tzinfo=UTC, **options
            )
        except (PyMongoError, ValueError, TypeError) as exc:
            raise StoreUnavailable(
                f"cannot open MongoDB store {self.url}: {_first_line(exc)}"
            ) from None
        try:
            db = client.get_database(
                self.database_name, codec_options=CodecOptions(tz_aware=True, tzinfo=UTC)
            )
            hello = await db.command("hello")
            if self._want_transactions is None:
                self._transactions = "setName" in hello or hello.get("msg") == "isdbgrid"
            else:
                self._transactions = self._want_transactions
            await self._create_indexes(db)
            await self._backfill_failure_groups(db)
        except ConnectionFailure as exc:
            await client.close()
            raise StoreUnavailable(
                f"cannot reach MongoDB store {self.url}: {_first_line(exc)}"
            ) from None
        except PyMongoError as exc:
            await client.close()
            raise StoreUnavailable(
                f"cannot open MongoDB store {self.url}: {_first_line(exc)}"
            ) from None
        except BaseException:
            await client.close()
            raise
        self._client, self._db = client, db

    @staticmethod
    async def _create_indexes(db: AsyncDatabase[Doc]) -> None:
        for keys, options in RETRY_INDEXES:
            await db[RETRY].create_index(keys, **options)
        for keys, options in DEAD_INDEXES:
            await db[DEAD].create_index(keys, **options)

    @staticmethod
    async def _backfill_failure_groups(db: AsyncDatabase[Doc]) -> None:
        """Give ``failure_group`` to the dead letters that lack it (written before the
        field existed, or by hand), in batches by id."""
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
                .limit(_BACKFILL_BATCH)
                .to_list()
            )
            if not docs:
                return
            await dead.bulk_write(
                [
                    UpdateOne(
                        {"_id": doc["_id"], "failure_group": None},
                        {"$set": {"failure_group": _failure_group_of(doc)}},
                    )
                    for doc in docs
                ],
                ordered=False,
            )
            if len(docs) < _BACKFILL_BATCH:
                return
            after = docs[-1]["_id"]

    async def close(self) -> None:
        client, self._client, self._db = self._client, None, None
        if client is not None:
            with contextlib.suppress(PyMongoError):
                await client.close()

    async def health(self) -> None:
        async with self._errors() as db:
            await db.command("ping")

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[AsyncDatabase[Doc]]:
        """The database; pymongo's errors turned into ``StoreUnavailable`` naming the URL."""
        db = await self._database()
        try:
            yield db
        except ConnectionFailure as exc:
            raise StoreUnavailable(
                f"MongoDB store {self.url} is unreachable: {_first_line(exc)}"
            ) from exc
        except (InvalidDocument, UnicodeError) as exc:  # DocumentTooLarge included
            raise RecordRejected(
                f"MongoDB store {self.url} refused the data: {_first_line(exc)}"
            ) from exc
        except OperationFailure as exc:
            if exc.code in _TOO_LARGE_CODES:
                raise RecordRejected(
                    f"MongoDB store {self.url} refused the data: {_first_line(exc)}"
                ) from exc
            raise StoreUnavailable(f"MongoDB store {self.url} failed: {_first_line(exc)}") from exc
        except PyMongoError as exc:
            raise StoreUnavailable(f"MongoDB store {self.url} failed: {_first_line(exc)}") from exc

    async def _atomically(self, operation: Callable[[Session], Awaitable[T]]) -> T:
        """Run ``operation`` in a transaction where the server has them (it may run
        again after a transient conflict), else once without a session."""
        async with self._errors():
            if not self._transactions:
                return await operation(None)
            assert self._client is not None
            async with self._client.start_session() as session:
                return await session.with_transaction(operation)

    async def _count(self, **deltas: int) -> None:
        """Add to the running totals, after the change they count. Best effort: the
        change is made, so a failure here is logged, not raised (a caller told that
        recording a failure failed would record it again)."""
        updates = [
            UpdateOne({"_id": name}, {"$inc": {"value": delta}}, upsert=True)
            for name, delta in deltas.items()
            if delta
        ]
        if not updates:
            return
        try:
            async with self._errors() as db:
                await db[COUNTERS].bulk_write(updates, ordered=False)
        except StoreUnavailable as exc:
            logger.warning("running totals not updated (%s): %s", deltas, exc)

    # moving to the dead letter queue -------------------------------------------

    async def _insert_dead(self, dead: AsyncCollection[Doc], doc: Doc, session: Session) -> None:
        """Add a dead letter unless one with its id is there (a repeat is a no-op)."""
        fields = {key: value for key, value in doc.items() if key != "_id"}
        with contextlib.suppress(DuplicateKeyError):
            await dead.update_one(
                {"_id": doc["_id"]}, {"$setOnInsert": fields}, upsert=True, session=session
            )

    async def _move(self, db: AsyncDatabase[Doc], held: Doc, doc: Doc, session: Session) -> bool:
        """Delete the retry item ``held`` matches and add dead letter ``doc``, as one step:
        in the transaction ``session``, or (without one) in an order that loses nothing."""
        retry, dead = db[RETRY], db[DEAD]
        if session is not None:
            if not (await retry.delete_one(held, session=session)).deleted_count:
                return False
            await self._insert_dead(dead, doc, session)
            return True
        token = uuid.uuid4().hex
        fields = {key: value for key, value in doc.items() if key != "_id"}
        while True:
            try:
                result = await dead.update_one(
                    {"_id": doc["_id"]},
                    {"$setOnInsert": {**fields, "_move": token}},
                    upsert=True,
                )
            except DuplicateKeyError:
                continue  # two upserts raced: the other inserted it, look again
            created = result.upserted_id is not None
            if created:
                break
            # It was there (a repeat, or another move of the same item in flight):
            # claim it as shared, so that its creator's rollback cannot remove it.
            shared = await dead.update_one({"_id": doc["_id"]}, {"$unset": {"_move": ""}})
            if shared.matched_count:
                break
            # its creator just rolled it back: add it again
        if (await retry.delete_one(held)).deleted_count:
            return True
        if created:
            await dead.delete_one({"_id": doc["_id"], "_move": token})
        return False

    # retry queue -----------------------------------------------------------

    async def record_failures(
        self, retry_items: Sequence[RetryItem], dead_letters: Sequence[DeadLetterItem]
    ) -> None:
        retry_docs = [_retry_doc(item) for item in retry_items]
        dead_docs = [_dead_doc(item) for item in dead_letters]
        if not retry_docs and not dead_docs:
            return

        async def run(session: Session) -> int:
            db = await self._database()
            added = 0
            if retry_docs:
                # inserted only where the id is new: a write repeated after a lost
                # reply (publish retries through an outage) adds nothing twice
                result = await db[RETRY].bulk_write(
                    [
                        UpdateOne(
                            {"_id": doc["_id"]},
                            {"$setOnInsert": {k: v for k, v in doc.items() if k != "_id"}},
                            upsert=True,
                        )
                        for doc in retry_docs
                    ],
                    ordered=False,
                    session=session,
                )
                added = result.upserted_count
            for doc in dead_docs:
                await self._insert_dead(db[DEAD], doc, session)
            return added

        added = await self._atomically(run)
        await self._count(retry_added=added)

    async def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_until: datetime
    ) -> list[RetryItem | CorruptRecord]:
        claimable = {"$and": [_earlier("next_retry", now, or_equal=True), _lease_free(now)]}
        lease = {
            "$set": {
                "lease_owner": owner,
                **_time_fields("lease_until", lease_until),
                **_time_fields("updated_at", now),
            }
        }
        held = {"lease_owner": owner, "lease_until": lease["$set"]["lease_until"]}
        held["lease_until_us"] = lease["$set"]["lease_until_us"]
        order = [("next_retry", ASCENDING), ("next_retry_us", ASCENDING), ("_id", ASCENDING)]
        claimed: list[RetryItem | CorruptRecord] = []
        if self._claiming is None:
            self._claiming = asyncio.Lock()
        # Claims through one store object take turns: they would compete for the same
        # earliest documents. Each round reads the earliest claimable ids, leases those
        # still claimable (one atomic update per document), and reads back what it got.
        async with self._claiming, self._errors() as db:
            retry = db[RETRY]
            while len(claimed) < limit:
                wanted = limit - len(claimed)
                candidates = (
                    await retry.find(claimable, projection={"_id": 1})
                    .sort(order)
                    .limit(wanted)
                    .to_list()
                )
                if not candidates:
                    break
                ids = [doc["_id"] for doc in candidates]
                result = await retry.update_many({"_id": {"$in": ids}, **claimable}, lease)
                if result.matched_count:
                    docs = await retry.find({"_id": {"$in": ids}, **held}).to_list()
                    claimed += [
                        decode_or_corrupt(doc, _retry_from_doc, id_field="_id") for doc in docs
                    ]
                if len(candidates) < wanted:
                    break  # nothing more is due (what others took meanwhile is theirs)
        return sorted(claimed, key=_claim_order)

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        if not ids:
            return 0
        async with self._errors() as db:
            result = await db[RETRY].update_many(
                {"_id": {"$in": list(ids)}, "lease_owner": owner},
                {"$set": _time_fields("lease_until", lease_until)},
            )
        return result.matched_count

    async def release(self, ids: Sequence[str], owner: str) -> int:
        if not ids:
            return 0
        async with self._errors() as db:
            result = await db[RETRY].update_many(
                {"_id": {"$in": list(ids)}, "lease_owner": owner},
                {"$set": {"lease_owner": None, **_time_fields("lease_until", None)}},
            )
        return result.matched_count

    async def complete(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> set[str]:
        fence = _fence(owner, now)
        totals: dict[str, int] = {}

        async def run(session: Session) -> set[str]:
            db = await self._database()
            retry = db[RETRY]
            applied: set[str] = set()
            done = attempts = moved = 0
            for outcome in outcomes:
                if isinstance(outcome, Succeeded):
                    item_id = outcome.item.id
                    gone = await retry.find_one_and_delete(
                        {"_id": item_id, **fence}, projection={"attempt": 1}, session=session
                    )
                    if gone is not None:
                        applied.add(item_id)
                        done += 1
                        attempt = gone.get("attempt")
                        attempts += attempt if isinstance(attempt, int) else 0
                elif isinstance(outcome, Rescheduled):
                    item_id = outcome.item.id
                    result = await retry.update_one(
                        {"_id": item_id, **fence},
                        _reschedule_update(outcome.item),
                        session=session,
                    )
                    if result.matched_count:
                        applied.add(item_id)
                elif isinstance(outcome, DeadLettered):
                    item_id = outcome.item_id
                    held = {"_id": item_id, **fence}
                    if await self._move(db, held, _dead_doc(outcome.dead_letter), session):
                        applied.add(item_id)
                        moved += 1
            totals.clear()
            totals.update(
                retry_succeeded=done, retry_succeeded_attempts=attempts, retry_dead_lettered=moved
            )
            return applied

        applied = await self._atomically(run)
        await self._count(**totals)
        return applied

    async def next_due(self) -> datetime | None:
        async with self._errors() as db:
            retry = db[RETRY]
            times: list[datetime] = []
            unleased = await retry.find_one(
                {"lease_until": None},
                projection={"next_retry": 1, "next_retry_us": 1},
                sort=[("next_retry", ASCENDING), ("next_retry_us", ASCENDING)],
            )
            if unleased is not None:
                times.append(_time(unleased, "next_retry"))
            # a leased item falls due when its lease ends, or later if its next retry is later
            best: datetime | None = None
            leased = retry.find(
                {"lease_until": {"$ne": None}},
                projection={
                    "next_retry": 1,
                    "next_retry_us": 1,
                    "lease_until": 1,
                    "lease_until_us": 1,
                },
                sort=[("lease_until", ASCENDING), ("lease_until_us", ASCENDING)],
            )
            async with leased:
                async for doc in leased:
                    until = _time(doc, "lease_until")
                    if best is not None and until >= best:
                        break
                    due = max(until, _time(doc, "next_retry"))
                    best = due if best is None else min(best, due)
            if best is not None:
                times.append(best)
        return min(times, default=None)

    async def retry_count(self) -> int:
        async with self._errors() as db:
            return await db[RETRY].count_documents({})

    async def count_due(self, before: datetime) -> int:
        async with self._errors() as db:
            return await db[RETRY].count_documents(_earlier("next_retry", before))

    async def get_retry(self, item_id: str) -> RetryItem | None:
        async with self._errors() as db:
            doc = await db[RETRY].find_one({"_id": item_id})
        return None if doc is None else _retry_from_doc(doc)

    async def list_retry(
        self,
        *,
        limit: int,
        offset: int,
        handler_name: str | None = None,
        event_type: str | None = None,
    ) -> list[RetryItem]:
        if limit <= 0:
            return []
        query: Doc = {}
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
        return [_retry_from_doc(doc) for doc in docs]

    async def delete_retry(self, item_id: str) -> bool:
        async with self._errors() as db:
            return bool((await db[RETRY].delete_one({"_id": item_id})).deleted_count)

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        expired = {"$and": [_earlier("created_at", before), _lease_free(now)]}

        async def run(session: Session) -> list[DeadLetterItem]:
            db = await self._database()
            moved: list[DeadLetterItem] = []
            skip: set[str] = set()
            while True:
                query = {**expired, "_id": {"$nin": sorted(skip)}} if skip else expired
                docs = await db[RETRY].find(query, session=session).limit(_EXPIRE_CHUNK).to_list()
                if not docs:
                    break
                for doc in docs:
                    record = decode_or_corrupt(doc, _retry_from_doc, id_field="_id")
                    dead = (
                        corrupt_to_dead_letter(record, now, reason)
                        if isinstance(record, CorruptRecord)
                        else record.to_dead_letter(
                            reason=reason, now=now, attempt=record.attempt - 1
                        )
                    )
                    if await self._move(
                        db, {"_id": doc["_id"], **expired}, _dead_doc(dead), session
                    ):
                        moved.append(dead)
                    else:
                        skip.add(str(doc["_id"]))  # claimed meanwhile: leave it to its worker
            return moved

        moved = await self._atomically(run)
        await self._count(retry_dead_lettered=len(moved))
        return moved

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
        return [_dead_from_doc(doc) for doc in docs]

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
        return None if doc is None else _dead_from_doc(doc)

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        if limit <= 0:
            return []
        # strings compare by their bytes here: ids with the prefix sort below prefix + U+FFFF
        query = {"_id": {"$gte": prefix, "$lt": prefix + "\uffff"}}
        async with self._errors() as db:
            docs = await db[DEAD].find(query, {"_id": 1}).sort("_id", 1).limit(limit).to_list()
        return [str(doc["_id"]) for doc in docs]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        metadata, unset_metadata = _json_update("metadata", dict(item.metadata))
        data, unset_data = _json_update("event_data", item.event_data)
        update: Doc = {
            "$set": {
                "error": item.error,
                "error_type": item.error_type,
                "traceback": item.traceback,
                "attempt": item.attempt,
                "processed": item.processed,
                **_time_fields("processed_at", item.processed_at),
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
        doc = _retry_doc(retry_item)

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

    async def cleanup_dead(self, before: datetime) -> int:
        async with self._errors() as db:
            result = await db[DEAD].delete_many(_earlier("created_at", before))
        return result.deleted_count

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        if by not in ("handler_name", "event_type"):
            raise ValueError(f"cannot group retry items by {by!r}")
        if limit <= 0:
            return []
        pipeline = group_pipeline(
            {}, by=by, default="", moment="next_retry", newest=False, limit=limit
        )
        async with self._errors() as db:
            docs = await (await db[RETRY].aggregate(pipeline)).to_list()
        return group_counts(docs, newest=False)

    async def counters(self) -> Counters:
        async with self._errors() as db:
            docs = await db[COUNTERS].find({}).to_list()
        values = {doc["_id"]: int(doc.get("value") or 0) for doc in docs}
        return Counters(**{name: values.get(name, 0) for name in Counters.__dataclass_fields__})

    # control records -------------------------------------------------------

    async def get_control(self, key: str) -> ControlRecord | None:
        async with self._errors() as db:
            doc = await db[CONTROL].find_one({"_id": key})
        return None if doc is None else _control_from_doc(doc)

    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        # refuses what is not strict JSON (NaN, objects) before anything is written
        stored = json.loads(encode_json(dict(value), f"control record {key!r}"))
        fields, unset = _json_update("value", stored)
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
                    records.append(_control_from_doc(doc))
        return records

    async def delete_control(self, key: str) -> bool:
        async with self._errors() as db:
            return bool((await db[CONTROL].delete_one({"_id": key})).deleted_count)
