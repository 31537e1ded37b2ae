"""The event bus: subscribe handlers, publish events, record every failure durably."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from ._clock import Clock, SystemClock
from ._dead_letters import DeadLetterQueue
from ._decision import decide
from ._errors import StoreUnavailable, UnknownHandler
from ._event import Event
from ._filters import DeadLetterFilter
from ._guards import GuardedMetrics, GuardedTracing, guarded
from ._handlers import Handler, HandlerRegistry, Subscription, stops_the_caller
from ._observe import (
    NO_METRICS,
    DeliverySpan,
    Metrics,
    Tracing,
    end_quietly,
    last_failed_attempt,
    log_fields,
    reason_kind,
    timed_call,
    trace_metadata,
)
from ._policy import ExponentialBackoff, RetryPolicy
from ._queues import RetryQueue
from ._records import DeadLetterItem, ErrorInfo, RetryItem
from ._stats import Stats
from ._stores.base import Store
from ._stores.memory import MemoryStore

if TYPE_CHECKING:
    from ._redrives import Redrives

__all__ = ["EventBus", "PublishResult"]

logger = logging.getLogger("retrybus")

H = TypeVar("H", bound=Handler)
DeadLetterHook = Callable[[DeadLetterItem], Awaitable[Any]] | Callable[[DeadLetterItem], Any]

DEFAULT_STORE_TIMEOUT = 5.0
_FIRST_PAUSE = 0.05
_LONGEST_PAUSE = 1.0

SEVEN_DAYS = 7 * 24 * 3600.0
THIRTY_DAYS = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What became of one publish: which handlers succeeded, which were
    scheduled for retry and which were dead-lettered (by handler name)."""

    event: Event
    succeeded: tuple[str, ...] = ()
    retrying: tuple[str, ...] = ()
    dead_lettered: tuple[str, ...] = ()
    retry_items: tuple[RetryItem, ...] = field(default=(), repr=False)
    dead_letters: tuple[DeadLetterItem, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        """Every matching handler succeeded on the first call."""
        return not self.retrying and not self.dead_lettered


async def _call(subscription: Subscription, event: Event) -> BaseException | None:
    try:
        await subscription.call(event.copy())
    except BaseException as exc:
        if stops_the_caller(exc):
            raise
        return exc
    return None


async def _observed_call(
    subscription: Subscription,
    event: Event,
    metrics: Metrics | None,
    tracing: Tracing | None = None,
    started: list[tuple[str, DeliverySpan]] | None = None,
) -> BaseException | None:
    """``_call`` timed for metrics, inside a handler span when tracing; the span
    of a failed call is left open for its outcome. Spans are listed in
    ``started`` as soon as they exist."""
    span = None
    if tracing is not None and started is not None:
        span = tracing.delivery(event, subscription.name, kind="publish", attempt=0)
        started.append((subscription.name, span))
    error, seconds = await timed_call(subscription.call, event.copy(), span)
    if span is not None and error is None:
        end_quietly(span, "success")  # nothing to record: its outcome is known now
    if metrics is not None:
        metrics.handled(event.type, subscription.name, error is None, seconds)
    return error


class EventBus:
    """Handlers subscribed to event types; a failing handler's delivery is retried
    under its policy from the store's retry queue, and dead-lettered when retries
    are spent. A failure never reaches the publisher.

    >>> bus = EventBus(open_store("sqlite:///retrybus.db"))
    >>> @bus.handler("like.added")
    ... async def count_like(event: Event) -> None: ...
    >>> result = await bus.publish(Event("like.added", {"post_id": 7}))

    ``retry_retention`` and ``dead_letter_retention`` (seconds; None keeps
    forever) are the ages past which a worker moves retry items to the dead
    letter queue and deletes dead letters: 7 and 30 days by default.

    ``store_timeout`` (seconds, 5 by default; 0: no retrying) is how long
    ``publish`` keeps retrying its store write through an outage (a server
    restarting, a failover) before it raises ``StoreUnavailable``.

    ``metrics`` (``retrybus.prometheus.PrometheusMetrics``) and ``tracing``
    (``retrybus.otel.OpenTelemetryTracing``) turn on Prometheus metrics and
    OpenTelemetry spans for everything the bus, its workers and its dead
    letter queue do; ``instrument`` adds them later.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        default_policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        retry_retention: float | None = SEVEN_DAYS,
        dead_letter_retention: float | None = THIRTY_DAYS,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
    ) -> None:
        if store is not None and not isinstance(store, Store):
            raise TypeError(f"store must be a retrybus store (see open_store), got {store!r}")
        if default_policy is not None and not isinstance(default_policy, RetryPolicy):
            raise TypeError(f"default_policy must implement RetryPolicy, got {default_policy!r}")
        for name, value in (
            ("retry_retention", retry_retention),
            ("dead_letter_retention", dead_letter_retention),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value!r}")
        if (
            isinstance(store_timeout, bool)
            or not isinstance(store_timeout, int | float)
            or not 0 <= store_timeout < float("inf")
        ):
            raise ValueError(
                f"store_timeout must be a number of seconds >= 0, got {store_timeout!r}"
            )
        self.store_timeout = float(store_timeout)
        self._store: Store = store if store is not None else MemoryStore()
        self.default_policy: RetryPolicy = default_policy or ExponentialBackoff()
        self.clock: Clock = clock or SystemClock()
        self.retry_retention = retry_retention
        self.dead_letter_retention = dead_letter_retention
        self._registry = HandlerRegistry()
        self._hooks: list[DeadLetterHook] = []
        self._schedule_listeners: list[Callable[[datetime], None]] = []
        self.retry_queue = RetryQueue(self)
        self.dead_letters = DeadLetterQueue(self)
        self._redrives: Redrives | None = None
        self._metrics: Metrics | None = None  # what the bus calls (guarded)
        self._metrics_given: Metrics | None = None  # what it was given
        self._tracing: Tracing | None = None  # what the bus calls (guarded)
        self._tracing_given: Tracing | None = None
        self._observed = False  # either of them set: publish takes the observed path
        self.instrument(metrics=metrics, tracing=tracing)

    def instrument(self, *, metrics: Metrics | None = None, tracing: Tracing | None = None) -> None:
        """Report to ``metrics`` and/or trace with ``tracing`` from now on (each
        replaces the one set before; None leaves it as it is)."""
        if metrics is not None:
            if not isinstance(metrics, Metrics):
                raise TypeError(
                    f"metrics must implement retrybus.Metrics (see retrybus.prometheus), "
                    f"got {metrics!r}"
                )
            self._metrics_given = metrics
            self._metrics = guarded(metrics, GuardedMetrics)
        if tracing is not None:
            if not isinstance(tracing, Tracing):
                raise TypeError(
                    f"tracing must implement retrybus.Tracing (see retrybus.otel), got {tracing!r}"
                )
            self._tracing_given = tracing
            self._tracing = guarded(tracing, GuardedTracing)
        self._observed = self._metrics is not None or self._tracing is not None

    def _active_tracing(self) -> Tracing | None:
        """The (guarded) tracing to use now: None when off, or while its spans
        would go nowhere (no SDK set up)."""
        tracing = self._tracing
        return tracing if tracing is not None and tracing.active else None

    @property
    def metrics(self) -> Metrics | None:
        """Where this bus reports its metrics (None: nowhere)."""
        return self._metrics_given

    @property
    def tracing(self) -> Tracing | None:
        """What starts this bus's spans (None: no tracing)."""
        return self._tracing_given

    @property
    def redrives(self) -> Redrives:
        """Start, follow and steer redrives of the dead letter queue (``Redrives``)."""
        if self._redrives is None:
            # imported on first use: workers, which never redrive, stay small
            from ._redrives import Redrives

            self._redrives = Redrives(self)
        return self._redrives

    @property
    def store(self) -> Store:
        """The store holding the retry queue and the dead letter queue."""
        return self._store

    def use_store(self, store: Store) -> None:
        """Switch to another store (for example the one ``retrybus worker --store`` names)."""
        if not isinstance(store, Store):
            raise TypeError(f"store must be a retrybus store (see open_store), got {store!r}")
        self._store = store

    async def close(self) -> None:
        """Close the store."""
        await self._store.close()

    async def __aenter__(self) -> EventBus:
        await self._store.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # subscriptions ---------------------------------------------------------

    def subscribe(
        self,
        pattern: str | Iterable[str],
        handler: Handler,
        *,
        name: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> Subscription:
        """Run ``handler`` for events whose type matches ``pattern`` (an exact type,
        a glob such as ``like.*`` or ``*``, or a list of them).

        ``name`` (default: the function's qualified name) must be unique on the
        bus: retries find the handler by it. ``policy`` overrides the bus's
        ``default_policy`` for this handler.
        """
        return self._registry.add(pattern, handler, name=name, policy=policy)

    def handler(
        self,
        pattern: str | Iterable[str],
        *,
        name: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> Callable[[H], H]:
        """Decorator form of ``subscribe``; returns the function unchanged."""

        def register(function: H) -> H:
            self.subscribe(pattern, function, name=name, policy=policy)
            return function

        return register

    def unsubscribe(self, name: str) -> None:
        """Remove the handler called ``name``; raises ``UnknownHandler``."""
        if self._registry.remove(name) is None:
            raise UnknownHandler(name)

    def subscription(self, name: str) -> Subscription:
        """The subscription of the handler called ``name``; raises ``UnknownHandler``."""
        subscription = self._registry.get(name)
        if subscription is None:
            raise UnknownHandler(name)
        return subscription

    @property
    def handler_names(self) -> list[str]:
        """Names of the subscribed handlers, in subscription order."""
        return self._registry.names()

    def policy_for(self, handler_name: str) -> RetryPolicy:
        """The policy that governs ``handler_name`` (the bus default if it has none)."""
        subscription = self._registry.get(handler_name)
        if subscription is not None and subscription.policy is not None:
            return subscription.policy
        return self.default_policy

    def on_dead_letter(self, callback: DeadLetterHook) -> DeadLetterHook:
        """Call ``callback(item)`` (plain or async) for each new dead letter, for
        alerts. Its own failure is logged; the dead letter is kept regardless.
        Usable as a decorator."""
        if not callable(callback):
            raise TypeError(f"on_dead_letter needs a callable, got {callback!r}")
        self._hooks.append(callback)
        return callback

    # publishing ------------------------------------------------------------

    async def publish(self, event: Event) -> PublishResult:
        """Run every handler matching ``event.type`` concurrently.

        Never raises a handler's error: each failure is scheduled for retry or
        dead-lettered, durably, before this returns. The store write is retried
        through an outage for up to ``store_timeout`` seconds; raises only when
        the failure could still not be recorded (``StoreUnavailable``), or when
        the store refuses it (``RecordRejected``, not worth retrying).
        """
        if not isinstance(event, Event):
            raise TypeError(f"publish takes a retrybus.Event, got {event!r}")
        if self._observed:
            return await self._publish_observed(event)
        subscriptions = self._registry.match(event.type)
        if not subscriptions:
            return PublishResult(event)
        if len(subscriptions) == 1:
            errors: list[BaseException | None] = [await _call(subscriptions[0], event)]
        else:
            errors = list(await asyncio.gather(*(_call(s, event) for s in subscriptions)))
        if not any(errors):
            return PublishResult(event, tuple(s.name for s in subscriptions))
        return await self._record_failures(event, subscriptions, errors)

    async def _publish_observed(self, event: Event) -> PublishResult:
        """``publish`` with a span around it and the handlers' calls, and metrics."""
        metrics, tracing = self._metrics, self._active_tracing()
        if tracing is None:
            return await self._publish_metered(event, metrics or NO_METRICS)
        span = tracing.publish(event)
        event = span.event  # now carrying its traceparent
        started: list[tuple[str, DeliverySpan]] = []
        try:
            if metrics is not None:
                metrics.published(event.type)
            subscriptions = self._registry.match(event.type)
            calls = [_observed_call(s, event, metrics, tracing, started) for s in subscriptions]
            if not calls:
                errors: list[BaseException | None] = []
            elif len(calls) == 1:
                errors = [await calls[0]]
            else:
                errors = list(await asyncio.gather(*calls))
            if any(errors):
                result = await self._record_failures(
                    event, subscriptions, errors, dict(started), span.traceparent
                )
            else:
                result = PublishResult(event, tuple(s.name for s in subscriptions))
        except BaseException as exc:
            for _name, delivery in started:
                end_quietly(delivery, "error")
            end_quietly(span, exc)
            raise
        reasons = {dead.handler_name: dead.reason for dead in result.dead_letters}
        for name, delivery in started:  # the successful ones have ended already
            if name in reasons:
                end_quietly(delivery, "dead_letter", reasons[name])
            elif name in result.retrying:
                end_quietly(delivery, "retry")
        end_quietly(span)
        return result

    async def _publish_metered(self, event: Event, metrics: Metrics) -> PublishResult:
        """``publish`` reporting to ``metrics`` (without tracing: the lean path)."""
        metrics.published(event.type)
        subscriptions = self._registry.match(event.type)
        if not subscriptions:
            return PublishResult(event)
        if len(subscriptions) == 1:
            subscription = subscriptions[0]
            start = time.perf_counter()
            error = await _call(subscription, event)
            seconds = time.perf_counter() - start
            metrics.handled(event.type, subscription.name, error is None, seconds)
            if error is None:
                return PublishResult(event, (subscription.name,))
            errors: list[BaseException | None] = [error]
        else:
            errors = list(
                await asyncio.gather(*(_observed_call(s, event, metrics) for s in subscriptions))
            )
            if not any(errors):
                return PublishResult(event, tuple(s.name for s in subscriptions))
        return await self._record_failures(event, subscriptions, errors)

    async def _record_failures(
        self,
        event: Event,
        subscriptions: tuple[Subscription, ...],
        errors: list[BaseException | None],
        spans: dict[str, DeliverySpan] | None = None,
        publish: str | None = None,
    ) -> PublishResult:
        now = self.clock.now()
        succeeded: list[str] = []
        retry_items: list[RetryItem] = []
        dead_letters: list[DeadLetterItem] = []
        for subscription, error in zip(subscriptions, errors, strict=True):
            if error is None:
                succeeded.append(subscription.name)
                continue
            policy = subscription.policy or self.default_policy
            decision = decide(policy, error, 1, now, now)
            info = ErrorInfo.from_exception(error)
            span = spans.get(subscription.name) if spans else None
            attempt = None if span is None else span.traceparent
            metadata = trace_metadata(publish, attempt)
            if decision.next_retry is not None:
                retry_items.append(
                    RetryItem.for_failure(
                        event,
                        subscription.name,
                        info,
                        attempt=1,
                        max_retries=policy.max_retries,
                        next_retry=decision.next_retry,
                        now=now,
                        metadata=metadata,
                    )
                )
                logger.info(
                    "handler %s failed for event %s (%s), retry 1 in %.3gs: %s",
                    subscription.name,
                    event.id,
                    event.type,
                    decision.delay,
                    info.message,
                    extra=log_fields(event.id, event.type, subscription.name, 1, attempt),
                )
            else:
                dead_letters.append(
                    DeadLetterItem.for_failure(
                        event,
                        subscription.name,
                        info,
                        reason=decision.reason,
                        attempt=0,
                        max_retries=policy.max_retries,
                        now=now,
                        metadata=metadata,
                    )
                )
        await self._record_durably(retry_items, dead_letters, event)
        if retry_items:
            if self._metrics is not None:
                for item in retry_items:
                    self._metrics.retry_scheduled(item.event_type, item.handler_name)
            self._retry_scheduled(min(item.next_retry for item in retry_items))
        await self._announce_dead_letters(dead_letters)
        return PublishResult(
            event,
            tuple(succeeded),
            tuple(item.handler_name for item in retry_items),
            tuple(item.handler_name for item in dead_letters),
            tuple(retry_items),
            tuple(dead_letters),
        )

    async def _record_durably(
        self,
        retry_items: list[RetryItem],
        dead_letters: list[DeadLetterItem],
        event: Event,
    ) -> None:
        """Write a publish's failures, retrying through a store outage for up to
        ``store_timeout`` seconds (the write is safe to repeat: ids already stored
        are skipped) before ``StoreUnavailable`` reaches the publisher."""
        started = time.monotonic()
        pause = _FIRST_PAUSE
        while True:
            try:
                await self._store.record_failures(retry_items, dead_letters)
            except StoreUnavailable as exc:
                remaining = self.store_timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise
                if pause == _FIRST_PAUSE:  # once per publish
                    logger.warning(
                        "publish of event %s (%s): %s; retrying for up to %gs",
                        event.id,
                        event.type,
                        exc,
                        self.store_timeout,
                    )
                await asyncio.sleep(min(pause, remaining))  # the last try at the deadline
                pause = min(pause * 2, _LONGEST_PAUSE)
            else:
                return

    # monitoring ------------------------------------------------------------

    async def stats(self) -> Stats:
        """Queue sizes, retry success rate and average attempts (the seed's monitoring),
        and how many retries fall due within a minute and an hour."""
        counters = await self._store.counters()
        now = self.clock.now()
        return Stats.from_counts(
            retry_queue_size=await self._store.retry_count(),
            dead_letter_queue_size=await self._store.count_dead(DeadLetterFilter()),
            unprocessed_dead_letters=await self._store.count_dead(
                DeadLetterFilter(processed=False)
            ),
            counters=counters,
            due_within_minute=await self._store.count_due(now + timedelta(minutes=1)),
            due_within_hour=await self._store.count_due(now + timedelta(hours=1)),
        )

    # between the bus, its queues and workers -------------------------------

    def _add_schedule_listener(self, listener: Callable[[datetime], None]) -> None:
        self._schedule_listeners.append(listener)

    def _remove_schedule_listener(self, listener: Callable[[datetime], None]) -> None:
        if listener in self._schedule_listeners:
            self._schedule_listeners.remove(listener)

    def _retry_scheduled(self, when: datetime) -> None:
        for listener in self._schedule_listeners:
            listener(when)

    async def _announce_dead_letters(self, items: Iterable[DeadLetterItem]) -> None:
        metrics = self._metrics
        for item in items:
            if metrics is not None:
                metrics.dead_lettered(item.event_type, item.handler_name, reason_kind(item.reason))
            logger.warning(
                "dead-lettered event %s (%s) for handler %s: %s (%s)",
                item.event_id,
                item.event_type,
                item.handler_name,
                item.reason,
                item.error,
                extra={
                    **log_fields(
                        item.event_id,
                        item.event_type,
                        item.handler_name,
                        item.attempt,
                        last_failed_attempt(item.metadata),
                    ),
                    "reason": item.reason,
                },
            )
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
