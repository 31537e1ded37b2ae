"""The MongoDB store's class: its client, transactions (or, without them, moves in
an order that loses nothing), pymongo's errors mapped to retrybus's, and the hot
half of the protocol (what publish and the workers use); ``MongoAdmin`` (``admin``)
adds the admin half.

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
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bson.codec_options import CodecOptions
from bson.errors import InvalidDocument
from pymongo import ASCENDING, AsyncMongoClient, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
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
from .._codec import decode_or_corrupt
from .._url import redact
from ..base import Store
from .admin import MongoAdmin
from .codec import (
    dead_letter_document,
    json_update,
    read_time,
    retry_document,
    retry_from_document,
    time_fields,
)
from .common import COUNTERS, DEAD, RETRY, Doc, Session
from .migrate import set_up
from .queries import earlier

__all__ = ["DEFAULT_TIMEOUT", "MongoStore"]

T = TypeVar("T")
# server errors about a document too large to store (BSONObjectTooLarge and kin)
_TOO_LARGE_CODES = frozenset({10334, 17419, 17420})

logger = logging.getLogger("retrybus.store.mongodb")

DEFAULT_TIMEOUT = 5.0
_EXPIRE_CHUNK = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DB_NAME_FORBIDDEN = re.compile(r'[/\\. "$\x00]')


def _lease_free(now: datetime) -> Doc:
    """Filter: no live lease at ``now`` (none, or one that ran out)."""
    return {"$or": [{"lease_until": None}, earlier("lease_until", now, or_equal=True)]}


def _fence(owner: str | None, now: datetime) -> Doc:
    """Filter: what ``complete`` may touch (the owner's items, or items no lease holds)."""
    return {"lease_owner": owner} if owner is not None else _lease_free(now)


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


class MongoStore(MongoAdmin, Store):
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
            await set_up(db)
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
        retry_docs = [retry_document(item) for item in retry_items]
        dead_docs = [dead_letter_document(item) for item in dead_letters]
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
        claimable = {"$and": [earlier("next_retry", now, or_equal=True), _lease_free(now)]}
        lease = {
            "$set": {
                "lease_owner": owner,
                **time_fields("lease_until", lease_until),
                **time_fields("updated_at", now),
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
                        decode_or_corrupt(doc, retry_from_document, id_field="_id") for doc in docs
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
                {"$set": time_fields("lease_until", lease_until)},
            )
        return result.matched_count

    async def release(self, ids: Sequence[str], owner: str) -> int:
        if not ids:
            return 0
        async with self._errors() as db:
            result = await db[RETRY].update_many(
                {"_id": {"$in": list(ids)}, "lease_owner": owner},
                {"$set": {"lease_owner": None, **time_fields("lease_until", None)}},
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
                    if await self._move(
                        db, held, dead_letter_document(outcome.dead_letter), session
                    ):
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
                times.append(read_time(unleased, "next_retry"))
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
        expired = {"$and": [earlier("created_at", before), _lease_free(now)]}

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
                            reason=reason, now=now, attempt=record.attempt - 1
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
        await self._count(retry_dead_lettered=len(moved))
        return moved

    async def cleanup_dead(self, before: datetime) -> int:
        async with self._errors() as db:
            result = await db[DEAD].delete_many(earlier("created_at", before))
        return result.deleted_count

    async def counters(self) -> Counters:
        async with self._errors() as db:
            docs = await db[COUNTERS].find({}).to_list()
        values = {doc["_id"]: int(doc.get("value") or 0) for doc in docs}
        return Counters(**{name: values.get(name, 0) for name in Counters.__dataclass_fields__})
