"""The event bus: subscribe handlers, publish events, record every failure durably."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from ._clock import Clock, SystemClock
from ._core import BusCore
from ._dead_letters import DeadLetterQueue
from ._delivery import Attempted, call_observed, call_plain, failure_outcome, first_record
from ._errors import UnknownHandler
from ._event import Event
from ._filters import DeadLetterFilter
from ._handlers import Handler, Subscription
from ._ledger import DeadLetterHook
from ._observe import Metrics, Tracing
from ._observers import Delivery, Publication
from ._outcomes import DeadLettered, Rescheduled
from ._policy import ExponentialBackoff, RetryPolicy
from ._queues import RetryQueue
from ._records import DeadLetterItem, RetryItem
from ._stats import Stats
from ._stores.base import Store
from ._stores.memory import MemoryStore

if TYPE_CHECKING:
    from ._redrives import Redrives

__all__ = ["EventBus", "PublishResult"]

H = TypeVar("H", bound=Handler)

DEFAULT_STORE_TIMEOUT = 5.0
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
        self._core = BusCore(
            store if store is not None else MemoryStore(),
            default_policy=default_policy or ExponentialBackoff(),
            clock=clock or SystemClock(),
            retry_retention=retry_retention,
            dead_letter_retention=dead_letter_retention,
            store_timeout=float(store_timeout),
        )
        self.retry_queue = RetryQueue(self._core)
        self.dead_letters = DeadLetterQueue(self._core)
        self._redrives: Redrives | None = None
        self.instrument(metrics=metrics, tracing=tracing)

    @property
    def core(self) -> BusCore:
        """What this bus's queues and workers share (store, clock, handlers,
        observers, ledger); for workers and tools built on the bus."""
        return self._core

    @property
    def default_policy(self) -> RetryPolicy:
        """The policy of handlers subscribed without one."""
        return self._core.default_policy

    @property
    def clock(self) -> Clock:
        """Where the bus, its queues and workers read the time."""
        return self._core.clock

    @property
    def retry_retention(self) -> float | None:
        """Seconds a retry item may wait before a worker moves it to the DLQ."""
        return self._core.retry_retention

    @property
    def dead_letter_retention(self) -> float | None:
        """Seconds a dead letter is kept before a worker deletes it."""
        return self._core.dead_letter_retention

    @property
    def store_timeout(self) -> float:
        """Seconds ``publish`` retries its store write through an outage."""
        return self._core.store_timeout

    def instrument(self, *, metrics: Metrics | None = None, tracing: Tracing | None = None) -> None:
        """Report to ``metrics`` and/or trace with ``tracing`` from now on (each
        replaces the one set before; None leaves it as it is)."""
        if metrics is not None and not isinstance(metrics, Metrics):
            raise TypeError(
                f"metrics must implement retrybus.Metrics (see retrybus.prometheus), "
                f"got {metrics!r}"
            )
        if tracing is not None and not isinstance(tracing, Tracing):
            raise TypeError(
                f"tracing must implement retrybus.Tracing (see retrybus.otel), got {tracing!r}"
            )
        self._core.instrument(metrics, tracing)

    @property
    def metrics(self) -> Metrics | None:
        """Where this bus reports its metrics (None: nowhere)."""
        return self._core.metrics

    @property
    def tracing(self) -> Tracing | None:
        """What starts this bus's spans (None: no tracing)."""
        return self._core.tracing

    @property
    def redrives(self) -> Redrives:
        """Start, follow and steer redrives of the dead letter queue (``Redrives``)."""
        if self._redrives is None:
            # imported on first use: workers, which never redrive, stay small
            from ._redrives import Redrives

            self._redrives = Redrives(self._core, self.dead_letters)
        return self._redrives

    @property
    def store(self) -> Store:
        """The store holding the retry queue and the dead letter queue."""
        return self._core.store

    def use_store(self, store: Store) -> None:
        """Switch to another store (for example the one ``retrybus worker --store`` names)."""
        if not isinstance(store, Store):
            raise TypeError(f"store must be a retrybus store (see open_store), got {store!r}")
        self._core.store = store

    async def close(self) -> None:
        """Close the store."""
        await self._core.store.close()

    async def __aenter__(self) -> EventBus:
        await self._core.store.connect()
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
        return self._core.registry.add(pattern, handler, name=name, policy=policy)

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
        if self._core.registry.remove(name) is None:
            raise UnknownHandler(name)

    def subscription(self, name: str) -> Subscription:
        """The subscription of the handler called ``name``; raises ``UnknownHandler``."""
        subscription = self._core.subscription(name)
        if subscription is None:
            raise UnknownHandler(name)
        return subscription

    @property
    def handler_names(self) -> list[str]:
        """Names of the subscribed handlers, in subscription order."""
        return self._core.registry.names()

    def policy_for(self, handler_name: str) -> RetryPolicy:
        """The policy that governs ``handler_name`` (the bus default if it has none)."""
        return self._core.policy_for(handler_name)

    def on_dead_letter(self, callback: DeadLetterHook) -> DeadLetterHook:
        """Call ``callback(item)`` (plain or async) for each new dead letter, for
        alerts. Its own failure is logged; the dead letter is kept regardless.
        Usable as a decorator."""
        if not callable(callback):
            raise TypeError(f"on_dead_letter needs a callable, got {callback!r}")
        self._core.ledger.add_dead_letter_hook(callback)
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
        core = self._core
        subscriptions = core.registry.match(event.type)
        if core.observers.watch_calls:
            return await self._publish_observed(event, subscriptions)
        if not subscriptions:
            return PublishResult(event)
        if len(subscriptions) == 1:
            errors: list[BaseException | None] = [await call_plain(subscriptions[0], event)]
        else:
            errors = list(await asyncio.gather(*(call_plain(s, event) for s in subscriptions)))
        if not any(errors):
            return PublishResult(event, tuple(s.name for s in subscriptions))
        return await self._record_failures(event, subscriptions, errors, None, None)

    async def _publish_observed(
        self, event: Event, subscriptions: tuple[Subscription, ...]
    ) -> PublishResult:
        """``publish`` with its observers told at each point (metrics, tracing)."""
        observers = self._core.observers
        publication = Publication(event)
        observers.publish_started(publication)
        event = publication.event  # tracing gave it its traceparent
        if len(subscriptions) == 1:
            deliveries = [Delivery("publish", event, subscriptions[0].name, 0)]
        else:
            deliveries = [Delivery("publish", event, s.name, 0) for s in subscriptions]
        try:
            if len(subscriptions) == 1:
                delivery = deliveries[0]
                await call_observed(
                    subscriptions[0], delivery, observers, event.copy(), nothing_to_write=True
                )
                failed = delivery.error is not None
            else:
                await asyncio.gather(
                    *(
                        call_observed(s, d, observers, event.copy(), nothing_to_write=True)
                        for s, d in zip(subscriptions, deliveries, strict=True)
                    )
                )
                failed = any(delivery.error is not None for delivery in deliveries)
            if failed:
                result = await self._record_failures(
                    event,
                    subscriptions,
                    [delivery.error for delivery in deliveries],
                    deliveries,
                    publication.traceparent,
                )
            else:
                result = PublishResult(event, tuple(s.name for s in subscriptions))
        except BaseException as exc:
            for delivery in deliveries:
                if delivery.error is not None:  # a failure whose outcome was never written
                    observers.recorded(delivery, None, "failure", "error")
            observers.publish_ended(publication, exc)
            raise
        if observers.watching_publish_ends:
            observers.publish_ended(publication, None)
        return result

    async def _record_failures(
        self,
        event: Event,
        subscriptions: tuple[Subscription, ...],
        errors: list[BaseException | None],
        deliveries: list[Delivery] | None,
        publisher: str | None,
    ) -> PublishResult:
        """Decide and store what follows each failed first call, then the result."""
        core = self._core
        now = core.clock.now()
        succeeded: list[str] = []
        attempted: list[Attempted] = []
        for index, (subscription, error) in enumerate(zip(subscriptions, errors, strict=True)):
            if error is None:
                succeeded.append(subscription.name)
                continue
            policy = subscription.policy or core.default_policy
            record = first_record(event, subscription.name, policy.max_retries, now, publisher)
            delivery = None if deliveries is None else deliveries[index]
            traceparent = None if delivery is None else delivery.traceparent
            attempted.append(
                Attempted(failure_outcome(record, error, policy, now, traceparent), delivery)
            )
        await core.ledger.record_first_failures(attempted, f"event {event.id} ({event.type})")
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
        )

    # monitoring ------------------------------------------------------------

    async def stats(self) -> Stats:
        """Queue sizes, retry success rate and average attempts (the seed's monitoring),
        and how many retries fall due within a minute and an hour."""
        store = self._core.store
        counters = await store.counters()
        now = self._core.clock.now()
        return Stats.from_counts(
            retry_queue_size=await store.retry_count(),
            dead_letter_queue_size=await store.count_dead(DeadLetterFilter()),
            unprocessed_dead_letters=await store.count_dead(DeadLetterFilter(processed=False)),
            counters=counters,
            due_within_minute=await store.count_due(now + timedelta(minutes=1)),
            due_within_hour=await store.count_due(now + timedelta(hours=1)),
        )
