"""The application's own database connection, as the outbox and the inbox use it:
one small interface over an asyncpg connection, a SQLAlchemy 2 ``AsyncConnection``
or ``AsyncSession``, a ``sqlite3`` connection and an aiosqlite connection.

Every statement runs on the caller's connection, inside whatever transaction the
caller has open there: retrybus never begins, commits or rolls back one of them.
Queries are written in the driver's own placeholder style for their dialect
(``$1`` for PostgreSQL, ``?`` for SQLite) and rewritten to SQLAlchemy's ``:pN``
when they go through SQLAlchemy, so that a query reads the same on every driver.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from typing import Any, Literal, Protocol

__all__ = ["AppConnection", "Dialect", "app_connection", "create_tables", "has_table"]

Dialect = Literal["postgresql", "sqlite"]

_PG_PARAM = re.compile(r"\$(\d+)")


class AppConnection(Protocol):
    """One of the application's connections, its transaction left to the caller."""

    #: which SQL the connection speaks
    dialect: Dialect

    @property
    def raw(self) -> object:
        """The object the caller gave (the key of what is learnt about it)."""
        ...

    async def execute(self, query: str, args: Sequence[Any] = ()) -> None:
        """Run one statement."""
        ...

    async def execute_many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row of arguments."""
        ...

    async def fetch(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows as tuples."""
        ...


class _Asyncpg:
    dialect: Dialect = "postgresql"

    def __init__(self, connection: Any) -> None:
        self.raw = connection

    async def execute(self, query: str, args: Sequence[Any] = ()) -> None:
        await self.raw.execute(query, *args)

    async def execute_many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(query, rows)

    async def fetch(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self.raw.fetch(query, *args)]


class _Sqlite3:
    """A ``sqlite3`` connection: its statements take microseconds, so they run on
    the event loop's thread, as the SQLite store's do."""

    dialect: Dialect = "sqlite"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.raw = connection

    async def execute(self, query: str, args: Sequence[Any] = ()) -> None:
        self.raw.execute(query, tuple(args))

    async def execute_many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        self.raw.executemany(query, [tuple(row) for row in rows])

    async def fetch(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.raw.execute(query, tuple(args)).fetchall()]


class _Aiosqlite:
    dialect: Dialect = "sqlite"

    def __init__(self, connection: Any) -> None:
        self.raw = connection

    async def execute(self, query: str, args: Sequence[Any] = ()) -> None:
        cursor = await self.raw.execute(query, tuple(args))
        await cursor.close()

    async def execute_many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        cursor = await self.raw.executemany(query, [tuple(row) for row in rows])
        await cursor.close()

    async def fetch(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = await self.raw.execute(query, tuple(args))
        try:
            return [tuple(row) for row in await cursor.fetchall()]
        finally:
            await cursor.close()


class _SQLAlchemy:
    """A SQLAlchemy ``AsyncConnection`` (an ``AsyncSession`` gives its own, which
    begins the session's transaction if it has not begun yet). Statements go
    through SQLAlchemy, never around it to the driver: SQLAlchemy's asyncpg and
    aiosqlite adapters begin their transaction lazily, on the first statement
    they run, so a statement sent to the driver directly could commit on its own."""

    def __init__(self, connection: Any, session: Any = None) -> None:
        self.raw = session if session is not None else connection
        self._connection = connection
        name = connection.dialect.name
        if name not in ("postgresql", "sqlite"):
            raise ValueError(
                f"the outbox and the inbox work on PostgreSQL and SQLite; this "
                f"SQLAlchemy connection is to {name!r}"
            )
        self.dialect: Dialect = name

    def _statement(self, query: str, args: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        from sqlalchemy import text

        if self.dialect == "postgresql":
            named = _PG_PARAM.sub(lambda m: f":p{m.group(1)}", query)
            params = {f"p{index}": value for index, value in enumerate(args, 1)}
        else:
            parts = query.split("?")
            named = "".join(
                part + (f":p{index}" if index < len(parts) else "")
                for index, part in enumerate(parts, 1)
            )
            params = {f"p{index}": value for index, value in enumerate(args, 1)}
        # a PostgreSQL cast (::text) is not a bind parameter
        return text(named.replace("::", r"\:\:")), params

    async def execute(self, query: str, args: Sequence[Any] = ()) -> None:
        statement, params = self._statement(query, args)
        await self._connection.execute(statement, params)

    async def execute_many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        statement, _ = self._statement(query, rows[0])
        params = [{f"p{index}": value for index, value in enumerate(row, 1)} for row in rows]
        await self._connection.execute(statement, params)

    async def fetch(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        statement, params = self._statement(query, args)
        result = await self._connection.execute(statement, params)
        return [tuple(row) for row in result.fetchall()]


async def app_connection(connection: object) -> AppConnection:
    """The ``AppConnection`` of what the caller gave; ``TypeError`` naming its
    type when it is none of the supported connections."""
    if isinstance(connection, sqlite3.Connection):
        return _Sqlite3(connection)
    module = type(connection).__module__
    if module.startswith("asyncpg"):
        return _Asyncpg(connection)
    if module.startswith("aiosqlite"):
        return _Aiosqlite(connection)
    if module.startswith("sqlalchemy"):
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

        if isinstance(connection, AsyncSession):
            return _SQLAlchemy(await connection.connection(), session=connection)
        if isinstance(connection, AsyncConnection):
            return _SQLAlchemy(connection)
    raise TypeError(
        "connection must be an asyncpg connection, a SQLAlchemy AsyncConnection or "
        "AsyncSession, a sqlite3 connection or an aiosqlite connection, got "
        f"{type(connection).__module__}.{type(connection).__qualname__}"
    )


async def has_table(connection: AppConnection, name: str) -> bool:
    """Whether table ``name`` exists where ``connection`` looks for it (its
    search_path on PostgreSQL), asked so that no error can abort the caller's
    transaction."""
    query = (
        "SELECT to_regclass($1) IS NOT NULL"
        if connection.dialect == "postgresql"
        else "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?"
    )
    rows = await connection.fetch(query, [name])
    return bool(rows[0][0])


async def create_tables(connection: AppConnection, statements: Sequence[str], lock: str) -> None:
    """Run ``statements`` (``CREATE … IF NOT EXISTS``) on ``connection``, in the
    caller's transaction when one is open; on PostgreSQL under a
    transaction-level advisory lock named ``lock``, so that two first uses at
    once do not both create (``IF NOT EXISTS`` is not safe then)."""
    if connection.dialect == "postgresql":
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", [lock])
    for statement in statements:
        await connection.execute(statement)
