"""Application databases for the inbox tests: a PostgreSQL schema of its own
(asyncpg, SQLAlchemy AsyncSession on asyncpg) or a SQLite file in tmp_path
(sqlite3, aiosqlite), each with an ``effects`` table a handler writes to, and a
way to open one transaction on it (committed when the block ends, rolled back
on an error)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from engines.postgresql import URL, fresh_schema
from retrybus._appdb import app_connection
from retrybus._stores.postgresql import PostgresStore

APP_KINDS = ["asyncpg", "sqlalchemy", "sqlite3", "aiosqlite"]


class AppDb:
    """One application database and how to open a transaction on it."""

    def __init__(self, kind: str, *, schema: str | None = None, path: Path | None = None):
        self.kind = kind
        self.schema = schema
        self.path = path
        self.dialect = "sqlite" if path is not None else "postgresql"
        self._engine: Any = None

    @property
    def dsn(self) -> str:
        return PostgresStore.from_url(URL)._dsn

    async def setup(self) -> None:
        if self.dialect == "postgresql":
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(f'CREATE SCHEMA "{self.schema}"')
                await conn.execute(
                    f'CREATE TABLE "{self.schema}".effects (event_id text, handler text)'
                )
            finally:
                await conn.close()
            if self.kind == "sqlalchemy":
                from sqlalchemy.ext.asyncio import create_async_engine

                url = URL.replace("postgresql://", "postgresql+asyncpg://", 1)
                from sqlalchemy.pool import NullPool

                # NullPool: a test's second delivery runs on another thread's loop
                self._engine = create_async_engine(
                    url,
                    connect_args={"server_settings": {"search_path": self.schema}},
                    poolclass=NullPool,
                )
        else:
            conn3 = sqlite3.connect(self.path, isolation_level=None)
            conn3.execute("PRAGMA journal_mode=WAL")
            conn3.execute("CREATE TABLE effects (event_id TEXT, handler TEXT)")
            conn3.close()

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """One transaction: yields the object to give ``inbox.claim``."""
        if self.kind == "asyncpg":
            conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
            try:
                async with conn.transaction():
                    yield conn
            finally:
                await conn.close()
        elif self.kind == "sqlalchemy":
            from sqlalchemy.ext.asyncio import AsyncSession

            async with AsyncSession(self._engine) as session, session.begin():
                yield session
        elif self.kind == "sqlite3":
            conn3 = sqlite3.connect(
                self.path, isolation_level=None, timeout=30, check_same_thread=False
            )
            try:
                conn3.execute("BEGIN IMMEDIATE")  # SQLite's advice for a writing transaction
                try:
                    yield conn3
                except BaseException:
                    conn3.execute("ROLLBACK")
                    raise
                conn3.execute("COMMIT")
            finally:
                conn3.close()
        else:
            import aiosqlite

            conn_a = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
            try:
                await conn_a.execute("BEGIN IMMEDIATE")
                try:
                    yield conn_a
                except BaseException:
                    await conn_a.execute("ROLLBACK")
                    raise
                await conn_a.execute("COMMIT")
            finally:
                await conn_a.close()

    async def write_effect(self, connection: Any, event_id: str, handler: str) -> None:
        app = await app_connection(connection)
        mark = "$1, $2" if self.dialect == "postgresql" else "?, ?"
        await app.execute(
            f"INSERT INTO effects (event_id, handler) VALUES ({mark})", (event_id, handler)
        )

    async def rows(self, query: str) -> list[tuple[Any, ...]]:
        if self.dialect == "postgresql":
            conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
            try:
                return [tuple(r) for r in await conn.fetch(query)]
            finally:
                await conn.close()
        conn3 = sqlite3.connect(self.path)
        try:
            return [tuple(r) for r in conn3.execute(query).fetchall()]
        finally:
            conn3.close()

    async def claims(self) -> list[tuple[Any, ...]]:
        """The inbox's claims (service, handler, event id); none before its table exists
        (a first claim rolled back takes the table's creation with it)."""
        if self.dialect == "postgresql":
            exists = await self.rows("SELECT to_regclass('retrybus_inbox') IS NOT NULL")
        else:
            exists = await self.rows(
                "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'retrybus_inbox'"
            )
        if not exists[0][0]:
            return []
        return await self.rows(
            "SELECT service, handler, event_id FROM retrybus_inbox ORDER BY claimed_at"
        )

    async def effects(self, event_id: str) -> int:
        """The effect rows of ``event_id`` (an id the test made: plain letters and digits)."""
        assert event_id.isalnum(), event_id
        rows = await self.rows(f"SELECT count(*) FROM effects WHERE event_id = '{event_id}'")
        return int(rows[0][0])


@asynccontextmanager
async def app_db(kind: str, tmp_path: Path) -> AsyncIterator[AppDb]:
    if kind in ("asyncpg", "sqlalchemy"):
        async with fresh_schema() as schema:
            db = AppDb(kind, schema=schema)
            await db.setup()
            try:
                yield db
            finally:
                await db.close()
    else:
        db = AppDb(kind, path=tmp_path / "app.db")
        await db.setup()
        yield db
