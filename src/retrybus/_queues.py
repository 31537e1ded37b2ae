"""The retry queue as users see it: ``bus.retry_queue``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._delivery import Attempted
from ._errors import AmbiguousId, ItemNotFound, NotCancellable
from ._event import Event, check_text, printable
from ._outcomes import (
    CorruptRecord,
    DeadLettered,
    Outcome,
    Rescheduled,
    Succeeded,
    corrupt_to_dead_letter,
)
from ._records import DeadLetterItem, ErrorInfo, RetryItem, RetryKind
from ._stores.base import check_retry_kind

if TYPE_CHECKING:
    from ._core import BusCore

__all__ = ["RetryQueue", "check_cancellable"]

logger = logging.getLogger("retrybus")

EXPIRED_REASON = "expired in retry queue"
#: reads of a record ``cancel`` makes when it changes between the read and the delete
_CANCEL_TRIES = 3


def _check_page(limit: int, offset: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an int >= 0, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


class RetryQueue:
    """Failed deliveries waiting for their next retry (one item = one event × one handler).

    The operations are the seed's: ``add``, ``claim_due`` (its ``Get``, made
    atomic with a lease), ``mark_success``, ``mark_failed``, ``update_attempt``,
    ``count``, ``cleanup`` and ``health``. Methods that finish an item take the
    ``RetryItem`` that ``claim_due`` returned and do nothing (returning False)
    when its lease has passed to another worker; given a bare id they act
    unconditionally.
    """

    def __init__(self, core: BusCore) -> None:
        self._core = core

    async def _finish(self, outcome: Outcome, owner: str | None) -> bool:
        """Apply one outcome through the ledger (fenced by ``owner`` when given)."""
        applied = await self._core.ledger.complete(
            [Attempted(outcome)], owner, self._core.clock.now()
        )
        return bool(applied)

    async def add(
        self,
        event: Event,
        handler_name: str,
        error: BaseException | str,
        attempt: int = 1,
        *,
        next_retry: datetime | None = None,
    ) -> RetryItem:
        """Queue retry number ``attempt`` of ``handler_name`` for ``event``.

        Without ``next_retry`` it falls due after the handler's policy delay. The
        handler's policy decides what follows a failed retry; the item records its
        ``max_retries`` as it was when the item was scheduled.
        """
        if not isinstance(event, Event):
            raise TypeError(f"event must be a retrybus.Event, got {event!r}")
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
        if not isinstance(handler_name, str) or not handler_name:
            raise ValueError(f"handler_name must be a non-empty string, got {handler_name!r}")
        check_text(handler_name, "handler_name")
        policy = self._core.policy_for(handler_name)
        now = self._core.clock.now()
        if next_retry is None:
            next_retry = now + timedelta(seconds=policy.delay(attempt))
        elif next_retry.tzinfo is None:
            raise ValueError(f"next_retry must be timezone-aware, got {next_retry!r}")
        item = RetryItem.for_failure(
            event,
            handler_name,
            ErrorInfo.coerce(error),
            attempt=attempt,
            max_retries=policy.max_retries,
            next_retry=next_retry,
            now=now,
            service=self._core.service,
        )
        await self._core.ledger.add_retry(item)
        return item

    async def claim_due(
        self,
        limit: int = 100,
        *,
        lease: float = 60.0,
        owner: str | None = None,
        handlers: Collection[str] | None = None,
        service: str | None = None,
    ) -> list[RetryItem]:
        """Lease up to ``limit`` due items, earliest first, atomically: no other
        claim gets them until the lease (seconds) runs out or they are finished.
        With ``handlers``, only items of the handlers so named; with ``service``,
        only items of that service (None: of any).

        A stored record that cannot be decoded is moved to the dead letter
        queue with the reason, not returned.
        """
        _check_page(limit, 0)
        lease = _check_positive("lease", lease)
        owner = owner or f"claim-{uuid.uuid4().hex[:12]}"
        now = self._core.clock.now()
        claimed = await self._core.store.claim_due(
            now=now,
            limit=limit,
            owner=owner,
            lease_until=now + timedelta(seconds=lease),
            service=service,
            handlers=handlers,
        )
        items = [record for record in claimed if isinstance(record, RetryItem)]
        corrupt = [record for record in claimed if isinstance(record, CorruptRecord)]
        if corrupt:
            await self._dead_letter_corrupt(corrupt, owner, now)
        return items

    async def _dead_letter_corrupt(
        self, records: Sequence[CorruptRecord], owner: str, now: datetime
    ) -> None:
        attempted = [
            Attempted(
                DeadLettered(
                    record.id,
                    corrupt_to_dead_letter(record, now, f"undecodable record: {record.problem}"),
                )
            )
            for record in records
        ]
        await self._core.ledger.complete(attempted, owner, now)

    async def mark_success(self, item: RetryItem | str) -> bool:
        """The retry worked: remove the item. False if it is gone or its lease was lost."""
        held, owner = await self._resolve(item)
        if held is None:
            return False
        return await self._finish(Succeeded(held), owner)

    async def mark_failed(
        self,
        item: RetryItem | str,
        *,
        error: BaseException | str | None = None,
        reason: str | None = None,
    ) -> DeadLetterItem | None:
        """Move the item to the dead letter queue in one step; returns the dead letter
        (None if the item is gone or its lease was lost)."""
        held, owner = await self._resolve(item)
        if held is None:
            return None
        now = self._core.clock.now()
        dead = held.to_dead_letter(
            reason=printable(reason) if reason else f"failed after {held.attempt} retries",
            now=now,
            error=None if error is None else ErrorInfo.coerce(error),
        )
        return dead if await self._finish(DeadLettered(held.id, dead), owner) else None

    async def update_attempt(
        self,
        item: RetryItem | str,
        next_retry: datetime,
        attempt: int,
        *,
        error: BaseException | str | None = None,
    ) -> bool:
        """Reschedule the item as retry number ``attempt`` at ``next_retry``, releasing its lease."""
        if next_retry.tzinfo is None:
            raise ValueError(f"next_retry must be timezone-aware, got {next_retry!r}")
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
        held, owner = await self._resolve(item)
        if held is None:
            return False
        info = (
            ErrorInfo(held.error, held.error_type, held.traceback)
            if error is None
            else ErrorInfo.coerce(error)
        )
        now = self._core.clock.now()
        updated = held.rescheduled(attempt=attempt, next_retry=next_retry, error=info, now=now)
        return await self._finish(Rescheduled(updated), owner)

    async def _resolve(self, item: RetryItem | str) -> tuple[RetryItem | None, str | None]:
        if isinstance(item, RetryItem):
            return item, item.lease_owner
        if not isinstance(item, str):
            raise TypeError(f"expected a RetryItem or an item id, got {item!r}")
        return await self._core.store.get_retry(item), None

    async def get(self, item_id: str) -> RetryItem:
        """The item with this id; raises ``ItemNotFound``."""
        item = await self._core.store.get_retry(item_id)
        if item is None:
            raise ItemNotFound(item_id)
        return item

    async def list(
        self,
        limit: int = 100,
        offset: int = 0,
        *,
        handler_name: str | None = None,
        event_type: str | None = None,
        kind: RetryKind | None = None,
    ) -> list[RetryItem]:
        """Items by next retry time, earliest first; with ``kind`` (``"retry"``,
        ``"pending"`` or ``"scheduled"``, see ``RetryKind``), only those that are of
        that kind now (``bus.clock``)."""
        _check_page(limit, offset)
        check_retry_kind(kind, None if kind is None else self._core.clock.now())
        return await self._core.store.list_retry(
            limit=limit,
            offset=offset,
            handler_name=handler_name,
            event_type=event_type,
            kind=kind,
            now=None if kind is None else self._core.clock.now(),
        )

    async def count_kinds(self) -> dict[RetryKind, int]:
        """How many items of each kind wait now: ``{"retry": …, "pending": …,
        "scheduled": …}`` (``RetryKind``; they add up to ``count()``)."""
        return await self._core.store.count_retry_kinds(self._core.clock.now())

    async def resolve_id(self, prefix: str) -> str:
        """The id of the one item whose id is ``prefix`` or starts with it (for
        people who copy a shortened id); raises ``ItemNotFound`` when none does and
        ``AmbiguousId``, listing them, when several do."""
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"a retry item id must be a non-empty string, got {prefix!r}")
        if await self._core.store.get_retry(prefix) is not None:
            return prefix
        found = await self._core.store.find_retry_ids(prefix, limit=11)
        if not found:
            raise ItemNotFound(prefix)
        if len(found) > 1:
            raise AmbiguousId(prefix, found)
        return found[0]

    async def cancel(self, item_id: str, *, actor: str | None = None) -> RetryItem:
        """Cancel a pending or scheduled delivery that no worker holds: its record
        is removed in one step, so its handler never runs (nothing is dead-lettered).
        Returns the record as it was; the ``retrybus`` logger records it (with
        ``actor``, who cancelled it, when given).

        Raises ``ItemNotFound`` for an unknown id, and ``NotCancellable`` (naming
        the id) for a retry (a failed delivery is retried or dead-lettered, never
        dropped unseen: ``mark_failed`` moves it to the dead letter queue, ``delete``
        drops it) or for a delivery whose handler runs now (a live lease holds it:
        a durable publish's, or a worker's)."""
        store = self._core.store
        kind: RetryKind = "pending"
        for _ in range(_CANCEL_TRIES):
            item = await store.get_retry(item_id)
            if item is None:
                raise ItemNotFound(item_id)
            now = self._core.clock.now()
            kind = item.kind(now)
            check_cancellable(item, now)
            if await store.cancel_delivery(item.id, now=now):
                logger.info(
                    "cancelled %s delivery %s: handler %s, event %s (%s)%s",
                    kind,
                    item.id,
                    item.handler_name,
                    item.event_id,
                    item.event_type,
                    "" if actor is None else f", by {actor}",
                )
                return item
            # it changed since it was read (claimed, finished): look again
        raise NotCancellable(item_id, kind, "it kept changing while being cancelled; try again")

    async def delete(self, item_id: str) -> None:
        """Drop an item without dead-lettering it; raises ``ItemNotFound``."""
        if not await self._core.store.delete_retry(item_id):
            raise ItemNotFound(item_id)

    async def count(self) -> int:
        """How many items wait (leased ones included)."""
        return await self._core.store.retry_count()

    async def count_due(self, within: float = 0.0) -> int:
        """How many items fall due within ``within`` seconds from now."""
        return await self._core.store.count_due(self._core.clock.now() + timedelta(seconds=within))

    async def next_due(
        self, handlers: Collection[str] | None = None, *, service: str | None = None
    ) -> datetime | None:
        """When the next item falls due or its lease runs out (None when the queue
        is empty); with ``handlers``, only among items of the handlers so named,
        with ``service``, only among items of that service (None: of any)."""
        return await self._core.store.next_due(handlers, service=service)

    async def cleanup(self, before: datetime | None = None) -> int:
        """Move items created before ``before`` (default: older than the bus's
        ``retry_retention``) to the dead letter queue, reason "expired in retry
        queue": retries by that age alone, deferred and scheduled first
        deliveries only once due since before ``before`` (never before their
        time). Leased items stay; nothing is deleted; returns how many moved."""
        now = self._core.clock.now()
        if before is None:
            if self._core.retry_retention is None:
                return 0
            before = now - timedelta(seconds=self._core.retry_retention)
        moved = await self._core.store.expire_retry(before=before, now=now, reason=EXPIRED_REASON)
        await self._core.ledger.dead_lettered(moved)
        return len(moved)

    async def health(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""
        await self._core.store.health()


def check_cancellable(item: RetryItem, now: datetime) -> None:
    """Raise ``NotCancellable`` (naming the item and why) unless ``item`` is a first
    delivery that no live lease holds at ``now``: what ``RetryQueue.cancel`` takes."""
    kind = item.kind(now)
    if kind == "retry":
        raise NotCancellable(
            item.id,
            kind,
            f"it is a retry (attempt {item.attempt} of {item.max_retries}) of a delivery "
            "that failed, which is retried or dead-lettered; only pending and scheduled "
            "deliveries can be cancelled",
        )
    if item.leased_at(now):
        assert item.lease_until is not None
        raise NotCancellable(
            item.id,
            kind,
            f"its handler is running now (leased by {item.lease_owner} until "
            f"{item.lease_until.isoformat()})",
        )
