"""The SQLite store's schema versions (``PRAGMA user_version``) and the steps that
bring a file up to ``SCHEMA_VERSION``, the back-fill of failure groups among them."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from ..._groups import failure_group_key
from .._compatibility import check_later_version, compatible_from
from .sql import Q

__all__ = ["COMPATIBLE_FROM", "SCHEMA_VERSION", "RetryBusy", "read_version", "upgrade"]

T = TypeVar("T")

# 1: the tables; 2: dead_letter_queue.failure_group (back-filled), retrybus_control;
# 3: the newest-first indexes end with id (keyset paging); 4: retry_queue.claims,
# retry_queue_handler_name on (handler_name, next_retry) (claims by handler);
# 5: services (issue 12): retry_queue.service and dead_letter_queue.service,
# retry_queue_handler_name on (service, handler_name, next_retry),
# dead_letter_queue_service, retrybus_subscriptions, retrybus_workers, the
# subscriptions' revision in retrybus_counters; retry_queue_next_retry dropped;
# 6: ordering keys (issue 14): retry_queue.ordering_key and ordering_sequence,
# retry_queue_ordering, the retry_queue_ordering trigger that fills them;
# 7: the inbox (issue 14): inbox_successes (remembered successes, by delivery id)
SCHEMA_VERSION = 7
#: the oldest schema version whose code can still use a file at SCHEMA_VERSION
#: (``_stores/_compatibility.py``): 7 only added a table that version 6 never reads
COMPATIBLE_FROM = 6
_BACKFILL_BATCH = 500


class RetryBusy(Protocol):
    """Runs an operation again while another process holds the lock (the store's)."""

    def __call__(self, operation: Callable[[], T], /) -> Awaitable[T]: ...


def read_version(conn: sqlite3.Connection) -> int:
    """The schema version the file records."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


async def upgrade(conn: sqlite3.Connection, *, url: str, retry_busy: RetryBusy) -> None:
    """Bring the file to SCHEMA_VERSION. Safe to run by several processes at once:
    each step re-reads the version inside its transaction, and the back-fill commits
    in batches, so that other processes are not locked out for long and an
    interrupted upgrade resumes."""
    version = await retry_busy(lambda: read_version(conn))
    if version > SCHEMA_VERSION:
        # a later release's file: used as it is if that release says this one can
        recorded = await retry_busy(lambda: _recorded_compatible_from(conn, version))
        check_later_version(f"SQLite store {url}", version, SCHEMA_VERSION, recorded)
        return
    if version < SCHEMA_VERSION:
        await retry_busy(lambda: _transaction(conn, _upgrade_schema))
    while await retry_busy(lambda: _needs_backfill(conn)):
        await retry_busy(lambda: _transaction(conn, _backfill_failure_groups))
        await asyncio.sleep(0)  # let the event loop run between batches
    if await retry_busy(lambda: _recorded_compatible_from(conn, SCHEMA_VERSION)) is None:
        await retry_busy(lambda: _transaction(conn, _record_compatible_from))


def _recorded_compatible_from(conn: sqlite3.Connection, version: int) -> int | None:
    """The compatible-from recorded for ``version``; None when there is none (or no
    table yet: a file no release of the record has migrated)."""
    try:
        row = conn.execute(Q["compatible_from"], (version,)).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else int(row[0])


def _record_compatible_from(conn: sqlite3.Connection) -> None:
    conn.execute(Q["compatibility_table"])
    conn.execute(
        Q["record_compatible_from"],
        (SCHEMA_VERSION, compatible_from(COMPATIBLE_FROM, SCHEMA_VERSION)),
    )


def _transaction(conn: sqlite3.Connection, step: Callable[[sqlite3.Connection], None]) -> None:
    """Run ``step`` in one ``BEGIN IMMEDIATE`` transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        step(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _set_version(conn: sqlite3.Connection, version: int) -> None:
    conn.execute(f"PRAGMA user_version={int(version)}")  # PRAGMA takes no parameters


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _upgrade_schema(conn: sqlite3.Connection) -> None:
    """A new file gets the whole schema at SCHEMA_VERSION. A version 1 file gets the
    failure_group column, its index and the control table; its version moves on
    when ``_backfill_failure_groups`` has given every row its group. A version 1 or
    2 file gets the newest-first indexes rebuilt with ``id`` (once: one pass over
    the dead letters, in this transaction). A version 1, 2 or 3 file gets the
    ``claims`` column (no rewrite: old rows read its default, 0). A version 1 to
    4 file gets the ``service`` columns (no rewrite: old rows read "default"),
    the handler index rebuilt on ``(service, handler_name, next_retry)`` (one
    pass over the retry items, in this transaction) and loses the index on
    ``next_retry`` alone; the schema then adds the tables and indexes that are
    new. A version 1 to 5 file gets the ordering columns (old rows read NULL:
    unordered), their index and the trigger that fills them. Every version gets
    the inbox's table (in the schema). A version 2 to 6 file is then at
    SCHEMA_VERSION. Each step checks what
    is there already, so that an interrupted version 1 upgrade resumes."""
    version = read_version(conn)
    if version >= SCHEMA_VERSION:
        return
    if version == 1:
        columns = {row[0] for row in conn.execute(Q["dead_columns"])}
        if "failure_group" not in columns:
            conn.execute(Q["migrate_2_add_failure_group"])
    if version in (1, 2):
        indexed = [row[0] for row in conn.execute(Q["newest_first_index_columns"])]
        if indexed.count("id") < 2:  # not rebuilt yet (a version 1 upgrade can resume)
            _run_script(conn, Q["migrate_3_newest_first_indexes"])
    if version in (1, 2, 3, 4):
        retry_columns = {row[0] for row in conn.execute(Q["retry_columns"])}
        if "claims" not in retry_columns:  # version 1 to 3
            conn.execute(Q["migrate_4_add_claims"])
        if "service" not in retry_columns:
            conn.execute(Q["migrate_5_add_retry_service"])
        if "service" not in {row[0] for row in conn.execute(Q["dead_columns"])}:
            conn.execute(Q["migrate_5_add_dead_service"])
        if [row[0] for row in conn.execute(Q["handler_index_columns"])] != [
            "service",
            "handler_name",
            "next_retry",
        ]:
            conn.execute(Q["migrate_5_handler_index"])
        conn.execute(Q["migrate_5_drop_next_retry_index"])
    if version in (1, 2, 3, 4, 5):
        retry_columns = {row[0] for row in conn.execute(Q["retry_columns"])}
        if "ordering_key" not in retry_columns:
            conn.execute(Q["migrate_6_add_ordering_key"])
        if "ordering_sequence" not in retry_columns:
            conn.execute(Q["migrate_6_add_ordering_sequence"])
    _run_script(conn, Q["schema"])
    conn.execute(Q["ordering_trigger"])  # one statement, semicolons inside
    if version in (0, 2, 3, 4, 5, 6):
        _set_version(conn, SCHEMA_VERSION)


def _needs_backfill(conn: sqlite3.Connection) -> bool:
    """Whether dead letters lack their failure group: left by the upgrade from
    version 1, or written since by a process still at version 1 (an index lookup
    when there are none)."""
    if read_version(conn) < SCHEMA_VERSION:
        return True
    return conn.execute(Q["ungrouped_dead"], (1,)).fetchone() is not None


def _backfill_failure_groups(conn: sqlite3.Connection) -> None:
    """Give one batch of dead letters without a failure group theirs; when none is
    left, record that the file is at SCHEMA_VERSION."""
    rows = conn.execute(Q["ungrouped_dead"], (_BACKFILL_BATCH,)).fetchall()
    if not rows:
        if read_version(conn) < SCHEMA_VERSION:
            _set_version(conn, SCHEMA_VERSION)
        return
    conn.executemany(
        Q["set_failure_group"],
        [
            (failure_group_key(str(handler), str(error_type), str(error), str(service)), rowid)
            for rowid, handler, error_type, error, service in rows
        ],
    )
