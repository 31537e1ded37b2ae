"""The Redis engine for the conformance suite: a key prefix of its own per test.

The server (``RETRYBUS_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``) is
shared: a test deletes only the keys under its own prefix (SCAN + DEL), never FLUSHDB.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from retrybus._stores.redis import RedisStore

from ._common import unavailable, unique_name

REDIS_URL = os.environ.get("RETRYBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def server_name() -> str:
    parts = urlsplit(REDIS_URL)
    return f"Redis at {parts.hostname}:{parts.port or 6379}"


def store_url(prefix: str) -> str:
    separator = "&" if "?" in REDIS_URL else "?"
    return f"{REDIS_URL}{separator}prefix={prefix}"


async def delete_prefix(prefix: str) -> None:
    """Delete every key under ``prefix:`` (SCAN + DEL)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


async def ping() -> None:
    """Skip (or, with CI=true, fail) when the server does not answer."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        unavailable(server_name(), str(exc).splitlines()[0] if str(exc) else repr(exc))
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def open_test_store(prefix: str | None = None) -> AsyncIterator[RedisStore]:
    """A connected store under a fresh prefix; its keys are deleted afterwards."""
    await ping()
    prefix = prefix or unique_name()
    store = RedisStore.from_url(store_url(prefix))
    try:
        await store.connect()
        yield store
    finally:
        await store.close()
        await delete_prefix(prefix)
