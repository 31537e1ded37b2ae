"""The PostgreSQL engine for the conformance suite: a fresh schema per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg  # type: ignore[import-untyped]

from retrybus import RetryItem, Store
from retrybus._stores.postgresql import PostgresStore

from ._common import Features, Undecodable, WorkerLoad, unavailable, unique_name

URL = os.environ.get("RETRYBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WHAT = "PostgreSQL at 127.0.0.1:5432"

FEATURES = Features(
    on_a_server=True,
    survives_reopen=True,
    can_corrupt_records=True,
    has_url_with_password=True,
    can_be_unreachable=True,
    shared_across_processes=True,
)


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


def namespace_url(store: Store) -> str:
    assert isinstance(store, PostgresStore)
    return url_with_schema(store.schema)


async def write_undecodable_records(store: Store, victim: RetryItem) -> list[Undecodable]:
    """Extensions that are no object in ``victim``'s row, and a row written by hand
    without its event's fields."""
    assert isinstance(store, PostgresStore)
    schema = store.schema
    conn = await asyncpg.connect(PostgresStore.from_url(URL)._dsn)
    try:
        await conn.execute(
            f"UPDATE \"{schema}\".retry_queue SET event_extensions = '[1, 2]' WHERE id = $1",
            victim.id,
        )
        await conn.execute(
            f'INSERT INTO "{schema}".retry_queue (id, event_id, event_type, handler_name,'
            " next_retry, created_at, updated_at)"
            " VALUES ('retry_hand', 'e1', 'x', 'h', '2000-01-01Z', '2000-01-01Z', '2000-01-01Z')"
        )
    finally:
        await conn.close()
    return [
        Undecodable(victim.id, fields={"event_id": victim.event_id}),
        Undecodable(
            "retry_hand",
            reason_has=("event_data",),
            fields={"event_id": "e1", "event_type": "x", "handler_name": "h"},
        ),
    ]


MALFORMED_URLS = [
    ("postgresql://me:s3cret@host:notaport/db", "malformed store URL"),
    ("postgresql://me@host:notaport/db", "malformed store URL"),
    ("postgresql://me:s3cret@host/db?schema=bad-name", "schema"),
    ("postgresql://me:s3cret@host/db?schema=", "schema"),
    ("postgresql://me:s3cret@host/db?schema=pg_mine", "schema"),
    ("postgresql://me:s3cret@host/db?colour=blue", "unknown option"),
    ("postgresql://me:s3cret@host/db?pool_max=many", "pool_max"),
    ("postgresql://me:s3cret@host/db/extra", "one database name"),
    ("postgresql://me:s3cret@host/db?synchronous_commit=maybe", "synchronous_commit"),
]

UNREACHABLE = (
    "postgresql://me:s3cret@127.0.0.1:1/test?connect_timeout=2",
    "cannot connect to PostgreSQL store",
)

WORKER_LOAD = WorkerLoad(items=10_000, batch_size=100, lease=60)
