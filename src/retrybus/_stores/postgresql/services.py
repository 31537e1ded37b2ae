"""The PostgreSQL store's services part (``ServiceStore``, issue 12): each service's
stored subscriptions and their revision, its workers' heartbeats, what waits for
each of its handlers, and the sweep of what waits for a removed one.

Each method is one statement, or one transaction where ``MemoryStore`` (the
reference) does one thing atomically. A write of subscriptions first locks the
revision's row (``retrybus_revisions``), so that such writes take turns, each
reading what the one before committed, and the revision moves on in the same
transaction as the rows it stamps: a publisher that reads the revision never
sees it before the rows.

``PostgresServices`` is a mixin that ``PostgresStore`` inherits; it reaches the
database only through the store's ``_run`` (a pooled connection, errors mapped).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

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
from .._codec import decode_or_corrupt
from ..base import ServiceStore
from .codec import (
    CODEC,
    beat_values,
    dead_letter_columns,
    stored_subscription,
    subscription_columns,
    worker_beat,
)
from .sql import Q, affected, aware

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

__all__ = ["PostgresServices"]

T = TypeVar("T")


async def _write_subscriptions(
    conn: asyncpg.Connection,
    service: str,
    puts: Sequence[tuple[StoredSubscription, datetime]],
    tombstones: Sequence[str],
    *,
    now: datetime,
    actor: str,
) -> None:
    """Write ``puts`` (each with its ``registered_at``) whole and tombstone the live
    subscriptions of ``tombstones``, all with the next revision: one statement, in
    the caller's transaction (which holds the revision's lock)."""
    await conn.execute(
        Q["write_subscriptions"],
        service,
        aware(now),
        actor,
        *subscription_columns(puts),
        list(tombstones),
    )


class PostgresServices(ServiceStore):
    """The ``ServiceStore`` methods of ``PostgresStore``, which provides ``_run``."""

    @abc.abstractmethod
    async def _run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``operation`` on a pooled connection (``PostgresStore._run``)."""

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
        """One transaction: the revision's lock, the service's stored subscriptions
        read and compared with ``subscriptions`` (their terms), then, when anything
        changes, one statement that writes it with the next revision."""
        check_subscriptions(service, subscriptions)
        at = aware(now)

        async def run(conn: asyncpg.Connection) -> Registration:
            async with conn.transaction():
                await conn.execute(Q["lock_subscriptions"])
                rows = await conn.fetch(Q["subscriptions_of_service"], service)
                current = {str(row["handler_name"]): stored_subscription(row) for row in rows}
                changes = compare_subscriptions(current, subscriptions, prune=prune)
                if changes.writes:
                    puts = [
                        (terms, at if since is None else since) for terms, since in changes.puts
                    ]
                    await _write_subscriptions(
                        conn, service, puts, list(changes.removed), now=at, actor=actor
                    )
                return changes.registration

        return await self._run(run)

    async def remove_subscriptions(
        self, service: str, handlers: Collection[str] | None, *, now: datetime, actor: str
    ) -> list[str]:
        wanted = None if handlers is None else set(handlers)
        at = aware(now)

        async def run(conn: asyncpg.Connection) -> list[str]:
            async with conn.transaction():
                await conn.execute(Q["lock_subscriptions"])
                live = await conn.fetch(Q["list_subscriptions"], service, False)
                names = sorted(
                    str(row["handler_name"])
                    for row in live
                    if wanted is None or row["handler_name"] in wanted
                )
                if names:
                    await _write_subscriptions(conn, service, [], names, now=at, actor=actor)
            return names

        return await self._run(run)

    async def list_subscriptions(
        self, service: str | None = None, *, removed: bool = False
    ) -> list[StoredSubscription]:
        rows = await self._run(lambda conn: conn.fetch(Q["list_subscriptions"], service, removed))
        return [stored_subscription(row) for row in rows]

    async def subscriptions_revision(self) -> int:
        revision = await self._run(lambda conn: conn.fetchval(Q["subscriptions_revision"]))
        return 0 if revision is None else int(revision)

    async def forget_subscriptions(self, before: datetime) -> int:
        at = aware(before)
        return affected(await self._run(lambda conn: conn.execute(Q["forget_subscriptions"], at)))

    async def dead_letter_unsubscribed(self, *, now: datetime, limit: int) -> list[DeadLetterItem]:
        """Without tombstones (one quick read), no transaction. Then one: the
        tombstones locked (until it ends) and read, their records taken
        (take_unsubscribed: each tombstoned handler's range of the handler
        index), their dead letters written and counted, as ``expire_retry`` does."""
        if limit < 1:
            return []
        if not await self._run(lambda conn: conn.fetchval(Q["any_tombstone"])):
            return []
        at = aware(now)

        async def run(conn: asyncpg.Connection) -> list[DeadLetterItem]:
            async with conn.transaction():
                tombstones = {
                    (row["service"], row["handler_name"]): row["removed_by"] or "unknown"
                    for row in await conn.fetch(Q["lock_tombstones"])
                }
                if not tombstones:
                    return []
                services, handlers = zip(*tombstones, strict=True)
                rows = await conn.fetch(
                    Q["take_unsubscribed"], at, limit, list(services), list(handlers)
                )
                rows.sort(key=lambda row: (row["next_retry"], row["id"]))
                moved: list[DeadLetterItem] = []
                for row in rows:
                    # the record's key is its tombstone's (the range it was found in)
                    key = (row["service"], row["handler_name"])
                    reason = unsubscribed_reason(*key, tombstones[key])
                    record = decode_or_corrupt(row, CODEC.retry_item)
                    moved.append(
                        corrupt_to_dead_letter(record, now, reason)
                        if isinstance(record, CorruptRecord)
                        else record.to_dead_letter(
                            # the retries made; a first delivery (attempt 0) made none
                            reason=reason,
                            now=now,
                            attempt=max(record.attempt - 1, 0),
                        )
                    )
                if moved:
                    await conn.execute(Q["insert_dead"], *dead_letter_columns(moved))
                    await conn.execute(Q["add_dead_lettered"], len(moved))
            return moved

        return await self._run(run)

    # heartbeats ------------------------------------------------------------

    async def beat(self, beat: WorkerBeat) -> None:
        args = beat_values(beat)
        await self._run(lambda conn: conn.execute(Q["beat"], *args))

    async def forget_worker(self, name: str) -> bool:
        return bool(affected(await self._run(lambda conn: conn.execute(Q["forget_worker"], name))))

    async def list_workers(self, service: str | None = None) -> list[WorkerBeat]:
        rows = await self._run(lambda conn: conn.fetch(Q["list_workers"], service))
        return [worker_beat(row) for row in rows]

    async def prune_workers(self, before: datetime) -> int:
        at = aware(before)
        return affected(await self._run(lambda conn: conn.execute(Q["prune_workers"], at)))

    # loads -----------------------------------------------------------------

    async def service_loads(self, now: datetime) -> list[HandlerLoad]:
        at = aware(now)
        rows = await self._run(lambda conn: conn.fetch(Q["service_loads"], at))
        return [
            HandlerLoad(
                service=str(row["service"]),
                handler_name=str(row["handler_name"]),
                pending=int(row["pending"]),
                scheduled=int(row["scheduled"]),
                retrying=int(row["retrying"]),
                leased=int(row["leased"]),
                dead_unprocessed=int(row["dead_unprocessed"]),
                dead_processed=int(row["dead_processed"]),
                oldest_pending_due=row["oldest_pending_due"],
            )
            for row in rows
        ]
