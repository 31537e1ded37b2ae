"""The SQLite store's services part (issue 12): each service's stored
subscriptions, its workers' heartbeats, what waits for each of its handlers, and
the sweep of what waits for a removed one. Each method is one statement or one
``BEGIN IMMEDIATE`` transaction, as ``MemoryStore`` (the reference) does each
in one step."""

from __future__ import annotations

import abc
import heapq
import sqlite3
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any, TypeVar

from ..._outcomes import CorruptRecord, corrupt_to_dead_letter
from ..._records import DeadLetterItem
from ..._services import (
    HandlerLoad,
    Registration,
    StoredSubscription,
    WorkerBeat,
    check_subscriptions,
    compare_subscriptions,
    unsubscribed_reason,
)
from .._codec import decode_or_corrupt, parse_text_time, text_time
from ..base import ServiceStore
from .codec import CODEC, beat_fields, stored_subscription, subscription_fields, worker_beat
from .sql import Q, dict_rows

__all__ = ["SQLiteServices"]

T = TypeVar("T")


def _next_revision(conn: sqlite3.Connection) -> int:
    return int(conn.execute(Q["next_subscriptions_revision"]).fetchone()[0])


def _tombstone_rows(
    service: str, names: Collection[str], *, now: str, actor: str, revision: int
) -> list[dict[str, Any]]:
    return [
        {"service": service, "handler_name": name, "now": now, "actor": actor, "revision": revision}
        for name in names
    ]


class SQLiteServices(ServiceStore):
    """The ``ServiceStore`` methods of ``SQLiteStore``, which inherits them and runs
    their statements (``_read``, ``_write``)."""

    @abc.abstractmethod
    async def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` on the connection."""

    @abc.abstractmethod
    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` in one ``BEGIN IMMEDIATE`` transaction."""

    # subscriptions ---------------------------------------------------------

    async def put_subscriptions(
        self,
        service: str,
        subscriptions: Sequence[StoredSubscription],
        *,
        prune: bool,
        now: datetime,
        actor: str,
    ) -> Registration:
        check_subscriptions(service, subscriptions)
        at = text_time(now)

        def run(conn: sqlite3.Connection) -> Registration:
            rows = dict_rows(conn.execute(Q["subscriptions_of_service"], (service,)))
            current = {str(row["handler_name"]): stored_subscription(row) for row in rows}
            changes = compare_subscriptions(current, subscriptions, prune=prune)
            if changes.writes:
                revision = _next_revision(conn)
                conn.executemany(
                    Q["put_subscription"],
                    [
                        subscription_fields(
                            terms,
                            registered_at=at if since is None else text_time(since),
                            now=at,
                            revision=revision,
                        )
                        for terms, since in changes.puts
                    ],
                )
                conn.executemany(
                    Q["tombstone_subscription"],
                    _tombstone_rows(
                        service, changes.removed, now=at, actor=actor, revision=revision
                    ),
                )
            return changes.registration

        return await self._write(run)

    async def remove_subscriptions(
        self, service: str, handlers: Collection[str] | None, *, now: datetime, actor: str
    ) -> list[str]:
        wanted = None if handlers is None else set(handlers)
        params = {"service": service, "removed": 0}

        def run(conn: sqlite3.Connection) -> list[str]:
            live = [row[1] for row in conn.execute(Q["list_subscriptions"], params).fetchall()]
            names = sorted(str(name) for name in live if wanted is None or name in wanted)
            if names:
                revision = _next_revision(conn)
                conn.executemany(
                    Q["tombstone_subscription"],
                    _tombstone_rows(
                        service, names, now=text_time(now), actor=actor, revision=revision
                    ),
                )
            return names

        return await self._write(run)

    async def list_subscriptions(
        self, service: str | None = None, *, removed: bool = False
    ) -> list[StoredSubscription]:
        params = {"service": service, "removed": int(removed)}
        rows = await self._read(
            lambda conn: dict_rows(conn.execute(Q["list_subscriptions"], params))
        )
        return [stored_subscription(row) for row in rows]

    async def subscriptions_revision(self) -> int:
        row = await self._read(lambda conn: conn.execute(Q["subscriptions_revision"]).fetchone())
        return 0 if row is None else int(row[0])

    async def forget_subscriptions(self, before: datetime) -> int:
        at = text_time(before)
        return int(
            await self._write(lambda conn: conn.execute(Q["forget_subscriptions"], (at,)).rowcount)
        )

    async def dead_letter_unsubscribed(self, *, now: datetime, limit: int) -> list[DeadLetterItem]:
        """The tombstones read first (an index of the few there are): without any,
        no write. Then one transaction: each tombstoned handler's first unleased
        items (a seek each), the earliest ``limit`` of them moved."""
        if limit < 1:
            return []
        if not await self._read(lambda conn: conn.execute(Q["tombstones"]).fetchall()):
            return []
        at = text_time(now)

        def run(conn: sqlite3.Connection) -> list[DeadLetterItem]:
            found: list[tuple[str, str, dict[str, Any], str]] = []
            for service, handler_name, removed_by in conn.execute(Q["tombstones"]).fetchall():
                params = {
                    "service": service,
                    "handler_name": handler_name,
                    "now": at,
                    "limit": limit,
                }
                reason = unsubscribed_reason(service, handler_name, removed_by or "unknown")
                for row in dict_rows(conn.execute(Q["unsubscribed_items"], params)):
                    found.append((str(row["next_retry"]), str(row["id"]), row, reason))
            moved: list[DeadLetterItem] = []
            for _, item_id, row, reason in heapq.nsmallest(limit, found, key=lambda f: f[:2]):
                record = decode_or_corrupt(row, CODEC.retry_item)
                dead = (
                    corrupt_to_dead_letter(record, now, reason)
                    if isinstance(record, CorruptRecord)
                    else record.to_dead_letter(
                        reason=reason, now=now, attempt=max(record.attempt - 1, 0)
                    )
                )
                conn.execute(Q["delete_retry"], (item_id,))
                conn.execute(Q["insert_dead"], CODEC.dead_letter_fields(dead))
                moved.append(dead)
            if moved:
                conn.execute(Q["add_counter"], (len(moved), "retry_dead_lettered"))
            return moved

        return await self._write(run)

    # heartbeats ------------------------------------------------------------

    async def beat(self, beat: WorkerBeat) -> None:
        params = beat_fields(beat)
        await self._write(lambda conn: conn.execute(Q["beat"], params))

    async def forget_worker(self, name: str) -> bool:
        return bool(
            await self._write(lambda conn: conn.execute(Q["forget_worker"], (name,)).rowcount)
        )

    async def list_workers(self, service: str | None = None) -> list[WorkerBeat]:
        params = {"service": service}
        rows = await self._read(lambda conn: dict_rows(conn.execute(Q["list_workers"], params)))
        return [worker_beat(row) for row in rows]

    async def prune_workers(self, before: datetime) -> int:
        at = text_time(before)
        return int(await self._write(lambda conn: conn.execute(Q["prune_workers"], (at,)).rowcount))

    # loads -----------------------------------------------------------------

    async def service_loads(self, now: datetime) -> list[HandlerLoad]:
        params = {"now": text_time(now)}
        rows = await self._read(lambda conn: conn.execute(Q["service_loads"], params).fetchall())
        return [
            HandlerLoad(
                service=str(service),
                handler_name=str(handler_name),
                pending=int(pending),
                scheduled=int(scheduled),
                retrying=int(retrying),
                leased=int(leased),
                dead_unprocessed=int(dead_unprocessed),
                dead_processed=int(dead_processed),
                oldest_pending_due=None if oldest is None else parse_text_time(oldest),
            )
            for (
                service,
                handler_name,
                pending,
                scheduled,
                retrying,
                leased,
                dead_unprocessed,
                dead_processed,
                oldest,
            ) in rows
        ]
