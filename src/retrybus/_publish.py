"""Publishing: run an event's handlers here (durably or not) or hand them to the
workers (deferred, scheduled), and say what became of each.

Durable, the default on a persistent store: one pending record per matching
handler (attempt 0, leased to this process for ``publish_lease`` seconds) is
written before any handler runs, so that a process dying mid-handler leaves the
delivery for a worker once the lease runs out. Each record is then finished as
a worker finishes one: a failure rescheduled or dead-lettered before publish
returns, a success removed soon after (removals are grouped and not waited
for: a crash before one is written means a redelivery, never a loss).

Not durable (the memory store's default, or ``durable=False``): handlers run
first and only failures are written, as the seed did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar

from ._delivery import (
    Attempted,
    Calls,
    call_all_observed,
    call_all_plain,
    failure_outcome,
    first_record,
    observed_calls,
)
from ._errors import StoreUnavailable
from ._event import Event
from ._handlers import Subscription
from ._observe import trace_metadata
from ._observers import Observers, Publication
from ._outcomes import DeadLettered, Rescheduled, Succeeded
from ._rate import bucket_key
from ._records import DeadLetterItem, RetryItem
from ._routes import Route

if TYPE_CHECKING:
    from ._core import BusCore

__all__ = ["PublishResult", "Publisher", "Publishing"]


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What became of one publish: which handlers succeeded, which were
    scheduled for retry, which were dead-lettered, and which were left to a
    worker (``pending``: a deferred or scheduled publish, or a delivery already
    recorded by an earlier publish of the same event), by handler name."""

    event: Event
    succeeded: tuple[str, ...] = ()
    retrying: tuple[str, ...] = ()
    dead_lettered: tuple[str, ...] = ()
    retry_items: tuple[RetryItem, ...] = field(default=(), repr=False)
    dead_letters: tuple[DeadLetterItem, ...] = field(default=(), repr=False)
    pending: tuple[str, ...] = ()
    #: the handlers of other services the event was recorded for (``service/handler``,
    #: their stored subscriptions matching its type), or found recorded already
    routed: tuple[str, ...] = ()
    #: the broker's name for the message that carries the event (a bus with a
    #: transport; None: no transport, a scheduled publish, or no service subscribes)
    receipt: str | None = None

    @property
    def ok(self) -> bool:
        """No matching handler failed on its first call (pending ones have not
        been called yet)."""
        return not self.retrying and not self.dead_lettered


class Publishing(Protocol):
    """What runs a bus's publishes: ``Publisher`` (the store carries first
    deliveries) or ``TransportPublisher`` (a broker does)."""

    async def publish(
        self,
        event: Event,
        *,
        durable: bool,
        due: datetime | None,
        defer: bool,
    ) -> PublishResult:
        """Publish ``event`` (``due``: a scheduled delivery)."""
        ...

    async def flush(self) -> None:
        """Wait for what this publisher still has on its way."""
        ...


class Publisher:
    """Runs publishes for one bus (``EventBus.publish`` hands each to it)."""

    def __init__(self, core: BusCore) -> None:
        self._core = core

    async def publish(
        self,
        event: Event,
        *,
        durable: bool,
        due: datetime | None,
        defer: bool,
    ) -> PublishResult:
        """Publish ``event``: deferred (``defer``, or ``due`` for a scheduled
        delivery), durably or not."""
        core = self._core
        subscriptions = core.registry.match(event.type)
        routes = core.routes.match(event.type)
        if routes is None:  # not read yet, or changed here: read before routing
            routes = await core.ledger.through_outage(
                lambda: core.routes.matching(event.type), _context(event)
            )
        if defer or due is not None:
            if routes:
                return await self._publish_routed(event, subscriptions, routes, durable, due, defer)
            return await self._defer(event, subscriptions, due)
        handled: tuple[str, ...] = ()
        if subscriptions and core.remembered.in_use:
            subscriptions, handled = await self._unhandled(event, subscriptions)
        held: tuple[str, ...] = ()
        if subscriptions and (core.breakers.active or core.registry.rated):
            subscriptions, held = await self._hold_back(event, subscriptions, durable)
        if routes:
            result = await self._publish_routed(event, subscriptions, routes, durable, due, defer)
        elif not durable:
            result = await self._run_then_record(event, subscriptions)
        else:
            result = await self._record_then_run(event, subscriptions)
        budgets = core.retry_budgets
        if budgets is not None:  # first deliveries that succeeded here
            for name in result.succeeded:
                budgets.first_delivery(name)
        if handled:  # the inbox's skips: successes before
            result = replace(result, succeeded=(*handled, *result.succeeded))
        if held:
            result = replace(result, pending=(*result.pending, *held))
        return result

    async def _hold_back(
        self, event: Event, subscriptions: tuple[Subscription, ...], durable: bool
    ) -> tuple[tuple[Subscription, ...], tuple[str, ...]]:
        """The subscriptions to run, and the names of those held back: a pending
        record is written for each (attempt 0), its handler not called. A circuit
        breaker that is not closed holds its handlers' deliveries until it
        half-opens; a rate (``rate=``) leaves them to the workers, due now,
        unless the publish is not durable and the handler's bucket has a token
        now (see ``_token_now``)."""
        core = self._core
        breakers = core.breakers
        if breakers.active:
            with contextlib.suppress(StoreUnavailable):  # the cached state serves meanwhile
                await breakers.refresh_if_due()
        run: list[Subscription] = []
        records: list[RetryItem] = []
        for subscription in subscriptions:
            due = breakers.held_until(subscription.name) if breakers.active else None
            if (
                due is None
                and subscription.rate is not None
                and (durable or not await self._token_now(subscription))
            ):
                due = core.clock.now()  # the workers' (durable, or no token now)
            if due is None:
                run.append(subscription)
            else:
                records += self._records(event, (subscription,), None, leased=False, due=due)
        if not records:
            return subscriptions, ()
        await core.ledger.record_pending(records, _context(event))
        return tuple(run), tuple(r.handler_name for r in records)

    async def _token_now(self, subscription: Subscription) -> bool:
        """Whether a publish that is not durable may call ``subscription``'s
        rate-limited handler now: one token of its bucket (the store's, shared
        with the service's workers) was free. Never waits: without one (or
        without the store) the delivery is left to the workers."""
        core = self._core
        rate = subscription.rate
        assert rate is not None
        try:
            granted = await core.store.take_tokens(
                bucket_key(core.service, subscription.name),
                want=1,
                rate=rate.per_second,
                burst=rate.capacity,
                now=core.clock.now(),
            )
        except StoreUnavailable:
            return False
        return granted == 1

    async def _unhandled(
        self, event: Event, subscriptions: tuple[Subscription, ...]
    ) -> tuple[tuple[Subscription, ...], tuple[str, ...]]:
        """The inbox, once per publish: the subscriptions to run, and the names of
        those the store remembers as having handled ``event`` (not run: counted
        as skipped)."""
        core = self._core
        handled = await core.ledger.through_outage(
            lambda: core.remembered.handled_handlers(event, subscriptions, core.clock.now()),
            _context(event),
        )
        if not handled:
            return subscriptions, ()
        return (
            tuple(s for s in subscriptions if s.name not in handled),
            tuple(s.name for s in subscriptions if s.name in handled),
        )

    async def _remember(
        self,
        event: Event,
        subscriptions: Sequence[Subscription],
        errors: Sequence[BaseException | None],
    ) -> None:
        """A not durable publish's successes, remembered for the handlers with the
        inbox on (there is no record to remove with them)."""
        core = self._core
        if not core.remembered.in_use:
            return
        succeeded = [s for s, error in zip(subscriptions, errors, strict=True) if error is None]
        if succeeded:
            await core.ledger.through_outage(
                lambda: core.remembered.remember_handlers(event, succeeded, core.clock.now()),
                _context(event),
            )

    async def _publish_routed(
        self,
        event: Event,
        subscriptions: tuple[Subscription, ...],
        routes: tuple[Route, ...],
        durable: bool,
        due: datetime | None,
        defer: bool,
    ) -> PublishResult:
        """A publish that other services' handlers receive as well: their pending
        records are written in the same store write as this service's (durable,
        deferred), or before its handlers run (not durable)."""
        if defer or due is not None:
            result = await self._defer(event, subscriptions, due, routes)
        elif not durable:
            result = await self._run_then_record(event, subscriptions, routes)
        else:
            result = await self._record_then_run(event, subscriptions, routes)
        return replace(result, routed=tuple(route.label for route in routes))

    async def flush(self) -> None:
        """Nothing waits here (the ledger flushes the removals)."""

    async def deferred_records(
        self, event: Event, routes: Sequence[Route] | None = None, *, local: bool = True
    ) -> list[RetryItem]:
        """The pending records a deferred publish of ``event`` writes (one per
        matching handler of this bus unless not ``local``, and one per
        ``routes``, by default those of the other services' stored
        subscriptions), due now, none written: the outbox writes them elsewhere
        (an application's transaction, a relay's batch)."""
        core = self._core
        if routes is None:
            routes = await core.ledger.through_outage(
                lambda: core.routes.matching(event.type), _context(event)
            )
        subscriptions = core.registry.match(event.type) if local else ()
        return [
            *self._records(event, subscriptions, None, leased=False),
            *self._routed(event, routes, None),
        ]

    # not durable -------------------------------------------------------------

    async def _run_then_record(
        self,
        event: Event,
        subscriptions: tuple[Subscription, ...],
        routes: tuple[Route, ...] = (),
    ) -> PublishResult:
        core = self._core
        observers = core.observers
        if not observers.watch_calls:
            if routes:  # other services' deliveries outlive a crash here
                await core.ledger.record_pending(self._routed(event, routes, None), _context(event))
            if not subscriptions:
                return PublishResult(event)
            errors = await call_all_plain(subscriptions, event)
            await self._remember(event, subscriptions, errors)
            if not any(errors):
                return PublishResult(event, tuple(s.name for s in subscriptions))
            return await self._record_failures(event, subscriptions, Calls(errors, None), None)
        with _ObservedPublish(observers, event) as scope:
            event = scope.event  # tracing gave it its traceparent
            if routes:
                remote = self._routed(event, routes, scope.traceparent)
                await core.ledger.record_pending(remote, _context(event))
            calls = scope.calls = observed_calls(subscriptions, event)
            await call_all_observed(calls, subscriptions, event, observers)
            await self._remember(event, subscriptions, calls.errors)
            if any(calls.errors):
                return await self._record_failures(event, subscriptions, calls, scope.traceparent)
            return PublishResult(event, tuple(s.name for s in subscriptions))

    async def _record_failures(
        self,
        event: Event,
        subscriptions: Sequence[Subscription],
        calls: Calls,
        publisher: str | None,
    ) -> PublishResult:
        """Decide and store what follows each failed first call, then the result."""
        core = self._core
        now = core.clock.now()
        succeeded: list[str] = []
        attempted: list[Attempted] = []
        for index, (subscription, error) in enumerate(
            zip(subscriptions, calls.errors, strict=True)
        ):
            if error is None:
                succeeded.append(subscription.name)
                continue
            policy = subscription.policy or core.default_policy
            record = first_record(
                event, subscription.name, policy.max_retries, now, publisher, core.service
            )
            delivery = None if calls.deliveries is None else calls.deliveries[index]
            traceparent = None if delivery is None else delivery.traceparent
            attempted.append(
                Attempted(failure_outcome(record, error, policy, now, traceparent), delivery)
            )
        await core.ledger.record_first_failures(attempted, _context(event))
        return _result(event, succeeded, attempted, ())

    # durable -----------------------------------------------------------------

    async def _record_then_run(
        self,
        event: Event,
        subscriptions: tuple[Subscription, ...],
        routes: tuple[Route, ...] = (),
    ) -> PublishResult:
        core = self._core
        observers = core.observers
        if not subscriptions and not routes:
            if observers.watch_calls:
                publication = Publication(event)
                observers.publish_started(publication)
                observers.publish_ended(publication, None)
            return PublishResult(event)
        if not observers.watch_calls:
            records = self._records(event, subscriptions, None, leased=True)
            remote = self._routed(event, routes, None) if routes else ()
            run, pending = await self._record(event, subscriptions, records, remote)
            if not run:
                return PublishResult(event, pending=pending)
            errors = await self._held_while(run, call_all_plain([s for s, _ in run], event))
            return await self._finish(event, run, Calls(errors, None), pending)
        with _ObservedPublish(observers, event) as scope:
            event = scope.event
            records = self._records(event, subscriptions, scope.traceparent, leased=True)
            remote = self._routed(event, routes, scope.traceparent) if routes else ()
            run, pending = await self._record(event, subscriptions, records, remote)
            if not run:
                return PublishResult(event, pending=pending)
            running = [s for s, _ in run]
            calls = scope.calls = observed_calls(running, event)
            await self._held_while(run, call_all_observed(calls, running, event, observers))
            return await self._finish(event, run, calls, pending)

    def _records(
        self,
        event: Event,
        subscriptions: Sequence[Subscription],
        publisher: str | None,
        *,
        leased: bool,
        due: datetime | None = None,
    ) -> list[RetryItem]:
        """One pending record per handler: leased to this process (a durable
        publish about to run them), or due at ``due`` (now by default) for a worker."""
        core = self._core
        now = core.clock.now()
        owner = core.publish_owner if leased else None
        lease_until = now + timedelta(seconds=core.publish_lease) if leased else None
        default_policy = core.default_policy
        return [
            RetryItem.pending(
                event,
                subscription.name,
                max_retries=(subscription.policy or default_policy).max_retries,
                due=due or now,
                now=now,
                lease_owner=owner,
                lease_until=lease_until,
                # a dict of each record's own: records are separate values
                metadata=trace_metadata(publisher, None),
                service=core.service,
            )
            for subscription in subscriptions
        ]

    def _routed(
        self,
        event: Event,
        routes: Sequence[Route],
        publisher: str | None,
        due: datetime | None = None,
    ) -> list[RetryItem]:
        """A pending record for each handler of another service, due at ``due``
        (now by default) for that service's workers."""
        now = self._core.clock.now()
        return [
            RetryItem.pending(
                event,
                route.handler_name,
                max_retries=route.max_retries,
                due=due or now,
                now=now,
                metadata=trace_metadata(publisher, None),
                service=route.service,
            )
            for route in routes
        ]

    async def _record(
        self,
        event: Event,
        subscriptions: Sequence[Subscription],
        records: list[RetryItem],
        remote: Sequence[RetryItem] = (),
    ) -> tuple[list[tuple[Subscription, RetryItem]], tuple[str, ...]]:
        """Write the pending records (``remote``: other services', in the same
        write); the handlers whose record is new (to run here) and the names of
        those already recorded (left to whoever has them)."""
        written = [*records, *remote] if remote else records
        added = await self._core.ledger.record_pending(written, _context(event))
        run = [(s, r) for s, r in zip(subscriptions, records, strict=True) if r.id in added]
        pending = tuple(r.handler_name for r in records if r.id not in added)
        return run, pending

    async def _held_while(
        self, run: list[tuple[Subscription, RetryItem]], calls: Awaitable[R]
    ) -> R:
        """Await the handler calls while this process keeps their records' leases."""
        leases = self._core.leases
        ids = [record.id for _, record in run]
        leases.hold(ids)
        try:
            return await calls
        finally:
            leases.drop(ids)

    async def _finish(
        self,
        event: Event,
        run: list[tuple[Subscription, RetryItem]],
        calls: Calls,
        pending: tuple[str, ...],
    ) -> PublishResult:
        """Finish each record as a worker would: failures rescheduled or
        dead-lettered now (with the successes' removals), otherwise successes
        removed soon (not waited for)."""
        core = self._core
        now = core.clock.now()
        succeeded: list[str] = []
        removed: list[Attempted] = []
        attempted: list[Attempted] = []
        for index, ((subscription, record), error) in enumerate(
            zip(run, calls.errors, strict=True)
        ):
            delivery = None if calls.deliveries is None else calls.deliveries[index]
            if error is None:
                succeeded.append(subscription.name)
                removed.append(Attempted(Succeeded(record), delivery))
                continue
            policy = subscription.policy or core.default_policy
            traceparent = None if delivery is None else delivery.traceparent
            attempted.append(
                Attempted(failure_outcome(record, error, policy, now, traceparent), delivery)
            )
        if attempted:  # the removals go with the failures' write
            await core.ledger.finish_first(
                attempted, core.publish_owner, _context(event), removals=removed
            )
        elif removed:
            core.ledger.remove_soon(removed, core.publish_owner)
        return _result(event, succeeded, attempted, pending)

    # deferred ----------------------------------------------------------------

    async def _defer(
        self,
        event: Event,
        subscriptions: tuple[Subscription, ...],
        due: datetime | None,
        routes: tuple[Route, ...] = (),
    ) -> PublishResult:
        core = self._core
        observers = core.observers
        if not observers.watch_calls and not observers.watching_publish_ends:
            if not subscriptions and not routes:
                return PublishResult(event)
            records = self._records(event, subscriptions, None, leased=False, due=due)
            remote = self._routed(event, routes, None, due) if routes else ()
            await core.ledger.record_pending([*records, *remote], _context(event))
            return PublishResult(event, pending=tuple(r.handler_name for r in records))
        with _ObservedPublish(observers, event) as scope:
            event = scope.event
            records = self._records(event, subscriptions, scope.traceparent, leased=False, due=due)
            if routes:
                records += self._routed(event, routes, scope.traceparent, due)
            if records:
                await core.ledger.record_pending(records, _context(event))
            return PublishResult(
                event, pending=tuple(r.handler_name for r in records[: len(subscriptions)])
            )


class _ObservedPublish:
    """One publish as its observers see it: ``publish_started`` on entry, and
    ``publish_ended`` on the way out, after closing (for an error) the calls
    whose failure was never written."""

    def __init__(self, observers: Observers, event: Event) -> None:
        self._observers = observers
        self._publication = Publication(event)
        self.calls: Calls | None = None

    def __enter__(self) -> _ObservedPublish:
        self._observers.publish_started(self._publication)
        return self

    @property
    def event(self) -> Event:
        """The event as published (tracing gives it its ``traceparent``)."""
        return self._publication.event

    @property
    def traceparent(self) -> str | None:
        """The publish span's ``traceparent`` (None: none, or not sampled)."""
        return self._publication.traceparent

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            _unrecorded(self.calls, self._observers)
            self._observers.publish_ended(self._publication, exc)
        elif self._observers.watching_publish_ends:
            self._observers.publish_ended(self._publication, None)


def _unrecorded(calls: Calls | None, observers: Observers) -> None:
    """Close, for the observers, the failures whose outcome was never written."""
    if calls is None or calls.deliveries is None:
        return
    for delivery in calls.deliveries:
        if delivery.error is not None:
            observers.recorded(delivery, None, "failure", "error")


def _context(event: Event) -> str:
    return f"event {event.id} ({event.type})"


def _result(
    event: Event,
    succeeded: list[str],
    attempted: list[Attempted],
    pending: tuple[str, ...],
) -> PublishResult:
    retry_items = tuple(a.outcome.item for a in attempted if isinstance(a.outcome, Rescheduled))
    dead_letters = tuple(
        a.outcome.dead_letter for a in attempted if isinstance(a.outcome, DeadLettered)
    )
    return PublishResult(
        event,
        tuple(succeeded),
        tuple(item.handler_name for item in retry_items),
        tuple(item.handler_name for item in dead_letters),
        retry_items,
        dead_letters,
        pending,
    )
