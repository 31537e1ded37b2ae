"""The relay's side of the outbox table: its own connection to the application's
database (``postgresql://…[?schema=NAME]`` or ``sqlite:///path``), the claims,
the deletions, and the depth the dashboard and the metrics show.

Ordering keys: a claim takes only the earliest row of each key (a row waits
while an earlier one of its key is there, claimed by another relay or not), so
the rows of a key are published one batch after another, in id order, which the
staging lock (``ORDER_LOCK``) makes their commit order.

PostgreSQL: a claim is one transaction that deletes a batch of rows
``FOR UPDATE SKIP LOCKED`` (so any number of relays share the table, none
waiting on another's rows) and stays open while the relay publishes them: a
relay that dies or fails rolls back, and the rows are there again for the next.
SQLite has no row locks: a claim marks the rows with the relay's name and a
lease in one short transaction (never holding the file's write lock while it
publishes), and the rows are deleted once published, or left to the next claim
when the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

from .._errors import StoreUnavailable
from .._inbox.table import CREATE as INBOX_CREATE
from .._stores._codec import parse_text_time, text_time
from .._stores._url import redact, split
from .table import CREATE, TABLE, OutboxRow

__all__ = ["OutboxDatabase", "OutboxDepth", "open_outbox_database"]

T = TypeVar("T")
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

_PG_CLAIM = f"""
DELETE FROM {TABLE} o USING (
    SELECT id FROM {TABLE} AS t
    WHERE t.ordering_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM {TABLE} AS e WHERE e.ordering_key = t.ordering_key AND e.id < t.id
    )
    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
) AS picked
WHERE o.id = picked.id
RETURNING o.id, o.service, o.event::text, o.ordering_key, o.staged_at
"""
_PG_DEPTH = f"SELECT count(*), min(staged_at) FROM {TABLE}"

_SQLITE_CLAIM = f"""
UPDATE {TABLE} SET claimed_by = ?, claimed_until = ?
WHERE id IN (
    SELECT id FROM {TABLE} AS t
    WHERE (claimed_until IS NULL OR claimed_until <= ?)
      AND (t.ordering_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {TABLE} AS e WHERE e.ordering_key = t.ordering_key AND e.id < t.id
      ))
    ORDER BY id LIMIT ?
)
RETURNING id, service, event, ordering_key, staged_at
"""
_SQLITE_DEPTH = f"SELECT count(*), min(staged_at) FROM {TABLE}"


class OutboxDepth:
    """How many staged events wait in an outbox table, and the oldest's age."""

    __slots__ = ("oldest", "rows")

    def __init__(self, rows: int, oldest: datetime | None) -> None:
        self.rows = rows
        self.oldest = oldest

    def age(self, now: datetime) -> float:
        """Seconds the oldest row has waited (0 for none)."""
        return 0.0 if self.oldest is None else max(0.0, (now - self.oldest).total_seconds())


class OutboxDatabase:
    """What a relay does to one application database's outbox table."""

    #: the URL, password removed
    url: str
    #: a short name of the database (the metrics' ``outbox`` label): PostgreSQL's
    #: database name (``/schema`` added when given), SQLite's file name
    label: str

    async def create(self) -> None:
        """Create the table (and the inbox's, ``retrybus_inbox``) unless they exist."""
        raise NotImplementedError

    def claim(
        self, limit: int, lease: float, now: datetime
    ) -> contextlib.AbstractAsyncContextManager[list[OutboxRow]]:
        """Up to ``limit`` rows, oldest first, no other relay's; deleted when the
        block ends without an error, given back otherwise."""
        raise NotImplementedError

    async def depth(self) -> OutboxDepth:
        """The rows waiting and the oldest's staging time."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connections."""
        raise NotImplementedError


class _Postgres(OutboxDatabase):
    def __init__(self, url: str, dsn: str, schema: str | None) -> None:
        self.url = redact(url)
        database = split(url).path.lstrip("/") or "postgres"
        self.label = f"{database}/{schema}" if schema else database
        self._dsn = dsn
        self._schema = schema
        self._pool: Any = None

    async def _get_pool(self) -> Any:
        if self._pool is None:
            import asyncpg  # type: ignore[import-untyped]

            settings = {"search_path": self._schema} if self._schema else {}
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=2, server_settings=settings
            )
        return self._pool

    async def _run(self, operation: Callable[[Any], Awaitable[T]]) -> T:
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                return await operation(conn)
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"outbox database {self.url} failed: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("asyncpg"):
                raise StoreUnavailable(f"outbox database {self.url} failed: {exc}") from exc
            raise

    async def create(self) -> None:
        async def run(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('retrybus.outbox.create'))"
                )
                for statement in CREATE["postgresql"]:
                    await conn.execute(statement)
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('retrybus.inbox.create'))"
                )
                for statement in INBOX_CREATE["postgresql"]:
                    await conn.execute(statement)

        await self._run(run)

    @contextlib.asynccontextmanager
    async def claim(
        self, limit: int, lease: float, now: datetime
    ) -> AsyncIterator[list[OutboxRow]]:
        conn: Any = None
        transaction: Any = None
        pool: Any = None
        try:
            pool = await self._get_pool()
            conn = await pool.acquire()
            transaction = conn.transaction()
            await transaction.start()
            rows = [OutboxRow(*row) for row in await conn.fetch(_PG_CLAIM, limit)]
        except Exception as exc:
            await _give_back(pool, conn, transaction)
            raise StoreUnavailable(f"outbox database {self.url} failed: {exc}") from exc
        try:
            yield rows
        except BaseException:
            await _give_back(pool, conn, transaction)
            raise
        try:
            await transaction.commit()
        except Exception as exc:
            raise StoreUnavailable(
                f"outbox database {self.url} failed to delete relayed rows: {exc}"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                await pool.release(conn)

    async def depth(self) -> OutboxDepth:
        row = await self._run(lambda conn: conn.fetchrow(_PG_DEPTH))
        return OutboxDepth(int(row[0]), row[1])

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


class _Sqlite(OutboxDatabase):
    def __init__(self, url: str, path: str, busy_timeout: float = 30.0) -> None:
        self.url = url
        self.label = os.path.basename(path)
        self._path = path
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._owner = f"relay-{uuid.uuid4().hex[:12]}"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self._path, isolation_level=None, timeout=0, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            self._conn = conn
        return self._conn

    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """``operation`` in one ``BEGIN IMMEDIATE`` transaction, waiting (on the
        event loop) while another connection holds the write lock."""
        pause = 0.0005
        deadline = asyncio.get_running_loop().time() + self._busy_timeout
        while True:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreUnavailable(f"outbox database {self.url} failed: {exc}") from exc
                if asyncio.get_running_loop().time() >= deadline:
                    raise StoreUnavailable(
                        f"outbox database {self.url} stayed locked for {self._busy_timeout:g}s"
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
        try:
            result = operation(conn)
            conn.execute("COMMIT")
            return result
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreUnavailable(f"outbox database {self.url} failed: {exc}") from exc
            raise

    async def create(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            for statement in (*CREATE["sqlite"], *INBOX_CREATE["sqlite"]):
                conn.execute(statement)

        await self._write(run)

    @contextlib.asynccontextmanager
    async def claim(
        self, limit: int, lease: float, now: datetime
    ) -> AsyncIterator[list[OutboxRow]]:
        until = text_time(now + timedelta(seconds=lease))

        def take(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(_SQLITE_CLAIM, (self._owner, until, text_time(now), limit))
            return sorted(
                (
                    OutboxRow(id, service, event, key, parse_text_time(staged))
                    for id, service, event, key, staged in rows.fetchall()
                ),
                key=lambda row: row.id,
            )

        rows = await self._write(take)
        ids = [row.id for row in rows]
        try:
            yield rows
        except BaseException:
            with contextlib.suppress(Exception):
                await self._write(lambda conn: _release(conn, ids, self._owner))
            raise
        if ids:
            await self._write(lambda conn: _delete(conn, ids, self._owner))

    async def depth(self) -> OutboxDepth:
        def read(conn: sqlite3.Connection) -> OutboxDepth:
            count, oldest = conn.execute(_SQLITE_DEPTH).fetchone()
            return OutboxDepth(int(count), None if oldest is None else parse_text_time(oldest))

        try:
            return read(self._connection())
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"outbox database {self.url} failed: {exc}") from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


async def _give_back(pool: Any, conn: Any, transaction: Any) -> None:
    """Roll back what a claim began and return its connection (each step only if
    it was reached; a connection the server dropped fails quietly)."""
    if transaction is not None:
        with contextlib.suppress(Exception):
            await transaction.rollback()
    if conn is not None:
        with contextlib.suppress(Exception):
            await pool.release(conn)


def _delete(conn: sqlite3.Connection, ids: list[int], owner: str) -> None:
    conn.execute(
        f"DELETE FROM {TABLE} WHERE claimed_by = ? AND id IN (SELECT value FROM json_each(?))",
        (owner, _json_ids(ids)),
    )


def _release(conn: sqlite3.Connection, ids: list[int], owner: str) -> None:
    conn.execute(
        f"UPDATE {TABLE} SET claimed_by = NULL, claimed_until = NULL "
        "WHERE claimed_by = ? AND id IN (SELECT value FROM json_each(?))",
        (owner, _json_ids(ids)),
    )


def _json_ids(ids: list[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


def open_outbox_database(url: str) -> OutboxDatabase:
    """The outbox table a relay reads at ``url``: ``postgresql://…`` (with
    ``?schema=NAME`` when the table is not in the default search path) or
    ``sqlite:///path``. ``ValueError`` naming a URL of another kind."""
    parts = split(url)
    scheme = parts.scheme.lower()
    if scheme in ("postgresql", "postgres"):
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [value for key, value in pairs if key == "schema"]
        schema = schemas[-1] if schemas else None
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(
                f"schema must be a plain identifier, got {schema!r} in {redact(url)!r}"
            )
        rest = urlencode([(key, value) for key, value in pairs if key != "schema"])
        dsn = parts._replace(query=rest).geturl()
        return _Postgres(url, dsn, schema)
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else ""
        if not path or "?" in path:
            raise ValueError(f"an outbox SQLite URL is sqlite:///path/to/app.db, got {url!r}")
        return _Sqlite(url, path)
    raise ValueError(
        f"the outbox is a table of a PostgreSQL or SQLite database: expected "
        f"postgresql://… or sqlite:///…, got {redact(url)!r}"
    )
