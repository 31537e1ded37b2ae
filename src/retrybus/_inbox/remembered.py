"""Remembered successes (``EventBus(inbox=True)``, ``subscribe(..., inbox=True)``):
the store keeps the delivery id (service, event, handler) of each success of a
handler with the inbox on for ``inbox_retention`` seconds, and a delivery of an
event that handler already handled is not run again: it is finished as a
success and counted as skipped.

Where it is read: once per durable publish (before its records are written),
once per not durable publish, once per message a transport consumer runs, once
per batch a worker claims; each time only when one of the handlers concerned
has the inbox on (a bus without it never asks). Where it is written: with the
removal of the successes' records, in the same group (``Ledger``), or after the
calls when there is nothing else to write (a not durable publish, a consumer's
message). A redrive or a reprocess of a dead letter is an operator's action: it
runs the handler whatever the store remembers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from .._event import Event
from .._outcomes import Outcome, Succeeded
from .._records import RetryItem, delivery_id

if TYPE_CHECKING:
    from .._handlers import HandlerRegistry, Subscription
    from .._stores.base import Store

__all__ = ["PROBE_MARK", "REQUEUED", "RememberedSuccesses"]

#: the metadata key of a record made from a dead letter (a redrive, a requeue):
#: the handler runs whatever the store remembers
REQUEUED = "requeued_from"
#: the metadata key of a redrive's probe item (its value: the redrive's id): its
#: success is remembered whether or not the inbox is on, so that the probe can
#: tell a success from a record someone deleted (both leave no record)
PROBE_MARK = "redrive_probe"
#: what "forever" means (``inbox_retention=None``): far enough, and a time every
#: engine stores
_FOREVER = timedelta(days=100 * 365)


class InboxContext(Protocol):
    """What remembering reads from the bus's shared state (``BusCore``)."""

    store: Store
    service: str
    inbox: bool
    inbox_retention: float | None
    registry: HandlerRegistry

    def subscription(self, name: str) -> Subscription | None: ...

    def inbox_skipped(self, handler: str, event: Event) -> None: ...


class RememberedSuccesses:
    """One bus's use of the store's remembered successes."""

    def __init__(self, core: InboxContext) -> None:
        self._core = core

    @property
    def in_use(self) -> bool:
        """Whether any handler of the bus has the inbox on (a bus without it never
        reads or writes remembered successes)."""
        core = self._core
        return core.inbox or core.registry.inboxes > 0

    def on_for(self, subscription: Subscription | None) -> bool:
        """Whether the store remembers this handler's successes (its own setting,
        else the bus's)."""
        if subscription is None:
            return False
        own = subscription.inbox
        return self._core.inbox if own is None else own

    def _on_for_name(self, handler: str) -> bool:
        return self.on_for(self._core.subscription(handler))

    def until(self, now: datetime) -> datetime:
        """Until when a success at ``now`` is remembered."""
        retention = self._core.inbox_retention
        return now + (_FOREVER if retention is None else timedelta(seconds=retention))

    # reading -----------------------------------------------------------------

    async def handled_handlers(
        self, event: Event, subscriptions: Sequence[Subscription], now: datetime
    ) -> set[str]:
        """The names of ``subscriptions`` (this bus's, with the inbox on) whose
        delivery of ``event`` the store remembers as handled: one store call, none
        when no handler has the inbox on. Each is counted as a skip."""
        core = self._core
        ids = {
            delivery_id(event.source, event.id, s.name, core.service): s.name
            for s in subscriptions
            if self.on_for(s)
        }
        if not ids:
            return set()
        found = await core.store.remembered(ids.keys(), now)
        names = {ids[i] for i in found}
        for name in names:
            core.inbox_skipped(name, event)
        return names

    async def handled_records(self, items: Sequence[RetryItem], now: datetime) -> set[str]:
        """The ids of the claimed records ``items`` whose delivery the store
        remembers as handled (their handler has the inbox on, and they were not
        requeued from a dead letter): one store call, none when no record
        qualifies. Counting the skips is the caller's (when it finishes them)."""
        ids: dict[str, list[str]] = {}
        for item in items:
            if REQUEUED in item.metadata or not self._on_for_name(item.handler_name):
                continue
            key = delivery_id(item.event_source, item.event_id, item.handler_name, item.service)
            ids.setdefault(key, []).append(item.id)
        if not ids:
            return set()
        found = await self._core.store.remembered(ids.keys(), now)
        return {record_id for key in found for record_id in ids[key]}

    # writing -----------------------------------------------------------------

    def ids_of(self, outcomes: Iterable[Outcome]) -> list[str]:
        """The delivery ids to remember among ``outcomes``: their successes of
        handlers with the inbox on, and of redrives' probe items."""
        return [
            delivery_id(o.item.event_source, o.item.event_id, o.item.handler_name, o.item.service)
            for o in outcomes
            if isinstance(o, Succeeded)
            and (PROBE_MARK in o.item.metadata or self._on_for_name(o.item.handler_name))
        ]

    @staticmethod
    def probes_in(outcomes: Iterable[Outcome]) -> bool:
        """Whether ``outcomes`` hold the success of a redrive's probe item (to be
        remembered even on a bus without the inbox)."""
        return any(isinstance(o, Succeeded) and PROBE_MARK in o.item.metadata for o in outcomes)

    async def remember(self, outcomes: Iterable[Outcome], now: datetime) -> None:
        """Remember the successes among ``outcomes`` (one store call, none when
        there is nothing to remember)."""
        ids = self.ids_of(outcomes)
        if ids:
            await self._core.store.remember_successes(ids, self.until(now))

    async def remember_handlers(
        self, event: Event, subscriptions: Iterable[Subscription], now: datetime
    ) -> None:
        """Remember that these handlers (those with the inbox on) handled ``event``."""
        core = self._core
        ids = [
            delivery_id(event.source, event.id, s.name, core.service)
            for s in subscriptions
            if self.on_for(s)
        ]
        if ids:
            await core.store.remember_successes(ids, self.until(now))
