"""The ``retrybus_outbox`` table in the application's database: what it holds,
and the statements that stage into it (on the caller's connection) and that a
relay claims and deletes with, for PostgreSQL and SQLite.

A row is one staged event: its CloudEvents JSON (the form a broker carries), the
service that staged it (whose handlers, and every other subscribed service's,
receive it), when it was staged, and an ordering key (kept for per-key order).
Rows are claimed and deleted, never read past a "last id seen" mark: ids are
taken at insert but become visible at commit, out of order, so such a mark
skips rows (Eventuous#222, kamu-cli#1398).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .._appdb import AppConnection, Dialect, create_tables, has_table

__all__ = [
    "CREATE",
    "INSERT",
    "ORDER_LOCK",
    "TABLE",
    "OutboxRow",
    "create_table",
    "table_exists",
]

#: the table's name, in the connection's schema (PostgreSQL's search_path)
TABLE = "retrybus_outbox"

#: the table and its index, per dialect (IF NOT EXISTS: created on first use)
CREATE: dict[Dialect, tuple[str, ...]] = {
    "postgresql": (
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            id            bigserial PRIMARY KEY,
            service       text NOT NULL,
            event         json NOT NULL,
            ordering_key  text,
            staged_at     timestamptz NOT NULL
        )""",
        # the rows of one ordering key in id order: a relay's claim skips a row
        # while an earlier one of its key is there
        f"""CREATE INDEX IF NOT EXISTS {TABLE}_ordering ON {TABLE} (ordering_key, id)
            WHERE ordering_key IS NOT NULL""",
    ),
    "sqlite": (
        # AUTOINCREMENT: an id is never taken again after its row is deleted, so
        # ids keep the order rows were staged in
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            id             INTEGER PRIMARY KEY AUTOINCREMENT,
            service        TEXT NOT NULL,
            event          TEXT NOT NULL,
            ordering_key   TEXT,
            staged_at      TEXT NOT NULL,
            claimed_by     TEXT,
            claimed_until  TEXT
        )""",
        f"""CREATE INDEX IF NOT EXISTS {TABLE}_ordering ON {TABLE} (ordering_key, id)
            WHERE ordering_key IS NOT NULL""",
    ),
}

#: one staged event: service, event JSON, ordering key, staged at
INSERT: dict[Dialect, str] = {
    "postgresql": (
        f"INSERT INTO {TABLE} (service, event, ordering_key, staged_at) "
        "VALUES ($1, $2::json, $3, $4)"
    ),
    "sqlite": f"INSERT INTO {TABLE} (service, event, ordering_key, staged_at) VALUES (?, ?, ?, ?)",
}

#: taken in the caller's PostgreSQL transaction before a keyed event is staged
#: (``$1``: the key), held until it commits or rolls back: transactions staging
#: one key commit in the order they took their numbers (a sequence value, an
#: outbox row id), so the order of a key is its commit order
ORDER_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('retrybus.order:' || $1, 0))"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One staged event as a relay claims it."""

    id: int
    service: str
    event: str
    ordering_key: str | None
    staged_at: datetime


async def create_table(connection: AppConnection) -> None:
    """Create the table on ``connection`` unless it exists (in the caller's
    transaction, when one is open)."""
    await create_tables(connection, CREATE[connection.dialect], "retrybus.outbox.create")


async def table_exists(connection: AppConnection) -> bool:
    """Whether the table exists where ``connection`` looks for it."""
    return await has_table(connection, TABLE)
