"""The SQLite store's part of the outbox: when an application's connection is to
the store's own file, the outbox writes pending deliveries straight into
``retry_queue`` in the caller's transaction (no relay). Workers see them once
that transaction commits: their ``watch`` reads the file's ``data_version``,
which every other connection's commit moves on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..._appdb import AppConnection
from ..._errors import StoreUnusable
from ..._records import RetryItem
from .codec import CODEC

__all__ = ["SQLiteStaging"]


class SQLiteStaging:
    """``same_database`` and ``stage_pending`` for ``SQLiteStore``."""

    path: str
    url: str

    async def same_database(self, connection: AppConnection) -> bool:
        """Whether ``connection``'s main database is the store's file (the same
        file however each names it); ``StoreUnusable`` when it is, but the store
        has not created its tables there yet."""
        if connection.dialect != "sqlite" or self.path == ":memory:":
            return False
        files = [
            row[2] for row in await connection.fetch("PRAGMA database_list") if row[1] == "main"
        ]
        if not files or not files[0] or not _same_file(files[0], self.path):
            return False
        tables = await connection.fetch(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'retry_queue'"
        )
        if not tables:
            raise StoreUnusable(
                f"the SQLite store {self.url} has not created its tables yet: connect it "
                "(await store.connect(), or `retrybus migrate`) before staging events"
            )
        return True

    async def stage_pending(self, connection: AppConnection, items: Sequence[RetryItem]) -> None:
        """One prepared insert on ``connection``, ids already stored skipped."""
        if not items:
            return
        rows = [CODEC.retry_fields(item) for item in items]
        columns = list(rows[0])
        query = (
            f"INSERT OR IGNORE INTO retry_queue ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})"
        )
        await connection.execute_many(query, [[row[c] for c in columns] for row in rows])


def _same_file(first: str, second: str) -> bool:
    """Whether two paths name one file (two stats: microseconds, on the event
    loop's thread as every SQLite statement of the store is)."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return False
