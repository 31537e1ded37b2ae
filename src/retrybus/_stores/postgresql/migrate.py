"""The PostgreSQL store's versioned migration, and the back-fill of failure groups.

``migrate_schema`` runs when a store opens its pool (on first use,
``store.connect()`` or ``store.migrate()``): under a transaction-level advisory
lock per schema, so one process at a time, it creates the schema and the version
table and runs each step from the recorded version up to ``SCHEMA_VERSION``,
recording each, and the version's compatible-from (``_stores/_compatibility.py``).
A schema at a later version is used as it is when that version's compatible-from
is ``SCHEMA_VERSION`` or earlier, and refused (``StoreUnusable``) otherwise.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..._groups import failure_group_key
from .._compatibility import check_later_version, compatible_from
from .sql import Q, affected, quote

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

__all__ = [
    "COMPATIBLE_FROM",
    "FILL_BATCH",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "fill_failure_groups",
    "migrate_schema",
]

logger = logging.getLogger("retrybus.store.postgresql")

#: the version ``migrate_schema`` brings a schema to
SCHEMA_VERSION = 8
#: the oldest schema version whose code can still use a schema at SCHEMA_VERSION
#: (``_stores/_compatibility.py``): 8 only added a table that version 7 never reads
COMPATIBLE_FROM = 7
#: dead letters per round trip when failure groups are back-filled
FILL_BATCH = 1000


async def fill_failure_groups(
    conn: asyncpg.Connection, *, query: str = "dead_without_group"
) -> int:
    """Compute and store the failure group of every dead letter that has none (all
    of them when the version 2 migration runs, which reads them with ``query``
    ``dead_without_group_v2``: dead letters had no service yet; later, only rows an
    older retrybus wrote), ``FILL_BATCH`` at a time; returns how many."""
    batch = FILL_BATCH  # read now: it can be tuned (the tests make it small)
    filled = 0
    after = ""
    while True:
        rows = await conn.fetch(Q[query], after, batch)
        if not rows:
            return filled
        ids = [row["id"] for row in rows]
        groups = [
            failure_group_key(row["handler_name"], row["error_type"], row["error"], row["service"])
            for row in rows
        ]
        filled += affected(await conn.execute(Q["set_failure_groups"], ids, groups))
        after = ids[-1]


async def _migrate_v1(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["schema_v1"])


async def _migrate_v2(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["schema_v2"])
    filled = await fill_failure_groups(conn, query="dead_without_group_v2")
    if filled:
        logger.info("stored the failure group of %d dead letters", filled)
    # after the back-fill, so that the new indexes are built once rather than
    # updated row by row
    await conn.execute(Q["schema_v2_indexes"])


async def _migrate_v3(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["schema_v3"])


async def _migrate_v4(conn: asyncpg.Connection) -> None:
    # the claims column, and the handler_name index ordered by next_retry
    await conn.execute(Q["schema_v4"])


async def _migrate_v5(conn: asyncpg.Connection) -> None:
    # no index of leases, and room on each page: claims are HOT updates
    await conn.execute(Q["schema_v5"])


async def _migrate_v6(conn: asyncpg.Connection) -> None:
    # services: the service of each record, the handler index led by it, the
    # subscriptions, their revision and the workers' heartbeats
    await conn.execute(Q["schema_v6"])


async def _migrate_v7(conn: asyncpg.Connection) -> None:
    # ordering keys: the columns, their index, the trigger that numbers keyed rows
    await conn.execute(Q["schema_v7"])


async def _migrate_v8(conn: asyncpg.Connection) -> None:
    # the inbox: remembered successes
    await conn.execute(Q["schema_v8"])


#: the step that brings a schema to each version
MIGRATIONS: dict[int, Callable[[asyncpg.Connection], Awaitable[None]]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
    4: _migrate_v4,
    5: _migrate_v5,
    6: _migrate_v6,
    7: _migrate_v7,
    8: _migrate_v8,
}


def _lock_key(schema: str) -> int:
    """A signed 64-bit advisory lock key for migrating ``schema``."""
    digest = hashlib.sha256(f"retrybus.migrate.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate_schema(conn: asyncpg.Connection, *, schema: str, url: str) -> int:
    """Bring ``schema`` to ``SCHEMA_VERSION`` on ``conn`` (whose search_path is
    ``schema``), in one transaction; returns the version it is at. ``url`` (without
    its password) names the store in the log."""
    async with conn.transaction():
        # one migrator per schema at a time, across processes; released at commit
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(schema)}")
        await conn.execute(Q["version_table"])
        await conn.execute(Q["compatibility_table"])
        version = int(await conn.fetchval(Q["current_version"]))
        if version > SCHEMA_VERSION:
            # a later release's schema: used as it is if that release says this one can
            recorded = await conn.fetchval(Q["compatible_from"], version)
            check_later_version(f"PostgreSQL store {url}", version, SCHEMA_VERSION, recorded)
            return version
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await MIGRATIONS[target](conn)
            await conn.execute(Q["record_version"], target)
            logger.info("migrated %s (schema %s) to version %d", url, schema, target)
            version = target
        await conn.execute(
            Q["record_compatible_from"],
            SCHEMA_VERSION,
            compatible_from(COMPATIBLE_FROM, SCHEMA_VERSION),
        )
        return version
