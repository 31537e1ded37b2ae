"""The PostgreSQL store's migration steps, and the back-fill of failure groups.

``PostgresStore`` checks the schema version on every connect but imports this
module only when there is a step to run (or a failure group to fill), so that a
process on an up-to-date schema never loads it. The queries are those of
``postgresql.sql``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg  # type: ignore[import-untyped]

from .._groups import failure_group_key
from . import postgresql
from .postgresql import SCHEMA_VERSION, Q, _affected

logger = logging.getLogger("retrybus.store.postgresql")


async def fill_failure_groups(conn: asyncpg.Connection) -> int:
    """Compute and store the failure group of every dead letter that has none (all
    of them when the version 2 migration runs; later, only rows an older retrybus
    wrote), ``postgresql.FILL_BATCH`` at a time; returns how many."""
    batch = postgresql.FILL_BATCH  # read now: it can be tuned (the tests make it small)
    filled = 0
    after = ""
    while True:
        rows = await conn.fetch(Q["dead_without_group"], after, batch)
        if not rows:
            return filled
        ids = [row["id"] for row in rows]
        groups = [
            failure_group_key(row["handler_name"], row["error_type"], row["error"]) for row in rows
        ]
        filled += _affected(await conn.execute(Q["set_failure_groups"], ids, groups))
        after = ids[-1]


async def _migrate_v1(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["schema_v1"])


async def _migrate_v2(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["schema_v2"])
    filled = await fill_failure_groups(conn)
    if filled:
        logger.info("stored the failure group of %d dead letters", filled)
    # after the back-fill, so that the new indexes are built once rather than
    # updated row by row
    await conn.execute(Q["schema_v2_indexes"])


async def _migrate_v3(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["schema_v3"])


MIGRATIONS: dict[int, Callable[[asyncpg.Connection], Awaitable[None]]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
}


async def upgrade(conn: asyncpg.Connection, version: int, *, url: str, schema: str) -> int:
    """Run the steps from ``version`` to ``SCHEMA_VERSION`` on ``conn``, in
    the caller's transaction (which holds the migration lock); returns the version reached."""
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await MIGRATIONS[target](conn)
        await conn.execute(Q["record_version"], target)
        logger.info("migrated %s (schema %s) to version %d", url, schema, target)
        version = target
    return version
