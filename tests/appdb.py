"""Application databases for the outbox and inbox tests: a PostgreSQL database of
its own per test (created on the shared server, dropped afterwards), and the
connection kinds an application hands to ``bus.outbox.stage``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg  # type: ignore[import-untyped]

from engines._common import unavailable, unique_name
from engines.postgresql import URL, WHAT
from retrybus._stores.postgresql import PostgresStore

__all__ = ["database_url", "fresh_database"]


def database_url(name: str) -> str:
    """The URL of database ``name`` on the test server."""
    base = URL.split("?", 1)[0]
    return base.rsplit("/", 1)[0] + "/" + name


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database's URL, dropped afterwards (its sessions
    ended first); skips (or fails in CI) when the server is unreachable."""
    dsn = PostgresStore.from_url(URL)._dsn
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        unavailable(WHAT, f"{type(exc).__name__}: {exc}")
    name = unique_name("retrybus_app")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield database_url(name)
    finally:
        admin = await asyncpg.connect(dsn, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
