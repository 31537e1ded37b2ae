"""The Redis engine for the conformance suite: a key prefix of its own per test.

The server (``RETRYBUS_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``) is
shared: a test deletes only the keys under its own prefix (SCAN + DEL), never FLUSHDB.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from retrybus import RetryItem, Store
from retrybus._stores.redis import RedisStore
from retrybus._stores.redis.codec import to_score

from ._common import Features, Undecodable, WorkerLoad, unavailable, unique_name

REDIS_URL = os.environ.get("RETRYBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

FEATURES = Features(
    on_a_server=True,
    survives_reopen=True,
    can_corrupt_records=True,
    has_url_with_password=True,
    can_be_unreachable=True,
    shared_across_processes=True,
)


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


def namespace_url(store: Store) -> str:
    assert isinstance(store, RedisStore)
    return store_url(store.prefix)


async def write_undecodable_records(store: Store, victim: RetryItem) -> list[Undecodable]:
    """Bad JSON in place of ``victim``'s record, and two records written by hand (and
    indexed as due): one with missing fields, one whose time is not one."""
    assert isinstance(store, RedisStore)
    items = f"{store.prefix}:retry:items"
    due = float(to_score(datetime(2000, 1, 1, tzinfo=UTC)))
    raw = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        complete = json.loads(await raw.hget(items, victim.id) or "")
        await raw.hset(items, victim.id, '{"attempt":1,"id": not json')
        hand_written = {
            "retry_hand": {"id": "retry_hand", "event_id": "e1", "handler_name": "h"},
            "retry_when": {**complete, "id": "retry_when", "next_retry": "yesterday"},
        }
        for item_id, record in hand_written.items():
            await raw.hset(items, item_id, json.dumps(record))
            for key in ("retry:next", "retry:ready", "retry:created"):
                await raw.zadd(f"{store.prefix}:{key}", {item_id: due})
    finally:
        await raw.aclose()
    return [
        Undecodable(victim.id),
        Undecodable(
            "retry_hand",
            reason_has=("event_type",),
            fields={"event_id": "e1", "handler_name": "h"},
        ),
        Undecodable(
            "retry_when",
            reason_has=("yesterday",),
            fields={"event_id": victim.event_id, "handler_name": victim.handler_name},
            # the event data stays the JSON text it was stored as
            raw_record={"event_data": json.dumps(victim.event_data, separators=(",", ":"))},
        ),
    ]


MALFORMED_URLS = [
    ("redis://127.0.0.1:6379/zero", "must be a database number"),
    ("redis://user:s3cret@127.0.0.1:6379/x", "must be a database number"),
    ("redis://127.0.0.1:6379/0?prefix=a:b", "prefix"),
    ("redis://127.0.0.1:6379/0?prefix=", "prefix"),
    ("redis://127.0.0.1:6379/0?colour=blue", "unknown option 'colour'"),
    ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://user:s3cret@127.0.0.1:99999/0", "Port out of range"),
    ("redis://", "no host"),
]

UNREACHABLE = ("redis://user:s3cret@127.0.0.1:1/0?prefix=p", "Redis store")

WORKER_LOAD = WorkerLoad(items=10_000, batch_size=50, lease=30, sleep_max=0.001)
