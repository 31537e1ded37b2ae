"""The ``retrybus_inbox`` table in the application's database: one row per
delivery whose effect committed (``bus.inbox.claim``), keyed by the delivery id
(service, event source and id, handler), and the statements on it, for
PostgreSQL and SQLite.

Rows older than the bus's ``inbox_retention`` are deleted a few at a time, in
the claiming transaction, on about one claim in ``PRUNE_EVERY`` (and by
``Inbox.prune``): ``SKIP LOCKED`` on PostgreSQL, so a prune never waits for
another transaction's rows.
"""

from __future__ import annotations

from .._appdb import AppConnection, Dialect, create_tables, has_table

__all__ = [
    "CLAIM",
    "CREATE",
    "PRUNE",
    "PRUNE_BATCH",
    "PRUNE_EVERY",
    "TABLE",
    "create_table",
    "table_exists",
]

#: the table's name, in the connection's schema (PostgreSQL's search_path)
TABLE = "retrybus_inbox"

#: a claim prunes old rows on about one claim in this many
PRUNE_EVERY = 64
#: the most rows one prune deletes (several times PRUNE_EVERY: prunes keep up)
PRUNE_BATCH = 500

CREATE: dict[Dialect, tuple[str, ...]] = {
    "postgresql": (
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            id            text PRIMARY KEY,
            service       text NOT NULL,
            handler       text NOT NULL,
            event_id      text NOT NULL,
            event_source  text NOT NULL,
            claimed_at    timestamptz NOT NULL
        )""",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_claimed_at ON {TABLE} (claimed_at)",
    ),
    "sqlite": (
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            id            TEXT PRIMARY KEY,
            service       TEXT NOT NULL,
            handler       TEXT NOT NULL,
            event_id      TEXT NOT NULL,
            event_source  TEXT NOT NULL,
            claimed_at    TEXT NOT NULL
        )""",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_claimed_at ON {TABLE} (claimed_at)",
    ),
}

#: the claim: a row back when it is new, none when the delivery was claimed before
CLAIM: dict[Dialect, str] = {
    "postgresql": (
        f"INSERT INTO {TABLE} (id, service, handler, event_id, event_source, claimed_at) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING 1"
    ),
    "sqlite": (
        f"INSERT INTO {TABLE} (id, service, handler, event_id, event_source, claimed_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING 1"
    ),
}

#: delete up to PRUNE_BATCH rows claimed before the given time
PRUNE: dict[Dialect, str] = {
    "postgresql": (
        f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE claimed_at < $1 "
        f"ORDER BY claimed_at LIMIT {PRUNE_BATCH} FOR UPDATE SKIP LOCKED)"
    ),
    "sqlite": (
        f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE claimed_at < ? "
        f"ORDER BY claimed_at LIMIT {PRUNE_BATCH})"
    ),
}


async def create_table(connection: AppConnection) -> None:
    """Create the table on ``connection`` unless it exists (in the caller's
    transaction, when one is open)."""
    await create_tables(connection, CREATE[connection.dialect], "retrybus.inbox.create")


async def table_exists(connection: AppConnection) -> bool:
    """Whether the table exists where ``connection`` looks for it."""
    return await has_table(connection, TABLE)
