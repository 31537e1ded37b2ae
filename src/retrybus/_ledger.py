"""The ledger: the one place that writes what became of deliveries to the store
and then announces it, to the observers (metrics, spans, logs), to the
``on_dead_letter`` hooks and to the workers of this process that wait for the
next retry to fall due. Publish, the worker, both queues and redrives go
through it, so every state change is counted, traced and logged alike, and
only once the store has it.

The workers of this process that wait are told by store object and service:
what any bus of the process schedules for a service on a store object (a
retry, a deferred or routed delivery, a requeue) wakes the idle workers of that
service on that store object, and no other's."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ._delivery import Attempted
from ._errors import StoreUnavailable
from ._group import GroupWriter
from ._observers import Delivery, Verdict, Written
from ._outcomes import DeadLettered, Outcome, Rescheduled, Succeeded, outcome_id
from ._records import DeadLetterItem, RetryItem
from ._reporting import verdict_of

if TYPE_CHECKING:
    from ._clock import Clock
    from ._inbox.remembered import RememberedSuccesses
    from ._observers import Observers
    from ._stores.base import Store


class LedgerContext(Protocol):
    """What the ledger reads from the bus's shared state (``BusCore``), each time
    it writes: the store, the observers and the ``store_timeout`` may change."""

    store: Store
    service: str
    observers: Observers
    store_timeout: float
    clock: Clock
    remembered: RememberedSuccesses


__all__ = ["DeadLetterHook", "Ledger", "LedgerContext"]

logger = logging.getLogger("retrybus")

DeadLetterHook = Callable[[DeadLetterItem], Awaitable[Any]] | Callable[[DeadLetterItem], Any]

T = TypeVar("T")

_FIRST_PAUSE = 0.05
_LONGEST_PAUSE = 1.0

Listener = Callable[[datetime], None]

#: this process's schedule listeners (its workers), by store object and service
_LISTENERS: weakref.WeakKeyDictionary[Store, dict[str, list[Listener]]] = (
    weakref.WeakKeyDictionary()
)


class Ledger:
    """Writes outcomes to the bus's store, then announces them."""

    def __init__(self, core: LedgerContext) -> None:
        self._core = core
        self._hooks: list[DeadLetterHook] = []
        self._listening: dict[Listener, tuple[Store, str]] = {}
        self._pending: GroupWriter[RetryItem] = GroupWriter(self._write_pending)
        self._finishers: dict[str, GroupWriter[Outcome]] = {}
        self._removals: dict[str, list[Succeeded]] = {}  # by lease owner
        self._removers: dict[str, asyncio.Future[None]] = {}
        self._removal_failed = False

    # who is told -------------------------------------------------------------

    def add_dead_letter_hook(self, hook: DeadLetterHook) -> None:
        """Call ``hook(item)`` (plain or async) for each new dead letter."""
        self._hooks.append(hook)

    def add_schedule_listener(self, listener: Listener) -> None:
        """Call ``listener(when)`` when a bus of this process schedules a delivery
        of this bus's service due at ``when`` on this bus's store (the object: a
        store's ``watch`` tells of other processes' and connections')."""
        if listener in self._listening:
            return
        store, service = self._core.store, self._core.service
        _LISTENERS.setdefault(store, {}).setdefault(service, []).append(listener)
        self._listening[listener] = (store, service)

    def remove_schedule_listener(self, listener: Listener) -> None:
        where = self._listening.pop(listener, None)
        if where is None:
            return
        store, service = where
        listeners = _LISTENERS.get(store, {}).get(service)
        if listeners is not None and listener in listeners:
            listeners.remove(listener)

    def _wake(self, items: Iterable[RetryItem]) -> None:
        """Tell the listeners of each service these records are of when the
        earliest of its falls due."""
        by_service = _LISTENERS.get(self._core.store)
        if not by_service:
            return
        earliest: dict[str, datetime] = {}
        for item in items:
            if by_service.get(item.service):
                when = earliest.get(item.service)
                if when is None or item.next_retry < when:
                    earliest[item.service] = item.next_retry
        for service, when in earliest.items():
            for listener in list(by_service[service]):
                listener(when)

    # writing -----------------------------------------------------------------

    async def record_first_failures(self, attempted: Sequence[Attempted], context: str) -> None:
        """Store new records for first deliveries that failed (retry items,
        dead letters), retrying through a store outage for up to the bus's
        ``store_timeout`` (the write is safe to repeat: ids already stored are
        skipped), then announce them. ``context`` names the publish in the log."""
        retry_items = [a.outcome.item for a in attempted if isinstance(a.outcome, Rescheduled)]
        dead_letters = [
            a.outcome.dead_letter for a in attempted if isinstance(a.outcome, DeadLettered)
        ]
        try:
            await self.through_outage(
                lambda: self._core.store.record_failures(retry_items, dead_letters), context
            )
        except BaseException:
            self.unwritten(attempted)
            raise
        await self._announce(attempted, None)

    async def record_pending(self, items: Sequence[RetryItem], context: str) -> set[str]:
        """Store pending first deliveries (a durable publish's, leased to it, or
        deferred ones), written together with those of concurrent publishes
        (group commit) and retried through an outage for up to ``store_timeout``.
        Returns the ids of ``items`` that were new (the others were recorded before)."""
        written = await self.through_outage(lambda: self._pending.write(items), context)
        added = {item.id for item in items if item.id in written}
        # this process's idle workers of their services start the deferred ones
        self._wake(item for item in items if item.id in added and item.lease_owner is None)
        return added

    async def finish_first(
        self,
        attempted: Sequence[Attempted],
        owner: str,
        context: str,
        *,
        removals: Sequence[Attempted] = (),
    ) -> set[str]:
        """Write what followed failed first calls of a durable publish (records
        rescheduled or dead-lettered, leased to ``owner``), with the removals of
        its successful ones (``removals``: written, not announced; their calls
        were), together with other publishes' and through an outage, then
        announce them."""
        outcomes = [a.outcome for a in (*removals, *attempted)]
        try:
            applied = await self.through_outage(
                lambda: self._finisher(owner).write(outcomes), context
            )
        except BaseException:
            self.unwritten(attempted)
            raise
        mine = {outcome_id(a.outcome) for a in attempted} & applied
        await self._announce(attempted, mine)
        return mine

    async def _write_pending(self, items: Sequence[RetryItem]) -> set[str]:
        """One group's pending records; on a store that can, with the removals
        queued meanwhile (one write where there would be two)."""
        store = self._core.store
        if not store.joins_removals or not self._removals:
            return await store.record_pending(items)
        owner, removals = self._removals.popitem()
        try:
            now = self._core.clock.now()
            if self._core.remembered.in_use:
                await self._core.remembered.remember(removals, now)
            return await store.remove_then_record_pending(removals, owner, now, items)
        except BaseException:
            self._queue_removals(owner, removals, first=True)  # the remover tries them alone
            raise

    def remove_soon(self, attempted: Sequence[Attempted], owner: str) -> None:
        """Remove the records of first deliveries that succeeded (leased to
        ``owner``) without waiting: they are queued, and one task per owner
        writes whatever has queued meanwhile in one store call, tried again
        through a store outage for up to ``store_timeout``. Should the write
        never happen, a worker runs the delivery again once the lease runs out."""
        self._queue_removals(
            owner, [a.outcome for a in attempted if isinstance(a.outcome, Succeeded)]
        )

    def _queue_removals(
        self, owner: str, removals: list[Succeeded], *, first: bool = False
    ) -> None:
        queued = self._removals.get(owner)
        if queued is None:
            self._removals[owner] = removals
        elif first:
            queued[:0] = removals
        else:
            queued += removals
        if owner not in self._removers:
            self._removers[owner] = asyncio.ensure_future(self._remove_queued(owner))

    async def _remove_queued(self, owner: str) -> None:
        try:
            if self._core.store.joins_removals:
                # one turn of the loop: a pending write starting now takes them along
                await asyncio.sleep(0)
            while outcomes := self._removals.pop(owner, None):
                try:
                    await self.through_outage(
                        lambda: self._complete_remembering(outcomes, owner),
                        "removals",
                        quiet=True,
                    )
                except Exception as error:
                    if not self._removal_failed:
                        self._removal_failed = True
                        logger.warning(
                            "could not remove the records of successful deliveries: %s; they "
                            "will be delivered again once their lease runs out",
                            error,
                        )
                else:
                    self._removal_failed = False
        finally:
            del self._removers[owner]

    async def flush(self) -> None:
        """Wait for the removals ``remove_soon`` has not finished yet."""
        while self._removers:
            await asyncio.gather(*self._removers.values(), return_exceptions=True)

    def _finisher(self, owner: str) -> GroupWriter[Outcome]:
        writer = self._finishers.get(owner)
        if writer is None:
            writer = self._finishers[owner] = GroupWriter(
                lambda outcomes: self._complete_remembering(outcomes, owner)
            )
        return writer

    async def _complete_remembering(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime | None = None
    ) -> set[str]:
        """``store.complete``, with the successes among ``outcomes`` of handlers
        with the inbox on remembered (in the same transaction on the SQL
        engines; elsewhere first: a crash in between leaves a success remembered
        and its record, which the next delivery finishes without running it,
        never a record removed and its success forgotten)."""
        core = self._core
        if now is None:
            now = core.clock.now()
        remembered = core.remembered
        if not remembered.in_use and not remembered.probes_in(outcomes):
            return await core.store.complete(outcomes, owner, now)
        return await core.store.complete_remembering(
            outcomes, owner, now, remembered.ids_of(outcomes), remembered.until(now)
        )

    async def through_outage(
        self,
        write: Callable[[], Awaitable[T]],
        context: str,
        *,
        quiet: bool = False,
        unavailable: type[Exception] = StoreUnavailable,
        give_up_after: float | None = None,
    ) -> T:
        """``write()``, tried again through an outage (``unavailable`` raised: the
        store's, or the broker's) for up to ``give_up_after`` (None: ``store_timeout``)
        seconds (``quiet``: without the warning; the caller says what failed in the end)."""
        started = time.monotonic()
        pause = _FIRST_PAUSE
        limit = self._core.store_timeout if give_up_after is None else give_up_after
        while True:
            try:
                return await write()
            except unavailable as exc:
                remaining = limit - (time.monotonic() - started)
                if remaining <= 0:
                    raise
                if pause == _FIRST_PAUSE and not quiet:  # once per publish
                    logger.warning(
                        "publish of %s: %s; retrying for up to %gs",
                        context,
                        exc,
                        limit,
                    )
                await asyncio.sleep(min(pause, remaining))  # the last try at the deadline
                pause = min(pause * 2, _LONGEST_PAUSE)

    async def complete(
        self, attempted: Sequence[Attempted], owner: str | None, now: datetime
    ) -> set[str]:
        """Apply the outcomes of claimed records in one store step (with ``owner``,
        only to records it still holds: the fencing check), then announce those
        applied; the others were taken over by another worker. Returns the ids
        of the records the outcomes were applied to. Raises ``StoreUnavailable``
        (nothing announced: the caller may try again)."""
        applied = await self._complete_remembering([a.outcome for a in attempted], owner, now)
        await self._announce(attempted, applied)
        return applied

    def unwritten(self, attempted: Iterable[Attempted]) -> None:
        """These outcomes could not be written (and will not be here): the
        observers close what they opened for them."""
        observers = self._core.observers
        for entry in attempted:
            verdict, reason = verdict_of(entry.outcome)
            observers.recorded(entry.delivery, entry.outcome, verdict, "error", reason)

    async def record_reprocess(self, delivery: Delivery, updated: DeadLetterItem) -> bool:
        """Store a dead letter after its reprocess (``processed``, or carrying the new
        error), then announce it; False when the dead letter is gone."""
        verdict: Verdict = "success" if delivery.error is None else "failure"
        try:
            stored = await self._core.store.update_dead(updated)
        except BaseException:
            self._core.observers.recorded(delivery, None, verdict, "error")
            raise
        self._core.observers.recorded(delivery, None, verdict, "applied" if stored else "lost")
        return stored

    async def add_retry(self, item: RetryItem) -> None:
        """Store a retry item made by hand (``bus.retry_queue.add``), then announce it."""
        await self._core.store.record_failures([item], [])
        self._scheduled([item])

    async def add_dead_letters(self, items: Sequence[DeadLetterItem]) -> None:
        """Store dead letters made by hand (``bus.dead_letters.add``), then announce them."""
        await self._core.store.record_failures([], items)
        await self.dead_lettered(items)

    async def requeue(self, dead: DeadLetterItem, retry: RetryItem) -> bool:
        """Replace dead letter ``dead`` with ``retry`` in one store step, then
        announce it; False when the dead letter is gone."""
        if not await self._core.store.requeue_dead(dead.id, retry):
            return False
        self._core.observers.requeued(dead, retry)
        self._scheduled([retry])
        return True

    async def dead_lettered(self, items: Sequence[DeadLetterItem]) -> None:
        """Announce dead letters already written (a sweep of expired retry items)."""
        if not items:
            return
        self._core.observers.dead_lettered(items)
        await self._run_hooks(items)

    # announcing --------------------------------------------------------------

    async def _announce(
        self, attempted: Sequence[Attempted], applied: Collection[str] | None
    ) -> None:
        observers = self._core.observers
        scheduled: list[RetryItem] = []
        succeeded: list[RetryItem] = []
        dead: list[DeadLetterItem] = []
        for entry in attempted:
            outcome = entry.outcome
            verdict, reason = verdict_of(outcome)
            written: Written = (
                "applied" if applied is None or outcome_id(outcome) in applied else "lost"
            )
            if written == "applied":
                if isinstance(outcome, Rescheduled):
                    scheduled.append(outcome.item)
                elif isinstance(outcome, DeadLettered):
                    dead.append(outcome.dead_letter)
                elif isinstance(outcome, Succeeded) and outcome.item.attempt >= 1:
                    succeeded.append(outcome.item)  # a retry that worked
            if (
                entry.delivery is not None and entry.delivery.span is not None
            ) or verdict != "success":
                # a success matters to whoever opened a span for its call; the rest to all
                observers.recorded(entry.delivery, outcome, verdict, written, reason)
        if succeeded:
            observers.retry_succeeded(succeeded)
        if scheduled:
            self._scheduled(scheduled)
        await self.dead_lettered(dead)

    def _scheduled(self, items: Sequence[RetryItem]) -> None:
        self._core.observers.retry_scheduled(items)
        self._wake(items)

    async def _run_hooks(self, items: Iterable[DeadLetterItem]) -> None:
        if not self._hooks:
            return
        for item in items:
            for hook in self._hooks:
                try:
                    outcome = hook(item)
                    if inspect.isawaitable(outcome):
                        await outcome
                except Exception:
                    logger.exception(
                        "on_dead_letter hook %r failed for dead letter %s; the dead letter is kept",
                        hook,
                        item.id,
                    )
