"""What a later release leaves in a store it migrated, written by hand: the next
schema (or key layout) version, and the compatible-from it records for it
(``retrybus._stores._compatibility``). The tests then open the store with today's
release, which is the older one there."""

from __future__ import annotations

import sqlite3
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg  # type: ignore[import-untyped]
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient

from engines import mongodb, postgresql, redis
from retrybus._stores.mongodb.migrate import LAYOUT_VERSION as MONGODB_VERSION
from retrybus._stores.postgresql import PostgresStore
from retrybus._stores.postgresql.migrate import SCHEMA_VERSION as POSTGRESQL_VERSION
from retrybus._stores.redis.migrate import LAYOUT_VERSION as REDIS_VERSION
from retrybus._stores.sqlite.migrate import SCHEMA_VERSION as SQLITE_VERSION

__all__ = ["TODAY", "migrate_as_later_release"]

#: today's schema (or key layout) version of each engine
TODAY = {
    "sqlite": SQLITE_VERSION,
    "postgresql": POSTGRESQL_VERSION,
    "redis": REDIS_VERSION,
    "mongodb": MONGODB_VERSION,
}


def _option(url: str, name: str) -> str:
    return parse_qs(urlsplit(url).query)[name][0]


async def migrate_as_later_release(kind: str, url: str, compatible_from: int | None) -> int:
    """Move the store at ``url`` (set up by today's release) to the next version,
    recording ``compatible_from`` for it (None: nothing); returns that version."""
    later = TODAY[kind] + 1
    if kind == "sqlite":
        conn = sqlite3.connect(urlsplit(url).path)
        try:
            conn.execute(f"PRAGMA user_version={later}")
            if compatible_from is not None:
                conn.execute(
                    "INSERT INTO retrybus_schema_compatibility VALUES (?, ?)",
                    (later, compatible_from),
                )
            conn.commit()
        finally:
            conn.close()
    elif kind == "postgresql":
        schema = _option(url, "schema")
        pg = await asyncpg.connect(PostgresStore.from_url(postgresql.URL)._dsn)
        try:
            await pg.execute(f'INSERT INTO "{schema}".retrybus_schema_version VALUES ($1)', later)
            if compatible_from is not None:
                await pg.execute(
                    f'INSERT INTO "{schema}".retrybus_schema_compatibility VALUES ($1, $2)',
                    later,
                    compatible_from,
                )
        finally:
            await pg.close()
    elif kind == "redis":
        prefix = _option(url, "prefix")
        client = aioredis.Redis.from_url(redis.REDIS_URL)
        try:
            await client.set(f"{prefix}:schema", later)
            if compatible_from is not None:
                await client.hset(f"{prefix}:schema:compatible_from", str(later), compatible_from)
        finally:
            await client.aclose()
    else:
        name = urlsplit(url).path.lstrip("/")
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb.server_uri())
        try:
            layout = mongo[name].retrybus_layout
            await layout.update_one({"_id": "layout"}, {"$set": {"version": later}})
            if compatible_from is not None:
                await layout.update_one(
                    {"_id": "compatible_from"}, {"$set": {str(later): compatible_from}}
                )
        finally:
            await mongo.close()
    return later
