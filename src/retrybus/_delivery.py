"""The delivery core: call one handler once with one event, and decide what
follows (success, another retry, the dead letter queue). Publish, the worker
and a dead letter's reprocess all call handlers through here; what they decide
is written and announced by the ledger (``_ledger``).

When no observer watches handler calls (no metrics, no tracing) the call takes
the plain path: no timing, no ``Delivery`` record, nothing but the call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._decision import decide
from ._event import Event
from ._handlers import Subscription, stops_the_caller
from ._observe import trace_metadata, with_failed_attempt
from ._observers import Delivery, Observers
from ._outcomes import DeadLettered, Outcome, Rescheduled, Succeeded
from ._records import ErrorInfo, RetryItem
from ._services import DEFAULT_SERVICE

if TYPE_CHECKING:
    from ._clock import Clock
    from ._observe import DeliveryKind
    from ._policy import RetryPolicy

__all__ = [
    "Attempted",
    "Calls",
    "call_all_observed",
    "call_all_plain",
    "call_observed",
    "call_plain",
    "deliver",
    "failure_outcome",
    "first_record",
    "observed_calls",
    "undeliverable",
    "unknown_handler",
]


@dataclass(frozen=True, slots=True)
class Attempted:
    """What one delivery decided (``outcome``), and the observers' view of its
    call (None when no observer watched it), on the way to the store."""

    outcome: Outcome
    delivery: Delivery | None = None


async def call_plain(
    subscription: Subscription, event: Event, time_limit: float | None = None
) -> BaseException | None:
    """Call the handler with its own copy of ``event``; the error it failed with,
    if any. A cancellation of the caller (``stops_the_caller``) propagates.
    ``time_limit`` limits the call when the handler has no limit of its own."""
    try:
        await subscription.call(event.copy(), time_limit)
    except BaseException as exc:
        if stops_the_caller(exc):
            raise
        return exc
    return None


async def call_observed(
    subscription: Subscription,
    delivery: Delivery,
    observers: Observers,
    payload: Event,
    *,
    nothing_to_write: bool = False,
    time_limit: float | None = None,
) -> None:
    """Call the handler with ``payload`` between the observers' ``call_started``
    and ``call_ended``; ``delivery.error`` and ``.seconds`` say how it went. With
    ``nothing_to_write`` (a first call at publish), a success is ``recorded`` at
    once: there is nothing to store. A cancellation of the caller is told to the
    observers (``error``) and propagates."""
    if observers.watching_call_starts:
        observers.call_started(delivery)
    start = time.perf_counter()
    try:
        await subscription.call(payload, time_limit)
    except BaseException as exc:
        delivery.error = exc
        delivery.seconds = time.perf_counter() - start
        if stops_the_caller(exc):
            observers.call_ended(delivery)
            observers.recorded(delivery, None, "failure", "error")
            raise
        observers.call_ended(delivery)
        return
    delivery.seconds = time.perf_counter() - start
    observers.call_ended(delivery)
    if nothing_to_write and delivery.span is not None:  # only a span waits for it
        observers.recorded(delivery, None, "success", "applied")


def first_record(
    event: Event,
    handler: str,
    max_retries: int,
    now: datetime,
    publisher: str | None,
    service: str = DEFAULT_SERVICE,
    record_id: str | None = None,
) -> RetryItem:
    """The record of a first delivery (attempt 0, due now) to ``handler`` of
    ``service``: what a first failure is decided from, and, with durable
    delivery, what is stored before the call. ``record_id`` fixes its id (None:
    a new one)."""
    return RetryItem.for_failure(
        event,
        handler,
        ErrorInfo("", ""),
        attempt=0,
        max_retries=max_retries,
        next_retry=now,
        now=now,
        metadata=trace_metadata(publisher, None),
        service=service,
        id=record_id,
    )


def failure_outcome(
    record: RetryItem,
    error: BaseException,
    policy: RetryPolicy,
    now: datetime,
    traceparent: str | None = None,
) -> Rescheduled | DeadLettered:
    """What follows a failed call of ``record``'s handler, by its policy: the
    record rescheduled as the next retry, or moved to the dead letter queue.
    ``traceparent`` is the failed call's span, remembered for the next one's link."""
    info = ErrorInfo.from_exception(error)
    next_attempt = record.attempt + 1
    first_failed_at = now if record.attempt == 0 else record.created_at
    decision = decide(policy, error, next_attempt, first_failed_at, now)
    metadata: dict[str, Any] | None = (
        None if traceparent is None else with_failed_attempt(record.metadata, traceparent)
    )
    if decision.next_retry is None:
        return DeadLettered(
            record.id,
            record.to_dead_letter(
                reason=decision.reason,
                now=now,
                error=info,
                attempt=record.attempt,
                metadata=metadata,
            ),
            first_delivery=record.first_delivery,
        )
    return Rescheduled(
        record.rescheduled(
            attempt=next_attempt,
            next_retry=decision.next_retry,
            error=info,
            now=now,
            metadata=metadata,
        ),
        first_delivery=record.first_delivery,
    )


class Calls:
    """The handler calls of one first delivery: their errors, and the observers'
    view of each (None when no observer watches calls)."""

    __slots__ = ("deliveries", "errors")

    def __init__(self, errors: list[BaseException | None], deliveries: list[Delivery] | None):
        self.errors = errors
        self.deliveries = deliveries


async def call_all_plain(
    subscriptions: Sequence[Subscription], event: Event, time_limit: float | None = None
) -> list[BaseException | None]:
    """Call each handler with its own copy of ``event``, concurrently; their errors."""
    if len(subscriptions) == 1:
        return [await call_plain(subscriptions[0], event, time_limit)]
    return list(await asyncio.gather(*(call_plain(s, event, time_limit) for s in subscriptions)))


def observed_calls(
    subscriptions: Sequence[Subscription],
    event: Event,
    kind: DeliveryKind = "publish",
    metadata: Mapping[str, Any] | None = None,
) -> Calls:
    """The observers' record of each call, made before the calls start (a
    delivery cancelled midway still closes what it opened for them);
    ``metadata`` carries the publisher's ``traceparent`` when it comes from elsewhere."""
    if metadata is None:
        return Calls([], [Delivery(kind, event, s.name, 0) for s in subscriptions])
    return Calls([], [Delivery(kind, event, s.name, 0, metadata) for s in subscriptions])


async def call_all_observed(
    calls: Calls,
    subscriptions: Sequence[Subscription],
    event: Event,
    observers: Observers,
    time_limit: float | None = None,
) -> Calls:
    """Call each handler as ``calls`` records it (``observed_calls``), concurrently,
    between the observers' start and end of each; a success has nothing to write."""
    deliveries = calls.deliveries
    assert deliveries is not None
    if len(subscriptions) == 1:
        await call_observed(
            subscriptions[0],
            deliveries[0],
            observers,
            event.copy(),
            nothing_to_write=True,
            time_limit=time_limit,
        )
    else:
        await asyncio.gather(
            *(
                call_observed(
                    s, d, observers, event.copy(), nothing_to_write=True, time_limit=time_limit
                )
                for s, d in zip(subscriptions, deliveries, strict=True)
            )
        )
    calls.errors = [d.error for d in deliveries]
    return calls


def unknown_handler(record: RetryItem, now: datetime) -> DeadLettered:
    """A record whose handler no longer exists goes to the dead letter queue, uncalled."""
    reason = f"unknown handler: no handler named {record.handler_name!r} is subscribed"
    return DeadLettered(
        record.id,
        record.to_dead_letter(reason=reason, now=now, attempt=max(record.attempt - 1, 0)),
        first_delivery=record.first_delivery,
    )


def undeliverable(record: RetryItem, max_claims: int, now: datetime) -> DeadLettered:
    """A record claimed ``max_claims`` times without an outcome (its handler keeps
    killing or hanging its worker) goes to the dead letter queue, uncalled."""
    reason = f"undeliverable: claimed {max_claims} times without an outcome"
    return DeadLettered(
        record.id,
        record.to_dead_letter(reason=reason, now=now, attempt=max(record.attempt - 1, 0)),
        first_delivery=record.first_delivery,
    )


async def deliver(
    record: RetryItem,
    subscription: Subscription | None,
    *,
    observers: Observers,
    clock: Clock,
    default_policy: RetryPolicy,
    kind: DeliveryKind | None = None,
    time_limit: float | None = None,
) -> Attempted:
    """Call ``record``'s handler once and decide what follows: ``Succeeded``,
    ``Rescheduled`` or ``DeadLettered`` (an unknown handler is not called).
    ``kind`` is what the observers see (by default ``"deliver"`` for a first
    delivery, ``"retry"`` for the rest); ``time_limit`` limits the call when the
    handler has no limit of its own."""
    if subscription is None:
        return Attempted(unknown_handler(record, clock.now()))
    policy = subscription.policy or default_policy
    event = record.to_event()  # a payload of its own: the handler may change it
    if not observers.watch_calls:
        try:
            await subscription.call(event, time_limit)
        except BaseException as exc:
            if stops_the_caller(exc):
                raise
            return Attempted(failure_outcome(record, exc, policy, clock.now()))
        return Attempted(Succeeded(record))
    if kind is None:
        kind = "deliver" if record.attempt == 0 else "retry"
    delivery = Delivery(
        kind,
        event,
        record.handler_name,
        record.attempt,
        record.metadata,
        due=record.next_retry if kind == "retry" else None,
        started_at=clock.now(),
    )
    await call_observed(subscription, delivery, observers, event, time_limit=time_limit)
    if delivery.error is None:
        return Attempted(Succeeded(record), delivery)
    outcome = failure_outcome(record, delivery.error, policy, clock.now(), delivery.traceparent)
    return Attempted(outcome, delivery)
