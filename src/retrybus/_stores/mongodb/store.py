"""The MongoDB store's class: its client, transactions (or, without them, moves in
an order that loses nothing), pymongo's errors mapped to retrybus's, and the hot
half of the protocol (what publish and the workers use); ``MongoAdmin`` (``admin``)
adds the admin half.

Atomicity. A claim reads the earliest items that may be claimable (due, lease
free or expired, compared to the millisecond on fields that index bounds
narrow: ``queries.claim_candidates``; with a worker's handlers, only theirs),
keeps those claimable to the microsecond, and leases them with one
compare-and-set per document in one ``bulk_write``: the update matches only a
document whose lease, next retry time and ``claims`` are still as read, so two
claimers never both get one, and the claim sets ``claims`` to the count read
plus one. What it leased it knows without reading it back (unless some
compare-and-set missed: then it reads back which are its own); it repeats
while others took some. On SecantusDB this is far faster than one
``find_one_and_update`` per item (each scans the collection), and claims
through one store object take turns. A release takes one claim back
(``claims`` - 1, not below 0: an item an older process wrote has none).

On a replica set or sharded cluster (what transactions need) every
multi-document change runs in a transaction. On a standalone server the moves
run in an order that loses nothing: to dead-letter an item, the dead letter
(its id derived from the item's) is upserted first, then the item deleted
under the fencing filter; if the delete finds nothing (the lease was lost) the
dead letter is removed again, but only if this move created it and nobody
else's move has met it since. A repeated move is a no-op. The running totals (``bus.stats()``) are
incremented after the change, outside any transaction: they are statistics,
and one hot counter document inside every transaction would make concurrent
workers conflict on it.

Services. Each record has its service (``service``; a document without it, as
a layout-2 process writes it, is the default service's, and queries for the
default service match a missing field too). A claim or ``next_due`` for a
service's handlers reads only their items, through the (service, handler_name,
next_retry, …) index. The sweep of a removed handler's records
(``dead_letter_unsubscribed``) moves them as expiry does, each only if still as
read (as a claim's compare-and-set), in one transaction where the server has
them.

Pending deliveries (``record_pending``) are one unordered ``insert_many``: ids
already stored fail as duplicates and are skipped, the rest are inserted, in one
round trip and outside any transaction (each record stands alone; a batch cut
short is like one whose reply was lost: what was written is leased to the
publisher, or deferred, and a worker takes it when due).

Watching (``watch``) is a change stream on ``retry_queue``, where the server has
them (a replica set or sharded cluster; a standalone server has none: workers
poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bson.codec_options import CodecOptions
from bson.errors import InvalidDocument
from pymongo import ASCENDING, AsyncMongoClient, UpdateMany, UpdateOne
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from ..._errors import RecordRejected, StoreUnavailable
from ..._outcomes import (
    CorruptRecord,
    Counters,
    DeadLettered,
    Outcome,
    Rescheduled,
    Succeeded,
    corrupt_to_dead_letter,
)
from ..._records import DeadLetterItem, RetryItem
from ..._services import unsubscribed_reason
from .._codec import decode_or_corrupt
from .._url import redact
from ..base import Store
from . import ordering
from .admin import MongoAdmin
from .codec import (
    dead_letter_document,
    json_update,
    read_time,
    retry_document,
    retry_from_document,
    time_fields,
)
from .common import COUNTERS, DEAD, INBOX, RETRY, SUBSCRIPTIONS, Doc, Session
from .migrate import set_up
from .queries import (
    claim_candidates,
    earlier,
    handler_scope,
    lease_free,
    service_scope,
    split_time,
)
from .services import MongoServices

__all__ = ["DEFAULT_TIMEOUT", "MongoStore"]

T = TypeVar("T")
# server errors about a document too large to store (BSONObjectTooLarge and kin)
_TOO_LARGE_CODES = frozenset({10334, 17419, 17420})

logger = logging.getLogger("retrybus.store.mongodb")

DEFAULT_TIMEOUT = 5.0
_EXPIRE_CHUNK = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DB_NAME_FORBIDDEN = re.compile(r'[/\\. "$\x00]')
_DUPLICATE_KEY = 11000
#: the order of claims: earliest due first (the microseconds break ties), then by id
_CLAIM_ORDER = [("next_retry", ASCENDING), ("next_retry_us", ASCENDING), ("_id", ASCENDING)]
#: the fields a claim's compare-and-set checks are as it read them
_CLAIM_CHECKED = ("lease_owner", "lease_until", "lease_until_us", "next_retry", "next_retry_us")

# Watching: the changes that may make an item claimable sooner than a worker
# expects: an item added without a lease (a failure's retry, a deferred delivery,
# a requeue), a next retry time changed (an outcome), a lease given back (a
# release, an outcome). Not claims or lease extensions, nor a durable publish's
# records (added leased to their publisher). Only ids and the operation come
# over the wire.
_WATCH_PIPELINE: list[Doc] = [
    {
        "$match": {
            "$or": [
                {
                    "operationType": {"$in": ["insert", "replace"]},
                    "fullDocument.lease_until": None,
                },
                {
                    "operationType": "update",
                    "updateDescription.updatedFields.next_retry": {"$exists": True},
                },
                {
                    "operationType": "update",
                    "updateDescription.updatedFields.next_retry_us": {"$exists": True},
                },
                {
                    "operationType": "update",
                    "updateDescription.updatedFields.lease_until": {"$type": "null"},
                },
            ]
        }
    },
    {"$project": {"operationType": 1}},
]
#: the server has no change streams (``$changeStream`` on a standalone server)
_NO_CHANGE_STREAMS = frozenset({40573})
_WATCH_PAUSE = 0.5  # seconds before reopening a lost stream (doubling while it fails)
_WATCH_PAUSE_MAX = 30.0
_WATCH_STEADY = 5.0  # a stream lost sooner than this after opening waits before reopening


def _fence(owner: str | None, now: datetime) -> Doc:
    """Filter: what ``complete`` may touch (the owner's items, or items no lease holds)."""
    return {"lease_owner": owner} if owner is not None else lease_free(now)


def _claims_of(doc: Mapping[str, Any]) -> int:
    """The claims a stored item counts (0: none stored, or damaged)."""
    value = doc.get("claims")
    if isinstance(value, int | float) and not isinstance(value, bool) and value == int(value):
        return int(value)
    return 0


def _claimable(doc: Mapping[str, Any], now: datetime, *, due: bool = True) -> bool:
    """Whether an item ``claim_candidates`` matched (to the millisecond) is
    claimable at ``now`` to the microsecond (without ``due``: whether no live
    lease holds it, due or not). A damaged one is: the worker dead-letters it
    as a corrupt record."""
    try:
        if due and read_time(doc, "next_retry") > now:
            return False
        return doc.get("lease_until") is None or read_time(doc, "lease_until") <= now
    except (KeyError, TypeError, ValueError):
        return True


def _as_read(doc: Mapping[str, Any]) -> Doc:
    """Filter: the item ``doc`` is, with its lease, next retry time and claims as
    read (null matches a missing field too). Plain values where they cannot be
    taken for operators (SecantusDB plans those faster), else ``$eq``."""
    fields: Doc = {}
    for name in (*_CLAIM_CHECKED, "claims"):
        value = doc.get(name)
        fields[name] = {"$eq": value} if isinstance(value, dict) else value
    return {"_id": doc["_id"], **fields}


def _duplicates(exc: BulkWriteError) -> set[int]:
    """The positions of the documents an unordered insert skipped as already
    stored; raises ``exc`` when anything else failed."""
    details = exc.details
    errors = details.get("writeErrors") or []
    if details.get("writeConcernErrors") or any(
        error.get("code") != _DUPLICATE_KEY for error in errors
    ):
        raise exc
    return {int(error["index"]) for error in errors}


def _error_codes(exc: OperationFailure) -> set[Any]:
    """The server's error codes in ``exc`` (a bulk write's: each write's too)."""
    codes = {exc.code}
    if isinstance(exc, BulkWriteError):
        codes |= {error.get("code") for error in exc.details.get("writeErrors") or []}
    return codes


def _distinct_ids(outcomes: Sequence[Outcome]) -> bool:
    """Whether no two of ``outcomes`` are for the same item."""
    ids = {
        outcome.item_id if isinstance(outcome, DeadLettered) else outcome.item.id
        for outcome in outcomes
    }
    return len(ids) == len(outcomes)


async def _remove_held(
    retry: AsyncCollection[Doc], ids: list[str], fence: Doc, session: Session
) -> list[Doc]:
    """Delete the items of ``ids`` that ``fence`` lets this call finish, in two
    statements (read them, delete them); returns them (``_id``, ``attempt``). In a
    transaction, anyone else's change to one meanwhile is a write conflict (the
    transaction runs again). Without one, an item that changed hands in between
    is not deleted, and is found still stored: it is not this call's. (One that
    changed hands and was finished by its new holder in that instant would be
    taken for this call's: that needs a lease to run out, the item to be
    claimed, run and finished within one round trip.)"""
    if not ids:
        return []
    held = retry.find({"_id": {"$in": ids}, **fence}, {"attempt": 1}, session=session)
    found = await held.to_list()
    if not found:
        return []
    found_ids = [doc["_id"] for doc in found]
    result = await retry.delete_many({"_id": {"$in": found_ids}, **fence}, session=session)
    if result.deleted_count < len(found):
        still = retry.find({"_id": {"$in": found_ids}}, {"_id": 1}, session=session)
        left = {doc["_id"] for doc in await still.to_list()}
        found = [doc for doc in found if doc["_id"] not in left]
    return found


def _reschedule_update(item: RetryItem) -> Doc:
    metadata, unset = json_update("metadata", dict(item.metadata))
    update: Doc = {
        "$set": {
            "attempt": item.attempt,
            **time_fields("next_retry", item.next_retry),
            "error": item.error,
            "error_type": item.error_type,
            "traceback": item.traceback,
            **time_fields("updated_at", item.updated_at),
            **metadata,
            "lease_owner": None,
            **time_fields("lease_until", None),
            "claims": 0,
        }
    }
    if unset:
        update["$unset"] = unset
    return update


def _first_line(exc: BaseException) -> str:
    text = str(exc).split(", Timeout:")[0].split(", Topology Description:")[0]
    line = (text.strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= 300 else line[:299] + "…"


def _due_order(doc: Mapping[str, Any]) -> tuple[datetime, int, str]:
    """A stored item's place in claim order (``_CLAIM_ORDER``); a damaged time first."""
    value = doc.get("next_retry")
    extra = doc.get("next_retry_us")
    return (
        value if isinstance(value, datetime) else _EPOCH,
        extra if isinstance(extra, int) and not isinstance(extra, bool) else 0,
        str(doc["_id"]),
    )


def _claim_order(record: RetryItem | CorruptRecord) -> tuple[int, datetime, str]:
    if isinstance(record, CorruptRecord):
        return (0, _EPOCH, record.id)
    return (1, record.next_retry, record.id)


class MongoStore(MongoAdmin, MongoServices, Store):
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
        self._change_streams = False
        self._said_no_watch = False
        self._watchers: set[asyncio.Task[None]] = set()

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
            # a replica set or a sharded cluster: transactions and change streams
            replicated = "setName" in hello or hello.get("msg") == "isdbgrid"
            self._change_streams = replicated
            if self._want_transactions is None:
                self._transactions = replicated
            else:
                self._transactions = self._want_transactions
            await set_up(db, name=f"MongoDB store {self.url}")
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

    async def close(self) -> None:
        watchers, self._watchers = self._watchers, set()
        for task in watchers:
            task.cancel()
        for task in watchers:
            with contextlib.suppress(BaseException):
                await task
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
            if _error_codes(exc) & _TOO_LARGE_CODES:
                raise RecordRejected(
                    f"MongoDB store {self.url} refused the data: {_first_line(exc)}"
                ) from exc
            raise StoreUnavailable(f"MongoDB store {self.url} failed: {_first_line(exc)}") from exc
        except PyMongoError as exc:
            raise StoreUnavailable(f"MongoDB store {self.url} failed: {_first_line(exc)}") from exc

    async def _atomically(
        self, operation: Callable[[Session], Awaitable[T]], *, transaction: bool = True
    ) -> T:
        """Run ``operation`` in a transaction where the server has them (it may run
        again after a transient conflict), else (or without ``transaction``) once
        without a session."""
        async with self._errors():
            if not (transaction and self._transactions):
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

    # watching --------------------------------------------------------------

    async def watch(self, on_change: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """A change stream on ``retry_queue``: ``on_change()`` for every item added
        without a lease, every next retry time changed and every lease given back
        (claims and lease extensions are not changes a worker waits for). The
        stream is open when this returns. When it is lost it is opened again (with
        backoff while that fails, or while it keeps being lost at once) and
        ``on_change()`` is called once, for what may have been missed. Returns
        None on a server without change streams (a standalone server; said once,
        at debug level): workers then rely on their check interval."""
        stream: AsyncChangeStream[Doc] | None = None
        async with self._errors():
            if self._change_streams:
                try:
                    stream = await self._open_stream()
                except OperationFailure as exc:
                    if exc.code not in _NO_CHANGE_STREAMS:
                        raise
                    self._change_streams = False
        if stream is None:
            if not self._said_no_watch:
                self._said_no_watch = True
                logger.debug(
                    "MongoDB store %s: the server has no change streams (a standalone "
                    "server); workers poll at their check interval",
                    self.url,
                )
            return None
        task = asyncio.create_task(
            self._keep_watching(stream, on_change), name=f"retrybus-watch-{self.url}"
        )
        self._watchers.add(task)

        async def stop() -> None:
            self._watchers.discard(task)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return stop

    async def _open_stream(self) -> AsyncChangeStream[Doc]:
        db = await self._database()
        return await db[RETRY].watch(_WATCH_PIPELINE)

    async def _keep_watching(
        self, stream: AsyncChangeStream[Doc], on_change: Callable[[], None]
    ) -> None:
        """Call ``on_change()`` for each change ``stream`` reports; open it again when
        it is lost (pymongo has already tried to resume it once by then)."""
        current: AsyncChangeStream[Doc] | None = stream
        pause = _WATCH_PAUSE
        outage = False
        loop = asyncio.get_running_loop()
        try:
            while True:
                if current is None:
                    try:
                        current = await self._open_stream()
                    except (PyMongoError, StoreUnavailable) as exc:
                        # once per outage; the worker says the rest
                        (logger.debug if outage else logger.warning)(
                            "cannot watch MongoDB store %s, trying again with backoff: %s",
                            self.url,
                            _first_line(exc),
                        )
                        outage = True
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, _WATCH_PAUSE_MAX)
                        continue
                    if outage:
                        logger.info("watching MongoDB store %s again", self.url)
                        outage = False
                    self._changed(on_change)  # what may have changed meanwhile
                opened = loop.time()
                try:
                    async for _change in current:
                        self._changed(on_change)
                    logger.debug("the change stream on %s ended; opening it again", self.url)
                except PyMongoError as exc:
                    (logger.debug if outage else logger.warning)(
                        "the change stream on %s was lost, opening it again: %s",
                        self.url,
                        _first_line(exc),
                    )
                    outage = True
                finally:
                    stream_, current = current, None
                    with contextlib.suppress(PyMongoError):
                        await stream_.close()
                if loop.time() - opened < _WATCH_STEADY:
                    await asyncio.sleep(pause)  # lost at once: do not spin
                    pause = min(pause * 2, _WATCH_PAUSE_MAX)
                else:
                    pause = _WATCH_PAUSE
        finally:
            if current is not None:
                with contextlib.suppress(PyMongoError):
                    await current.close()

    def _changed(self, on_change: Callable[[], None]) -> None:
        try:
            on_change()
        except Exception:
            logger.exception("watching MongoDB store %s: on_change failed", self.url)

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
        retry_docs = [retry_document(item) for item in retry_items]
        dead_docs = [dead_letter_document(item) for item in dead_letters]
        if not retry_docs and not dead_docs:
            return
        async with self._errors() as db:
            groups = await ordering.number(db, retry_items, retry_docs)

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
        await self._unblock(groups)
        await self._count(retry_added=added)

    async def _unblock(self, groups: set[ordering.Group]) -> None:
        """Unblock the head of each of ``groups`` (``ordering.unblock``)."""
        if groups:
            async with self._errors() as db:
                await ordering.unblock(db[RETRY], groups)

    async def record_pending(self, items: Sequence[RetryItem]) -> set[str]:
        """One unordered ``insert_many``: the ids already stored fail as duplicates
        and are skipped (see the module's notes: no transaction)."""
        if not items:
            return set()
        docs = [retry_document(item) for item in items]
        skipped: set[int] = set()
        async with self._errors() as db:
            groups = await ordering.number(db, items, docs)
            try:
                await db[RETRY].insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                skipped = _duplicates(exc)
            if groups:
                await ordering.unblock(db[RETRY], groups)
        return {str(doc["_id"]) for n, doc in enumerate(docs) if n not in skipped}

    async def claim_due(
        self,
        *,
        now: datetime,
        limit: int,
        owner: str,
        lease_until: datetime,
        service: str | None = None,
        handlers: Collection[str] | None = None,
    ) -> list[RetryItem | CorruptRecord]:
        names = None if handlers is None else sorted(set(handlers))
        if limit <= 0 or names == []:
            return []
        candidates = claim_candidates(now, names, service)
        lease = {
            "lease_owner": owner,
            **time_fields("lease_until", lease_until),
            **time_fields("updated_at", now),
        }
        claimed: list[RetryItem | CorruptRecord] = []
        if self._claiming is None:
            self._claiming = asyncio.Lock()
        # Claims through one store object take turns: they would compete for the same
        # earliest documents. Each round reads the earliest candidates not examined
        # yet, and leases those claimable with a compare-and-set each.
        async with self._claiming, self._errors() as db:
            retry = db[RETRY]
            examined: set[Any] = set()
            while len(claimed) < limit:
                wanted = limit - len(claimed)
                asked = wanted + len(examined)  # the examined may still match
                docs = await retry.find(candidates).sort(_CLAIM_ORDER).limit(asked).to_list()
                chosen: list[Doc] = []
                for doc in docs:
                    if len(chosen) == wanted:
                        break
                    if doc["_id"] not in examined:
                        examined.add(doc["_id"])
                        if _claimable(doc, now):
                            chosen.append(doc)
                if chosen:
                    claimed += await self._lease(retry, chosen, lease)
                if len(docs) < asked:
                    break  # nothing more is due (what others took meanwhile is theirs)
        return sorted(claimed, key=_claim_order)

    @staticmethod
    async def _lease(
        retry: AsyncCollection[Doc], docs: list[Doc], lease: Doc
    ) -> list[RetryItem | CorruptRecord]:
        """Lease ``docs`` (as read), one compare-and-set each in one round trip, and
        return those leased (as the server now holds them)."""
        leased = [{**doc, **lease, "claims": _claims_of(doc) + 1} for doc in docs]
        result = await retry.bulk_write(
            [
                UpdateOne(_as_read(doc), {"$set": {**lease, "claims": new["claims"]}})
                for doc, new in zip(docs, leased, strict=True)
            ],
            ordered=False,
        )
        if result.matched_count < len(docs):
            # some changed since they were read (claimed elsewhere, say): which are ours?
            held = {
                "_id": {"$in": [doc["_id"] for doc in docs]},
                **{name: lease[name] for name in ("lease_owner", "lease_until", "lease_until_us")},
            }
            ours = {doc["_id"] for doc in await retry.find(held, {"_id": 1}).to_list()}
            leased = [doc for doc in leased if doc["_id"] in ours]
        return [decode_or_corrupt(doc, retry_from_document, id_field="_id") for doc in leased]

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        if not ids:
            return 0
        async with self._errors() as db:
            result = await db[RETRY].update_many(
                {"_id": {"$in": list(ids)}, "lease_owner": owner},
                {"$set": time_fields("lease_until", lease_until)},
            )
        return result.matched_count

    async def release(self, ids: Sequence[str], owner: str) -> int:
        """One ordered ``bulk_write`` of two updates: the items holding claims give
        one back, then those holding none (written by an older process) are freed;
        each item is freed by one of them."""
        if not ids:
            return 0
        held = {"_id": {"$in": list(ids)}, "lease_owner": owner}
        free = {"lease_owner": None, **time_fields("lease_until", None)}
        async with self._errors() as db:
            result = await db[RETRY].bulk_write(
                [
                    UpdateMany(
                        {**held, "claims": {"$gt": 0}}, {"$set": free, "$inc": {"claims": -1}}
                    ),
                    UpdateMany(held, {"$set": free}),
                ],
                ordered=True,
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
            added = done = attempts = moved = 0
            # the successes (a durable publish's are many) in two statements, however
            # many there are, when no item comes twice
            batched = _distinct_ids(outcomes)
            gone: list[Doc] = []
            if batched:
                ids = [outcome.item.id for outcome in outcomes if isinstance(outcome, Succeeded)]
                gone = await _remove_held(retry, ids, fence, session)
            for outcome in outcomes:
                if isinstance(outcome, Succeeded):
                    if not batched:
                        doc = await retry.find_one_and_delete(
                            {"_id": outcome.item.id, **fence},
                            projection={"attempt": 1},
                            session=session,
                        )
                        if doc is not None:
                            gone.append(doc)
                elif isinstance(outcome, Rescheduled):
                    item_id = outcome.item.id
                    result = await retry.update_one(
                        {"_id": item_id, **fence},
                        _reschedule_update(outcome.item),
                        session=session,
                    )
                    if result.matched_count:
                        applied.add(item_id)
                        added += outcome.first_delivery
                elif isinstance(outcome, DeadLettered):
                    item_id = outcome.item_id
                    held = {"_id": item_id, **fence}
                    if await self._move(
                        db, held, dead_letter_document(outcome.dead_letter), session
                    ):
                        applied.add(item_id)
                        moved += not outcome.first_delivery
            for doc in gone:
                applied.add(str(doc["_id"]))
                attempt = doc.get("attempt")
                if attempt != 0:  # a first delivery that worked is not a retry
                    done += 1
                    attempts += attempt if isinstance(attempt, int) else 0
            totals.clear()
            totals.update(
                retry_added=added,
                retry_succeeded=done,
                retry_succeeded_attempts=attempts,
                retry_dead_lettered=moved,
            )
            return applied

        # Only a move to the dead letter queue changes two documents: without one,
        # each outcome is one document's atomic change under the fence, and no
        # transaction is needed (nor left open for others' writes to wait on by a
        # process killed in the middle: a publisher removes its successes often).
        moves = any(isinstance(outcome, DeadLettered) for outcome in outcomes)
        applied = await self._atomically(run, transaction=moves)
        await self._unblock(
            ordering.groups_of(
                outcome.item if isinstance(outcome, Succeeded) else outcome.dead_letter
                for outcome in outcomes
                if not isinstance(outcome, Rescheduled)
                and (outcome.item.id if isinstance(outcome, Succeeded) else outcome.item_id)
                in applied
            )
        )
        await self._count(**totals)
        return applied

    async def next_due(
        self, handlers: Collection[str] | None = None, *, service: str | None = None
    ) -> datetime | None:
        names = None if handlers is None else sorted(set(handlers))
        if names == []:
            return None
        # the index on (service, handler_name, next_retry, …) serves both reads; a
        # document without a handler name is every worker's of its service
        scope = {**handler_scope(service, names), ordering.BLOCKED: None}
        async with self._errors() as db:
            retry = db[RETRY]
            times: list[datetime] = []
            unleased = await retry.find_one(
                {**scope, "lease_until": None},
                projection={"next_retry": 1, "next_retry_us": 1},
                sort=[("next_retry", ASCENDING), ("next_retry_us", ASCENDING)],
            )
            if unleased is not None:
                times.append(read_time(unleased, "next_retry"))
            # a leased item falls due when its lease ends, or later if its next retry is later
            best: datetime | None = None
            leased = retry.find(
                {**scope, "lease_until": {"$ne": None}},
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
                    until = read_time(doc, "lease_until")
                    if best is not None and until >= best:
                        break
                    due = max(until, read_time(doc, "next_retry"))
                    best = due if best is None else min(best, due)
            if best is not None:
                times.append(best)
        return min(times, default=None)

    # sweeps and running totals --------------------------------------------

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        # a retry expires by age; a first delivery (attempt 0: deferred or scheduled)
        # only once it has been due since before ``before``, never before its time
        expired = {
            "$and": [
                earlier("created_at", before),
                {"$or": [{"attempt": {"$ne": 0}}, earlier("next_retry", before)]},
                lease_free(now),
            ]
        }

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
                    record = decode_or_corrupt(doc, retry_from_document, id_field="_id")
                    dead = (
                        corrupt_to_dead_letter(record, now, reason)
                        if isinstance(record, CorruptRecord)
                        else record.to_dead_letter(
                            reason=reason, now=now, attempt=max(record.attempt - 1, 0)
                        )
                    )
                    if await self._move(
                        db, {"_id": doc["_id"], **expired}, dead_letter_document(dead), session
                    ):
                        moved.append(dead)
                    else:
                        skip.add(str(doc["_id"]))  # claimed meanwhile: leave it to its worker
            return moved

        moved = await self._atomically(run)
        await self._unblock(ordering.groups_of(moved))
        async with self._errors() as db:
            await ordering.heal(db[RETRY])  # groups a dead process left blocked
        await self._count(retry_dead_lettered=len(moved))
        return moved

    async def dead_letter_unsubscribed(self, *, now: datetime, limit: int) -> list[DeadLetterItem]:
        """Reads the tombstones, then each tombstoned handler's unleased records
        in due order (one indexed query per handler: tombstones are few), and
        moves the earliest ``limit`` of them as ``expire_retry`` does: each
        leased only if still as read (a claim meanwhile leaves it to its worker),
        in one transaction where the server has them. A handler registered again
        between the read of its tombstone and the move loses what is moved in
        that instant (the sweep after a removal is a safety net, not a fence)."""
        if limit < 1:
            return []
        async with self._errors() as db:
            tombstones = await (
                db[SUBSCRIPTIONS]
                .find(
                    {"removed_at": {"$ne": None}},
                    {"service": 1, "handler_name": 1, "removed_by": 1},
                )
                .to_list()
            )
        removed = {
            (str(doc.get("service")), str(doc.get("handler_name"))): str(
                doc.get("removed_by") or "unknown"
            )
            for doc in tombstones
        }
        if not removed:
            return []
        ms, _extra = split_time(now)

        async def run(session: Session) -> list[DeadLetterItem]:
            db = await self._database()
            retry = db[RETRY]
            moved: list[DeadLetterItem] = []
            passed: set[Any] = set()  # leased (to the microsecond) or claimed meanwhile
            while len(moved) < limit:
                wanted = limit - len(moved)
                found: list[tuple[Doc, str]] = []
                for (service, handler_name), actor in removed.items():
                    # lease free to the millisecond (the microseconds are checked
                    # below); of that handler by name (a nameless record is not its)
                    query: Doc = {
                        "handler_name": handler_name,
                        "service": service_scope(service),
                        "lease_until": {"$not": {"$gt": ms}},
                    }
                    if passed:
                        query["_id"] = {"$nin": sorted(passed)}
                    docs = (
                        await retry.find(query, session=session)
                        .sort(_CLAIM_ORDER)
                        .limit(wanted)
                        .to_list()
                    )
                    reason = unsubscribed_reason(service, handler_name, actor)
                    found += [(doc, reason) for doc in docs]
                if not found:
                    break
                found.sort(key=lambda entry: _due_order(entry[0]))
                for doc, reason in found[:wanted]:
                    if not _claimable(doc, now, due=False):
                        passed.add(doc["_id"])
                        continue
                    record = decode_or_corrupt(doc, retry_from_document, id_field="_id")
                    dead = (
                        corrupt_to_dead_letter(record, now, reason)
                        if isinstance(record, CorruptRecord)
                        else record.to_dead_letter(
                            reason=reason, now=now, attempt=max(record.attempt - 1, 0)
                        )
                    )
                    if await self._move(db, _as_read(doc), dead_letter_document(dead), session):
                        moved.append(dead)
                    else:
                        passed.add(doc["_id"])
            return moved

        moved = await self._atomically(run)
        await self._unblock(ordering.groups_of(moved))
        await self._count(retry_dead_lettered=len(moved))
        return moved

    async def cleanup_dead(self, before: datetime) -> int:
        async with self._errors() as db:
            result = await db[DEAD].delete_many(earlier("created_at", before))
        return result.deleted_count

    async def remember_successes(self, ids: Sequence[str], until: datetime) -> None:
        if not ids:
            return
        moment = {"until": split_time(until)[0], "until_at": _microseconds(until)}
        writes = [
            UpdateOne({"_id": delivery_id}, {"$max": moment}, upsert=True)
            for delivery_id in dict.fromkeys(ids)
        ]
        async with self._errors() as db:
            await db[INBOX].bulk_write(writes, ordered=False)

    async def remembered(self, ids: Collection[str], now: datetime) -> set[str]:
        if not ids:
            return set()
        query = {"_id": {"$in": list(ids)}, "until_at": {"$gt": _microseconds(now)}}
        async with self._errors() as db:
            docs = await db[INBOX].find(query, {"_id": 1}).to_list()
        return {str(doc["_id"]) for doc in docs}

    async def forget_successes(self, before: datetime) -> int:
        async with self._errors() as db:
            result = await db[INBOX].delete_many({"until_at": {"$lte": _microseconds(before)}})
        return result.deleted_count

    async def counters(self) -> Counters:
        async with self._errors() as db:
            docs = await db[COUNTERS].find({}).to_list()
        values = {doc["_id"]: int(doc.get("value") or 0) for doc in docs}
        return Counters(**{name: values.get(name, 0) for name in Counters.__dataclass_fields__})


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _microseconds(moment: datetime) -> int:
    """An aware time as whole microseconds since the epoch (exact, and ordered)."""
    if moment.tzinfo is None:
        raise ValueError(f"stored times must be timezone-aware, got {moment!r}")
    return (moment - _EPOCH) // timedelta(microseconds=1)
