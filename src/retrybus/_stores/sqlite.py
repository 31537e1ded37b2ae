"""The SQLite store: the embedded default, durable in one file, safe for many processes.

Every statement runs on the event loop's thread: a local SQLite commit takes
tens of microseconds, less than a hop to a thread pool would. The database is
in WAL mode; writers take the lock with ``BEGIN IMMEDIATE`` and, when another
process holds it, wait by sleeping on the event loop (never blocking it)
until ``busy_timeout`` runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from .._errors import RecordRejected, RetrybusError, StoreUnavailable, StoreUnusable
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
from ._codec import parse_text_time as _dt
from ._codec import parse_text_time_or_none as _dt_or_none
from ._codec import text_time as _ts
from ._codec import text_time_or_none as _ts_or_none
from ._queries import load_queries, placeholders
from .base import (
    DEAD_LETTER_GROUP_FIELDS,
    RETRY_GROUP_FIELDS,
    ControlRecord,
    DeadLetterField,
    RetryField,
    Store,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")
Q = load_queries("sqlite.sql")
# 1: the tables; 2: dead_letter_queue.failure_group (back-filled), retrybus_control;
# 3: the newest-first indexes end with id (keyset paging)
SCHEMA_VERSION = 3
_CHUNK = 500
_BACKFILL_BATCH = 500
_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_SYNCHRONOUS = {"off", "normal", "full", "extra"}
# Checkpoints (copying the WAL into the database, with fsyncs) run on a thread of
# their own every _CHECKPOINT_EVERY commits instead of inside a commit on the event
# loop; the connection's own autocheckpoint stays on, later, as a backstop.
_CHECKPOINT_EVERY = 100
_AUTOCHECKPOINT_BACKSTOP = 10_000  # pages
_PARAMETER = re.compile(r":(\w+)")


def _filter_conditions() -> dict[str, str]:
    """The ``dead_filter`` block: the SQL condition of each DeadLetterFilter field,
    the field named by the condition's first parameter."""
    conditions: dict[str, str] = {}
    for line in Q["dead_filter"].splitlines():
        line = line.strip()
        if line and not line.startswith("--"):
            conditions[_PARAMETER.findall(line)[0]] = line
    if set(conditions) != set(DeadLetterFilter.__dataclass_fields__):
        raise RuntimeError("sqlite.sql: dead_filter must name every DeadLetterFilter field")
    return conditions


_DEAD_CONDITIONS = _filter_conditions()


def _where(where: DeadLetterFilter) -> tuple[str, dict[str, Any]]:
    """The ``{where}`` of the dead letter queries for ``where``, and its parameters."""
    conditions: list[str] = []
    params: dict[str, Any] = {}
    for name, condition in _DEAD_CONDITIONS.items():
        value = getattr(where, name)
        if value is None:
            continue
        conditions.append(condition)
        if isinstance(value, bool):
            params[name] = int(value)
        elif isinstance(value, datetime):
            params[name] = _ts(value)
        elif isinstance(value, tuple):  # the cursor: (created_at, id)
            params[name], params[f"{name}_id"] = _ts(value[0]), value[1]
        else:
            params[name] = value
    return " AND ".join(conditions) or "TRUE", params


def _group_counts(rows: list[tuple[Any, ...]]) -> list[GroupCount]:
    return [
        GroupCount(str(key), int(count), _dt(first), _dt(last), str(sample))
        for key, count, first, last, sample in rows
    ]


def _control_from_row(row: tuple[Any, ...]) -> ControlRecord:
    key, version, value = row
    return ControlRecord(key, int(version), json.loads(value))


def _object(text: str) -> dict[str, Any]:
    if text == "{}":
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text[:80]!r}")
    return value


def _retry_params(item: RetryItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "event_id": item.event_id,
        "event_type": item.event_type,
        "event_data": compact_json(item.event_data),
        "event_source": item.event_source,
        "event_timestamp": _ts(item.event_timestamp),
        "event_subject": item.event_subject,
        "event_extensions": compact_json(dict(item.event_extensions)),
        "handler_name": item.handler_name,
        "error": item.error,
        "error_type": item.error_type,
        "traceback": item.traceback,
        "attempt": item.attempt,
        "max_retries": item.max_retries,
        "next_retry": _ts(item.next_retry),
        "created_at": _ts(item.created_at),
        "updated_at": _ts(item.updated_at),
        "lease_owner": item.lease_owner,
        "lease_until": _ts_or_none(item.lease_until),
        "metadata": compact_json(dict(item.metadata)),
    }


def _dead_params(item: DeadLetterItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "event_id": item.event_id,
        "event_type": item.event_type,
        "event_data": compact_json(item.event_data),
        "event_source": item.event_source,
        "event_timestamp": _ts(item.event_timestamp),
        "event_subject": item.event_subject,
        "event_extensions": compact_json(dict(item.event_extensions)),
        "handler_name": item.handler_name,
        "error": item.error,
        "error_type": item.error_type,
        "traceback": item.traceback,
        "attempt": item.attempt,
        "max_retries": item.max_retries,
        "reason": item.reason,
        "processed": int(item.processed),
        "created_at": _ts(item.created_at),
        "processed_at": _ts_or_none(item.processed_at),
        "first_failed_at": _ts_or_none(item.first_failed_at),
        "metadata": compact_json(dict(item.metadata)),
        "failure_group": item.failure_group,
    }


def _retry_from_row(row: Mapping[str, Any]) -> RetryItem:
    return RetryItem(
        id=row["id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        event_data=json.loads(row["event_data"]),
        event_source=row["event_source"],
        event_timestamp=_dt(row["event_timestamp"]),
        event_subject=row["event_subject"],
        event_extensions=_object(row["event_extensions"]),
        handler_name=row["handler_name"],
        error=row["error"],
        error_type=row["error_type"],
        traceback=row["traceback"],
        attempt=int(row["attempt"]),
        max_retries=int(row["max_retries"]),
        next_retry=_dt(row["next_retry"]),
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        lease_owner=row["lease_owner"],
        lease_until=_dt_or_none(row["lease_until"]),
        metadata=_object(row["metadata"]),
    )


def _dead_from_row(row: Mapping[str, Any]) -> DeadLetterItem:
    metadata: dict[str, Any]
    try:
        data = json.loads(row["event_data"])
        metadata = _object(row["metadata"])
    except ValueError:
        # A damaged dead letter is still shown: its payload as the text that is stored.
        data = row["event_data"]
        metadata = {"undecodable": True}
    return DeadLetterItem(
        id=row["id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        event_data=data,
        event_source=row["event_source"],
        event_timestamp=_dt(row["event_timestamp"]),
        event_subject=row["event_subject"],
        event_extensions=_object(row["event_extensions"]),
        handler_name=row["handler_name"],
        error=row["error"],
        error_type=row["error_type"],
        traceback=row["traceback"],
        attempt=int(row["attempt"]),
        max_retries=int(row["max_retries"]),
        reason=row["reason"],
        processed=bool(row["processed"]),
        created_at=_dt(row["created_at"]),
        processed_at=_dt_or_none(row["processed_at"]),
        first_failed_at=_dt_or_none(row["first_failed_at"]),
        metadata=metadata,
    )


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


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


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


class SQLiteStore(Store):
    """Both queues in one SQLite file (``sqlite:///path/to.db``)."""

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
            await self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _failure(self.url, exc, opening=True) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    async def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION (PRAGMA user_version). Safe to run by
        several processes at once: each step re-reads the version inside its
        transaction, and the back-fill commits in batches, so that other processes
        are not locked out for long and an interrupted upgrade resumes."""
        version = await self._retry_busy(lambda: _schema_version(conn))
        if version > SCHEMA_VERSION:
            raise StoreUnusable(
                f"SQLite store {self.url} has schema version {version}, newer than this "
                f"retrybus knows ({SCHEMA_VERSION}): upgrade retrybus to use it"
            )
        if version < SCHEMA_VERSION:
            await self._retry_busy(lambda: _transaction(conn, _upgrade_schema))
        while await self._retry_busy(lambda: _needs_backfill(conn)):
            await self._retry_busy(lambda: _transaction(conn, _backfill_failure_groups))
            await asyncio.sleep(0)  # let the event loop run between batches

    async def close(self) -> None:
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

    async def schema_version(self) -> int:
        """The schema version the file records (``PRAGMA user_version``)."""
        return await self._read(_schema_version)

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

    # retry queue -----------------------------------------------------------

    async def record_failures(
        self, retry_items: Sequence[RetryItem], dead_letters: Sequence[DeadLetterItem]
    ) -> None:
        retry_rows = [_retry_params(item) for item in retry_items]
        dead_rows = [_dead_params(item) for item in dead_letters]

        def run(conn: sqlite3.Connection) -> None:
            if retry_rows:
                added = conn.executemany(Q["insert_retry"], retry_rows).rowcount
                conn.execute(Q["add_counter"], (added, "retry_added"))
            if dead_rows:
                conn.executemany(Q["insert_dead"], dead_rows)

        await self._write(run)

    async def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_until: datetime
    ) -> list[RetryItem | CorruptRecord]:
        params = {"owner": owner, "lease_until": _ts(lease_until), "now": _ts(now), "limit": limit}
        rows = await self._write(lambda conn: _rows(conn.execute(Q["claim_due"], params)))
        return [decode_or_corrupt(row, _retry_from_row) for row in rows]

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        if not ids:
            return 0
        until = _ts(lease_until)

        def run(conn: sqlite3.Connection) -> int:
            extended = 0
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                sql = Q["extend_leases"].format(ids=placeholders(len(chunk)))
                extended += conn.execute(sql, (until, owner, *chunk)).rowcount
            return extended

        return await self._write(run)

    async def release(self, ids: Sequence[str], owner: str) -> int:
        if not ids:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            released = 0
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                sql = Q["release"].format(ids=placeholders(len(chunk)))
                released += conn.execute(sql, (owner, *chunk)).rowcount
            return released

        return await self._write(run)

    async def complete(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> set[str]:
        at = _ts(now)
        succeeded = [o.item.id for o in outcomes if isinstance(o, Succeeded)]
        rescheduled: list[dict[str, Any]] = [
            {**_reschedule_params(o.item), "owner": owner, "now": at}
            for o in outcomes
            if isinstance(o, Rescheduled)
        ]
        dead: list[tuple[dict[str, Any], dict[str, Any]]] = [
            ({"id": o.item_id, "owner": owner, "now": at}, _dead_params(o.dead_letter))
            for o in outcomes
            if isinstance(o, DeadLettered)
        ]

        def run(conn: sqlite3.Connection) -> set[str]:
            applied: set[str] = set()
            attempts = done = 0
            for start in range(0, len(succeeded), _CHUNK):
                chunk = succeeded[start : start + _CHUNK]
                sql = Q["delete_succeeded"].format(ids=placeholders(len(chunk)))
                cursor = conn.execute(sql, (owner, at, *chunk))
                for item_id, attempt in cursor.fetchall():
                    applied.add(item_id)
                    attempts += attempt
                    done += 1
            for params in rescheduled:
                if conn.execute(Q["reschedule"], params).rowcount:
                    applied.add(params["id"])
            moved = 0
            for held, dead_row in dead:
                if conn.execute(Q["delete_held"], held).rowcount:
                    conn.execute(Q["insert_dead"], dead_row)
                    applied.add(held["id"])
                    moved += 1
            if done:
                conn.execute(Q["add_counter"], (done, "retry_succeeded"))
                conn.execute(Q["add_counter"], (attempts, "retry_succeeded_attempts"))
            if moved:
                conn.execute(Q["add_counter"], (moved, "retry_dead_lettered"))
            return applied

        return await self._write(run)

    async def next_due(self) -> datetime | None:
        def run(conn: sqlite3.Connection) -> str | None:
            unleased = conn.execute(Q["next_due_unleased"]).fetchone()
            leased = conn.execute(Q["next_lease_end"]).fetchone()
            times = [row[0] for row in (unleased, leased) if row is not None and row[0] is not None]
            return min(times, default=None)

        text = await self._read(run)
        return None if text is None else _dt(text)

    async def retry_count(self) -> int:
        return int(await self._read(lambda conn: conn.execute(Q["retry_count"]).fetchone()[0]))

    async def count_due(self, before: datetime) -> int:
        return int(
            await self._read(
                lambda conn: conn.execute(Q["count_due"], (_ts(before),)).fetchone()[0]
            )
        )

    async def get_retry(self, item_id: str) -> RetryItem | None:
        rows = await self._read(lambda conn: _rows(conn.execute(Q["get_retry"], (item_id,))))
        return _retry_from_row(rows[0]) if rows else None

    async def list_retry(
        self,
        *,
        limit: int,
        offset: int,
        handler_name: str | None = None,
        event_type: str | None = None,
    ) -> list[RetryItem]:
        params = {
            "handler_name": handler_name,
            "event_type": event_type,
            "limit": limit,
            "offset": offset,
        }
        rows = await self._read(lambda conn: _rows(conn.execute(Q["list_retry"], params)))
        return [_retry_from_row(row) for row in rows]

    async def delete_retry(self, item_id: str) -> bool:
        return bool(
            await self._write(lambda conn: conn.execute(Q["delete_retry"], (item_id,)).rowcount)
        )

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        params = {"before": _ts(before), "now": _ts(now)}

        def run(conn: sqlite3.Connection) -> list[DeadLetterItem]:
            moved: list[DeadLetterItem] = []
            while True:
                rows = _rows(conn.execute(Q["take_expired"], params))
                if not rows:
                    break
                for row in rows:
                    record = decode_or_corrupt(row, _retry_from_row)
                    dead = (
                        corrupt_to_dead_letter(record, now, reason)
                        if isinstance(record, CorruptRecord)
                        else record.to_dead_letter(
                            reason=reason, now=now, attempt=record.attempt - 1
                        )
                    )
                    conn.execute(Q["insert_dead"], _dead_params(dead))
                    moved.append(dead)
            if moved:
                conn.execute(Q["add_counter"], (len(moved), "retry_dead_lettered"))
            return moved

        return await self._write(run)

    # dead letter queue -----------------------------------------------------

    async def list_dead(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterItem]:
        condition, params = _where(where)
        sql = Q["list_dead"].format(where=condition)
        params.update(limit=limit, offset=offset)
        rows = await self._read(lambda conn: _rows(conn.execute(sql, params)))
        return [_dead_from_row(row) for row in rows]

    async def count_dead(self, where: DeadLetterFilter) -> int:
        condition, params = _where(where)
        sql = Q["count_dead"].format(where=condition)
        return int(await self._read(lambda conn: conn.execute(sql, params).fetchone()[0]))

    async def group_dead(
        self, by: DeadLetterField, where: DeadLetterFilter, *, limit: int
    ) -> list[GroupCount]:
        if by not in DEAD_LETTER_GROUP_FIELDS:
            raise ValueError(f"cannot group dead letters by {by!r}: use {DEAD_LETTER_GROUP_FIELDS}")
        condition, params = _where(where)
        sql = Q["group_dead"].format(by=by, where=condition)
        params["limit"] = limit
        return _group_counts(await self._read(lambda conn: conn.execute(sql, params).fetchall()))

    async def get_dead(self, item_id: str) -> DeadLetterItem | None:
        rows = await self._read(lambda conn: _rows(conn.execute(Q["get_dead"], (item_id,))))
        return _dead_from_row(rows[0]) if rows else None

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        # ids are ASCII: every id with the prefix sorts below prefix + U+FFFF (byte order)
        params = (prefix, prefix + "\uffff", limit)
        rows = await self._read(lambda conn: conn.execute(Q["find_dead_ids"], params).fetchall())
        return [str(row[0]) for row in rows]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        params = _dead_params(item)
        return bool(await self._write(lambda conn: conn.execute(Q["update_dead"], params).rowcount))

    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        params = _retry_params(retry_item)

        def run(conn: sqlite3.Connection) -> bool:
            if not conn.execute(Q["delete_dead"], (item_id,)).rowcount:
                return False
            conn.execute(Q["insert_retry"], params)
            conn.execute(Q["add_counter"], (1, "retry_added"))
            return True

        return await self._write(run)

    async def delete_dead(self, item_id: str) -> bool:
        return bool(
            await self._write(lambda conn: conn.execute(Q["delete_dead"], (item_id,)).rowcount)
        )

    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            deleted = 0
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                sql = Q["delete_dead_many"].format(ids=placeholders(len(chunk)))
                deleted += conn.execute(sql, chunk).rowcount
            return deleted

        return await self._write(run)

    async def cleanup_dead(self, before: datetime) -> int:
        return int(
            await self._write(lambda conn: conn.execute(Q["cleanup_dead"], (_ts(before),)).rowcount)
        )

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        if by not in RETRY_GROUP_FIELDS:
            raise ValueError(f"cannot group retry items by {by!r}: use {RETRY_GROUP_FIELDS}")
        sql = Q["group_retry"].format(by=by)
        params = {"limit": limit}
        return _group_counts(await self._read(lambda conn: conn.execute(sql, params).fetchall()))

    # control records -------------------------------------------------------

    async def get_control(self, key: str) -> ControlRecord | None:
        row = await self._read(lambda conn: conn.execute(Q["get_control"], (key,)).fetchone())
        return None if row is None else _control_from_row(row)

    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        params = {
            "key": key,
            "value": encode_json(dict(value), f"control record {key!r}"),
            "version": version,
        }
        # one statement, in a BEGIN IMMEDIATE transaction: the compare-and-set is
        # atomic across processes
        sql = Q["create_control"] if version == 0 else Q["replace_control"]
        written = await self._write(lambda conn: conn.execute(sql, params).rowcount)
        return version + 1 if written else None

    async def list_control(self, prefix: str) -> list[ControlRecord]:
        rows = await self._read(
            lambda conn: conn.execute(Q["list_control"], {"prefix": prefix}).fetchall()
        )
        return [_control_from_row(row) for row in rows]

    async def delete_control(self, key: str) -> bool:
        return bool(
            await self._write(lambda conn: conn.execute(Q["delete_control"], (key,)).rowcount)
        )

    async def counters(self) -> Counters:
        rows = await self._read(lambda conn: conn.execute(Q["counters"]).fetchall())
        values = {name: int(value) for name, value in rows}
        return Counters(**{name: values.get(name, 0) for name in Counters.__dataclass_fields__})


def _transaction(conn: sqlite3.Connection, step: Callable[[sqlite3.Connection], None]) -> None:
    """Run ``step`` in one ``BEGIN IMMEDIATE`` transaction (for the migrations)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        step(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _set_schema_version(conn: sqlite3.Connection, version: int) -> None:
    conn.execute(f"PRAGMA user_version={int(version)}")  # PRAGMA takes no parameters


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _upgrade_schema(conn: sqlite3.Connection) -> None:
    """A new file gets the whole schema at SCHEMA_VERSION. A version 1 file gets the
    failure_group column, its index and the control table; its version moves on
    when ``_backfill_failure_groups`` has given every row its group. A version 1 or
    2 file gets the newest-first indexes rebuilt with ``id`` (once: one pass over
    the dead letters, in this transaction); a version 2 file is then at
    SCHEMA_VERSION."""
    version = _schema_version(conn)
    if version >= SCHEMA_VERSION:
        return
    if version == 1:
        columns = {row[0] for row in conn.execute(Q["dead_columns"])}
        if "failure_group" not in columns:
            conn.execute(Q["migrate_2_add_failure_group"])
    if version in (1, 2):
        indexed = [row[0] for row in conn.execute(Q["newest_first_index_columns"])]
        if indexed.count("id") < 2:  # not rebuilt yet (a version 1 upgrade can resume)
            _run_script(conn, Q["migrate_3_newest_first_indexes"])
    _run_script(conn, Q["schema"])
    if version in (0, 2):
        _set_schema_version(conn, SCHEMA_VERSION)


def _needs_backfill(conn: sqlite3.Connection) -> bool:
    """Whether dead letters lack their failure group: left by the upgrade from
    version 1, or written since by a process still at version 1 (an index lookup
    when there are none)."""
    if _schema_version(conn) < SCHEMA_VERSION:
        return True
    return conn.execute(Q["ungrouped_dead"], (1,)).fetchone() is not None


def _backfill_failure_groups(conn: sqlite3.Connection) -> None:
    """Give one batch of dead letters without a failure group theirs; when none is
    left, record that the file is at SCHEMA_VERSION."""
    rows = conn.execute(Q["ungrouped_dead"], (_BACKFILL_BATCH,)).fetchall()
    if not rows:
        if _schema_version(conn) < SCHEMA_VERSION:
            _set_schema_version(conn, SCHEMA_VERSION)
        return
    conn.executemany(
        Q["set_failure_group"],
        [
            (failure_group_key(str(handler), str(error_type), str(error)), rowid)
            for rowid, handler, error_type, error in rows
        ],
    )


def _reschedule_params(item: RetryItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "attempt": item.attempt,
        "next_retry": _ts(item.next_retry),
        "error": item.error,
        "error_type": item.error_type,
        "traceback": item.traceback,
        "updated_at": _ts(item.updated_at),
        "metadata": compact_json(dict(item.metadata)),
    }
