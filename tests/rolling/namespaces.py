"""Fresh store namespaces as URLs, not yet opened by any release: the release that
opens one first sets it up at its own schema version."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from engines import mongodb, postgresql, redis
from engines._common import unique_name

__all__ = ["fresh_url"]


@asynccontextmanager
async def fresh_url(kind: str, directory: Path) -> AsyncIterator[str]:
    """The URL of an empty namespace of engine ``kind`` (a SQLite file in
    ``directory``, a schema, a key prefix, a database), removed afterwards; skips
    (or fails in CI) when the engine's server does not answer."""
    if kind == "sqlite":
        yield f"sqlite:///{(directory / f'{unique_name()}.db').resolve()}"
    elif kind == "postgresql":
        async with postgresql.fresh_schema() as schema:
            yield postgresql.url_with_schema(schema)
    elif kind == "redis":
        await redis.ping()
        prefix = unique_name()
        try:
            yield redis.store_url(prefix)
        finally:
            await redis.delete_prefix(prefix)
    elif kind == "mongodb":
        name = unique_name()
        url = mongodb.database_url(name, timeout="30")
        try:
            yield url
        finally:
            await mongodb.drop_database(url, name)
    else:
        raise ValueError(f"no rolling upgrades for engine {kind!r}")
