"""The SQLite store: the embedded default, durable in one file, safe for many
processes; its connection and the hot half of the protocol (its admin half is
``SQLiteAdmin``, its services part ``SQLiteServices``, which it inherits).

Every statement runs on the event loop's thread: a local SQLite commit takes
tens of microseconds, less than a hop to a thread pool would. The database is
in WAL mode; writers take the lock with ``BEGIN IMMEDIATE`` and, when another
process holds it, wait by sleeping on the event loop (never blocking it)
until ``busy_timeout`` runs out.

``watch`` reads ``PRAGMA data_version`` on the store's own connection every
``_WATCH_INTERVAL`` seconds (a few microseconds a read): it changes when
another connection, in this process or another, has committed, and not for
the store's own commits, so that a worker is not woken by its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import Any, TypeVar

from ..._errors import RecordRejected, RetrybusError, StoreUnavailable, StoreUnusable
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
from .._codec import decode_or_corrupt, parse_text_time, text_time
from .._queries import placeholders
from ..base import Store
from .admin import SQLiteAdmin
from .codec import CODEC
from .migrate import upgrade
from .services import SQLiteServices
from .sql import CHUNK, Q, dict_rows, handler_query, service_query
from .staging import SQLiteStaging

__all__ = ["SQLiteStore"]

logger = logging.getLogger("retrybus.store.sqlite")

T = TypeVar("T")
_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_SYNCHRONOUS = {"off", "normal", "full", "extra"}
# Checkpoints (copying the WAL into the database, with fsyncs) run on a thread of
# their own every _CHECKPOINT_EVERY commits instead of inside a commit on the event
# loop; the connection's own autocheckpoint stays on, later, as a backstop.
_CHECKPOINT_EVERY = 100
_AUTOCHECKPOINT_BACKSTOP = 10_000  # pages
# How often a watch reads PRAGMA data_version: another process's commit wakes an
# idle worker within this (plus the worker's own claim), for 20 reads a second
_WATCH_INTERVAL = 0.05


def _failure(url: str, exc: BaseException, *, opening: bool = False) -> RetrybusError:
    """The retrybus error an SQLite (or encoding) error stands for: a file that is
    no database, or a damaged one, cannot be used (retrying will not help); data
    SQLite refuses is rejected; anything else is an outage, worth retrying."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if primary in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return StoreUnusable(
            f"SQLite store {url} cannot be used: {exc} (it is not a retrybus SQLite "
            "database, or it is damaged)"
        )
    if primary == sqlite3.SQLITE_TOOBIG or isinstance(exc, sqlite3.DataError | UnicodeError):
        return RecordRejected(f"SQLite store {url} refused the data: {exc}")
    if opening:
        return StoreUnavailable(f"cannot open SQLite store {url}: {exc}")
    return StoreUnavailable(f"SQLite store {url} failed: {exc}")


def _data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection has committed since the last read."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _due_first(row: dict[str, Any]) -> tuple[str, str]:
    return (str(row["next_retry"]), str(row["id"]))


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


class SQLiteStore(SQLiteAdmin, SQLiteServices, SQLiteStaging, Store):
    """Both queues in one SQLite file (``sqlite:///path/to.db``), and what services
    keep there (``SQLiteServices``)."""

    joins_removals = True

    def __init__(
        self,
        path: str,
        *,
        url: str | None = None,
        synchronous: str = "normal",
        busy_timeout: float = 30.0,
    ) -> None:
        if synchronous.lower() not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        self.path = path
        self.url = url or f"sqlite:///{path}"
        self._synchronous = synchronous.upper()
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._opening: asyncio.Lock | None = None
        self._commits = 0
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointing: asyncio.Future[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()

    # connection ------------------------------------------------------------

    async def connect(self) -> None:
        await self._connection()

    async def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._conn is None:
                self._conn = await self._open()
        return self._conn

    async def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=0, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _failure(self.url, exc, opening=True) from exc
        try:
            await self._retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_BACKSTOP}")
            await upgrade(conn, url=self.url, retry_busy=self._retry_busy)
        except sqlite3.Error as exc:
            conn.close()
            raise _failure(self.url, exc, opening=True) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        watchers, self._watchers = self._watchers, set()
        for task in watchers:
            task.cancel()
        for task in watchers:
            with contextlib.suppress(BaseException):
                await task
        pending, self._checkpointing = self._checkpointing, None
        if pending is not None:
            with contextlib.suppress(Exception):
                await pending
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _committed(self) -> None:
        self._commits += 1
        if self._commits < _CHECKPOINT_EVERY or self._checkpointing is not None:
            return
        self._commits = 0
        self._checkpointing = asyncio.get_running_loop().run_in_executor(None, self._checkpoint)
        self._checkpointing.add_done_callback(self._checkpoint_done)

    def _checkpoint(self) -> None:
        """PASSIVE: copies what it can without waiting for, or blocking, anyone."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                self.path, isolation_level=None, timeout=0, check_same_thread=False
            )
        with contextlib.suppress(sqlite3.Error):
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _checkpoint_done(self, future: asyncio.Future[None]) -> None:
        if self._checkpointing is future:
            self._checkpointing = None

    async def health(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _retry_busy(self, operation: Callable[[], T]) -> T:
        """Run ``operation``; while another process holds the lock, sleep and try again."""
        deadline: float | None = None
        pause = 0.0005
        while True:
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._busy_timeout
                elif now >= deadline:
                    raise StoreUnavailable(
                        f"SQLite store {self.url} stayed locked for {self._busy_timeout:g}s: {exc}"
                    ) from exc
                await asyncio.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, 0.05)

    async def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        conn = await self._connection()
        try:
            return await self._retry_busy(lambda: operation(conn))
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise _failure(self.url, exc) from exc

    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` in one ``BEGIN IMMEDIATE`` transaction."""
        conn = await self._connection()
        try:
            await self._retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"))
        except sqlite3.DatabaseError as exc:
            raise _failure(self.url, exc) from exc
        try:
            result = operation(conn)
            conn.execute("COMMIT")
            self._committed()
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError | UnicodeError) and not isinstance(
                exc, sqlite3.IntegrityError
            ):
                raise _failure(self.url, exc) from exc
            raise
        return result

    # watching --------------------------------------------------------------

    async def watch(self, on_change: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """Read ``PRAGMA data_version`` on the store's connection every
        ``_WATCH_INTERVAL`` seconds and call ``on_change()`` when it changed:
        another connection committed (any commit: what it changed is not known).
        The store's own commits leave it as it is; commits between two reads
        wake once. ``close()`` stops the watch."""
        conn = await self._connection()
        first = await self._read(_data_version)

        async def poll() -> None:
            seen = first
            while True:
                await asyncio.sleep(_WATCH_INTERVAL)
                if conn.in_transaction:  # never between statements of one of ours
                    continue
                try:
                    version = _data_version(conn)
                except sqlite3.Error as exc:  # busy (a WAL recovery), or passing trouble
                    logger.debug("watching %s: %s", self.url, exc)
                    continue
                if version == seen:
                    continue
                seen = version
                try:
                    on_change()
                except Exception:
                    logger.exception("watching %s: on_change failed", self.url)

        task = asyncio.create_task(poll(), name=f"retrybus-watch-{self.path}")
        self._watchers.add(task)

        async def stop() -> None:
            self._watchers.discard(task)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return stop

    # the hot half (RetryStore) ---------------------------------------------

    async def record_failures(
        self, retry_items: Sequence[RetryItem], dead_letters: Sequence[DeadLetterItem]
    ) -> None:
        retry_rows = [CODEC.retry_fields(item) for item in retry_items]
        dead_rows = [CODEC.dead_letter_fields(item) for item in dead_letters]

        def run(conn: sqlite3.Connection) -> None:
            if retry_rows:
                added = conn.executemany(Q["insert_retry"], retry_rows).rowcount
                conn.execute(Q["add_counter"], (added, "retry_added"))
            if dead_rows:
                conn.executemany(Q["insert_dead"], dead_rows)

        await self._write(run)

    async def record_pending(self, items: Sequence[RetryItem]) -> set[str]:
        """One transaction: which ids are stored already (one statement, the ids
        as a JSON array), then the rest inserted with one prepared statement."""
        if not items:
            return set()
        return await self._write(_pending_insert(items))

    async def remove_then_record_pending(
        self,
        removals: Sequence[Succeeded],
        owner: str,
        now: datetime,
        items: Sequence[RetryItem],
    ) -> set[str]:
        """Both in one transaction: a durable publisher's removals cost no commit of their own."""
        remove = _completion(removals, owner, now)
        insert = _pending_insert(items)

        def run(conn: sqlite3.Connection) -> set[str]:
            remove(conn)
            return insert(conn)

        return await self._write(run)

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
        params: dict[str, Any] = {
            "owner": owner,
            "lease_until": text_time(lease_until),
            "now": text_time(now),
            "limit": limit,
        }
        if handlers is None:
            sql = service_query(Q["claim_due"], params, service, condition="service = :service")
        else:
            names = list(dict.fromkeys(handlers))
            if not names or limit <= 0:
                return []
            sql = handler_query(
                Q["claim_due_of_handlers"],
                Q["due_of_handler"],
                Q["due_of_many_handlers"],
                names,
                params,
                service,
            )
        rows = await self._write(lambda conn: dict_rows(conn.execute(sql, params)))
        rows.sort(key=_due_first)  # RETURNING keeps no order: earliest first
        return [decode_or_corrupt(row, CODEC.retry_item) for row in rows]

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        if not ids:
            return 0
        until = text_time(lease_until)

        def run(conn: sqlite3.Connection) -> int:
            extended = 0
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                sql = Q["extend_leases"].format(ids=placeholders(len(chunk)))
                extended += conn.execute(sql, (until, owner, *chunk)).rowcount
            return extended

        return await self._write(run)

    async def release(self, ids: Sequence[str], owner: str) -> int:
        if not ids:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            released = 0
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                sql = Q["release"].format(ids=placeholders(len(chunk)))
                released += conn.execute(sql, (owner, *chunk)).rowcount
            return released

        return await self._write(run)

    async def complete(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> set[str]:
        return await self._write(_completion(outcomes, owner, now))

    async def complete_remembering(
        self,
        outcomes: Sequence[Outcome],
        owner: str | None,
        now: datetime,
        remember: Sequence[str],
        until: datetime,
    ) -> set[str]:
        if not remember:
            return await self.complete(outcomes, owner, now)
        rows = [(delivery_id, text_time(until)) for delivery_id in dict.fromkeys(remember)]
        completion = _completion(outcomes, owner, now)

        def run(conn: sqlite3.Connection) -> set[str]:
            conn.executemany(Q["remember_successes"], rows)
            return completion(conn)

        return await self._write(run)

    async def next_due(
        self, handlers: Collection[str] | None = None, *, service: str | None = None
    ) -> datetime | None:
        params: dict[str, Any] = {}
        if handlers is not None:
            names = list(dict.fromkeys(handlers))
            if not names:
                return None
            sql = handler_query(
                Q["next_due_of_handlers"],
                Q["first_of_handler"],
                Q["first_of_many_handlers"],
                names,
                params,
                service,
            )
            found = await self._read(lambda conn: conn.execute(sql, params).fetchone()[0])
            return None if found is None else parse_text_time(found)
        unleased_sql = service_query(
            Q["next_due_unleased"], params, service, condition="service = :service"
        )
        leased_sql = service_query(
            Q["next_lease_end"], params, service, condition="+service = :service"
        )

        def run(conn: sqlite3.Connection) -> str | None:
            unleased = conn.execute(unleased_sql, params).fetchone()
            leased = conn.execute(leased_sql, params).fetchone()
            times = [row[0] for row in (unleased, leased) if row is not None and row[0] is not None]
            return min(times, default=None)

        text = await self._read(run)
        return None if text is None else parse_text_time(text)

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        params = {"before": text_time(before), "now": text_time(now)}

        def run(conn: sqlite3.Connection) -> list[DeadLetterItem]:
            moved: list[DeadLetterItem] = []
            while True:
                rows = dict_rows(conn.execute(Q["take_expired"], params))
                if not rows:
                    break
                for row in rows:
                    record = decode_or_corrupt(row, CODEC.retry_item)
                    dead = (
                        corrupt_to_dead_letter(record, now, reason)
                        if isinstance(record, CorruptRecord)
                        else record.to_dead_letter(
                            # retries made; a first delivery (attempt 0) made none
                            reason=reason,
                            now=now,
                            attempt=max(record.attempt - 1, 0),
                        )
                    )
                    conn.execute(Q["insert_dead"], CODEC.dead_letter_fields(dead))
                    moved.append(dead)
            if moved:
                conn.execute(Q["add_counter"], (len(moved), "retry_dead_lettered"))
            return moved

        return await self._write(run)

    async def cleanup_dead(self, before: datetime) -> int:
        return int(
            await self._write(
                lambda conn: conn.execute(Q["cleanup_dead"], (text_time(before),)).rowcount
            )
        )

    async def remember_successes(self, ids: Sequence[str], until: datetime) -> None:
        if not ids:
            return
        rows = [(delivery_id, text_time(until)) for delivery_id in dict.fromkeys(ids)]
        await self._write(lambda conn: conn.executemany(Q["remember_successes"], rows))

    async def remembered(self, ids: Collection[str], now: datetime) -> set[str]:
        if not ids:
            return set()
        wanted, at = list(ids), text_time(now)

        def read(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(wanted), CHUNK):
                chunk = wanted[start : start + CHUNK]
                sql = Q["remembered"].format(ids=placeholders(len(chunk)))
                found.update(row[0] for row in conn.execute(sql, (*chunk, at)))
            return found

        return await self._read(read)

    async def forget_successes(self, before: datetime) -> int:
        return int(
            await self._write(
                lambda conn: conn.execute(Q["forget_successes"], (text_time(before),)).rowcount
            )
        )

    async def counters(self) -> Counters:
        rows = await self._read(lambda conn: conn.execute(Q["counters"]).fetchall())
        values = {name: int(value) for name, value in rows}
        return Counters(**{name: values.get(name, 0) for name in Counters.__dataclass_fields__})


def _pending_insert(items: Sequence[RetryItem]) -> Callable[[sqlite3.Connection], set[str]]:
    """The transaction's work for ``record_pending``: the ids already stored
    skipped, the rest inserted; returns the ids added."""
    rows: dict[str, dict[str, Any]] = {}
    for item in items:
        if item.id not in rows:  # the first of a repeated id is kept
            rows[item.id] = CODEC.retry_fields(item)
    ids = json.dumps(list(rows))

    def run(conn: sqlite3.Connection) -> set[str]:
        if not rows:
            return set()
        for (stored,) in conn.execute(Q["stored_retry_ids"], (ids,)).fetchall():
            del rows[stored]
        if rows:
            conn.executemany(Q["insert_retry"], rows.values())
        return set(rows)

    return run


def _completion(
    outcomes: Sequence[Outcome], owner: str | None, now: datetime
) -> Callable[[sqlite3.Connection], set[str]]:
    """The transaction's work for ``complete``; returns the ids applied."""
    at = text_time(now)
    succeeded = [o.item.id for o in outcomes if isinstance(o, Succeeded)]
    # the item written whole (the query sets no lease and claims 0 itself)
    rescheduled: list[tuple[dict[str, Any], bool]] = [
        ({**CODEC.retry_fields(o.item), "owner": owner, "now": at}, o.first_delivery)
        for o in outcomes
        if isinstance(o, Rescheduled)
    ]
    dead: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
        (
            {"id": o.item_id, "owner": owner, "now": at},
            CODEC.dead_letter_fields(o.dead_letter),
            o.first_delivery,
        )
        for o in outcomes
        if isinstance(o, DeadLettered)
    ]

    def run(conn: sqlite3.Connection) -> set[str]:
        applied: set[str] = set()
        attempts = done = 0
        for start in range(0, len(succeeded), CHUNK):
            chunk = succeeded[start : start + CHUNK]
            sql = Q["delete_succeeded"].format(ids=placeholders(len(chunk)))
            cursor = conn.execute(sql, (owner, at, *chunk))
            for item_id, attempt in cursor.fetchall():
                applied.add(item_id)
                if attempt:  # attempt 0: a first delivery worked, not a retry
                    attempts += attempt
                    done += 1
        added = 0
        for params, first_delivery in rescheduled:
            if conn.execute(Q["reschedule"], params).rowcount:
                applied.add(params["id"])
                added += first_delivery  # a first failure: a retry added
        moved = 0
        for held, dead_row, first_delivery in dead:
            if conn.execute(Q["delete_held"], held).rowcount:
                conn.execute(Q["insert_dead"], dead_row)
                applied.add(held["id"])
                moved += not first_delivery
        if done:
            conn.execute(Q["add_counter"], (done, "retry_succeeded"))
            conn.execute(Q["add_counter"], (attempts, "retry_succeeded_attempts"))
        if added:
            conn.execute(Q["add_counter"], (added, "retry_added"))
        if moved:
            conn.execute(Q["add_counter"], (moved, "retry_dead_lettered"))
        return applied

    return run
