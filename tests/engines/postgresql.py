"""The PostgreSQL engine for the conformance suite: a fresh schema per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg  # type: ignore[import-untyped]

from retrybus._stores.postgresql import PostgresStore

from ._common import unavailable, unique_name

URL = os.environ.get("RETRYBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WHAT = "PostgreSQL at 127.0.0.1:5432"


def url_with_schema(schema: str, base: str = URL) -> str:
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"


async def drop_schema(schema: str, base: str = URL) -> None:
    conn = await asyncpg.connect(PostgresStore.from_url(base)._dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A unique schema name (the store creates the schema), dropped afterwards;
    skips (or fails in CI) when the server is unreachable."""
    try:
        conn = await asyncpg.connect(PostgresStore.from_url(URL)._dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        unavailable(WHAT, f"{type(exc).__name__}: {exc}")
    await conn.close()
    schema = unique_name()
    try:
        yield schema
    finally:
        await drop_schema(schema)


@asynccontextmanager
async def open_test_store() -> AsyncIterator[PostgresStore]:
    async with fresh_schema() as schema:
        store = PostgresStore.from_url(url_with_schema(schema))
        try:
            await store.connect()
            yield store
        finally:
            await store.close()
