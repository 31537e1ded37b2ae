"""The event bus: subscribe handlers, publish events, record every failure durably."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._breaker import CircuitBreaker
from ._breakers import Breakers
from ._clock import Clock, SystemClock
from ._core import BusCore
from ._dead_letters import DeadLetterQueue
from ._errors import UnknownHandler
from ._event import Event
from ._event_types import EventType, Upcaster, Validation
from ._filters import DeadLetterFilter
from ._handlers import Handler, Subscription
from ._inbox import Inbox
from ._ledger import DeadLetterHook
from ._observe import Metrics, Tracing
from ._ordering import keyed, ordering_key_of
from ._outbox import Outbox
from ._policy import ExponentialBackoff, RetryPolicy
from ._publish import Publisher, Publishing, PublishResult
from ._queues import RetryQueue
from ._rate import Rate
from ._routes import subscriptions_changed
from ._send import SEND_HANDLER, TransportPublisher
from ._service_admin import Services
from ._services import DEFAULT_SERVICE, Registration, StoredSubscription, check_service
from ._stats import Stats
from ._stores.base import Store
from ._stores.memory import MemoryStore
from ._transports.base import Transport

if TYPE_CHECKING:
    from ._redrives import Redrives
    from ._worker import RetryWorker

__all__ = ["EventBus", "PublishResult"]

H = TypeVar("H", bound=Handler)

DEFAULT_STORE_TIMEOUT = 5.0
DEFAULT_TRANSPORT_TIMEOUT = 5.0
DEFAULT_PUBLISH_LEASE = 60.0
DEFAULT_MAX_CLAIMS = 3
#: seconds between two checks of the store's subscriptions by a publisher
DEFAULT_ROUTE_REFRESH = 5.0
SEVEN_DAYS = 7 * 24 * 3600.0
THIRTY_DAYS = 30 * 24 * 3600.0


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
    letter queue and deletes dead letters: 7 and 30 days by default. A retry
    expires by its age; a deferred or scheduled first delivery only once it has
    been due that long without a worker taking it, so one scheduled further
    ahead is never expired before its time.

    ``store_timeout`` (seconds, 5 by default; 0: no retrying) is how long
    ``publish`` keeps retrying its store write through an outage (a server
    restarting, a failover) before it raises ``StoreUnavailable``.

    ``metrics`` (``retrybus.prometheus.PrometheusMetrics``) and ``tracing``
    (``retrybus.otel.OpenTelemetryTracing``) turn on Prometheus metrics and
    OpenTelemetry spans for everything the bus, its workers and its dead
    letter queue do; ``instrument`` adds them later.

    ``service`` names the service the bus's handlers belong to (``"default"``
    unless named; 1 to 64 letters, digits, ``.``, ``_`` or ``-``): its records
    carry the name. ``publish`` also records a pending delivery for each
    handler of another service whose stored subscription (``register``) matches
    the event's type; ``route_refresh`` (seconds, 5 by default; 0: before every
    publish) is how often it checks the store for subscriptions that changed.

    ``transport`` (``open_transport(url)``: Redis Streams, RabbitMQ, NATS
    JetStream, or ``memory://`` in tests) makes a broker carry each event's first
    delivery instead of the store: ``publish`` returns once the broker confirmed
    the event (retrying through an outage for up to ``transport_timeout``
    seconds, then raising ``TransportUnavailable``), and the workers of every
    subscribed service consume it from there; retries, scheduled deliveries and
    dead letters stay in the store.

    ``outbox`` is the URL of your application's database
    (``postgresql://…[?schema=NAME]`` or ``sqlite:///app.db``) when it is not
    the store's: ``bus.outbox.stage(event, connection=conn)`` writes events to
    its ``retrybus_outbox`` table inside your transaction, and every worker of
    the bus relays them from there (``bus.outbox.relay()``). When your
    transaction is on the store's own database, ``stage`` needs no relay.

    ``inbox=True`` makes the store remember each handler's successful
    deliveries for ``inbox_retention`` seconds (7 days by default; None:
    forever): a delivery of an event whose handler already succeeded (a
    duplicate publish, a redelivery after a crash, a broker's redelivery) is
    not run again, but finished as a success and counted as skipped
    (``subscribe(..., inbox=True)`` turns it on for one handler). A redrive or
    reprocess of a dead letter, an operator's explicit action, still runs it.
    ``bus.inbox.claim(event, connection=conn)`` makes an effect in your own
    database happen once, whatever the setting (its claims are kept for
    ``inbox_retention`` too).
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        service: str = DEFAULT_SERVICE,
        default_policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        retry_retention: float | None = SEVEN_DAYS,
        dead_letter_retention: float | None = THIRTY_DAYS,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
        durable: bool | None = None,
        publish_lease: float = DEFAULT_PUBLISH_LEASE,
        max_claims: int = DEFAULT_MAX_CLAIMS,
        route_refresh: float = DEFAULT_ROUTE_REFRESH,
        transport: Transport | None = None,
        transport_timeout: float = DEFAULT_TRANSPORT_TIMEOUT,
        outbox: str | None = None,
        inbox: bool = False,
        inbox_retention: float | None = SEVEN_DAYS,
    ) -> None:
        if store is not None and not isinstance(store, Store):
            raise TypeError(f"store must be a retrybus store (see open_store), got {store!r}")
        if default_policy is not None and not isinstance(default_policy, RetryPolicy):
            raise TypeError(f"default_policy must implement RetryPolicy, got {default_policy!r}")
        if not isinstance(inbox, bool):
            raise TypeError(f"inbox must be True or False, got {inbox!r}")
        for name, value in (
            ("retry_retention", retry_retention),
            ("dead_letter_retention", dead_letter_retention),
            ("inbox_retention", inbox_retention),
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
        if durable is not None and not isinstance(durable, bool):
            raise TypeError(f"durable must be True, False or None, got {durable!r}")
        if (
            isinstance(publish_lease, bool)
            or not isinstance(publish_lease, int | float)
            or not 0 < publish_lease < float("inf")
        ):
            raise ValueError(
                f"publish_lease must be a number of seconds > 0, got {publish_lease!r}"
            )
        if isinstance(max_claims, bool) or not isinstance(max_claims, int) or max_claims < 1:
            raise ValueError(f"max_claims must be an int >= 1, got {max_claims!r}")
        if (
            isinstance(route_refresh, bool)
            or not isinstance(route_refresh, int | float)
            or not 0 <= route_refresh < float("inf")
        ):
            raise ValueError(
                f"route_refresh must be a number of seconds >= 0, got {route_refresh!r}"
            )
        if (
            isinstance(transport_timeout, bool)
            or not isinstance(transport_timeout, int | float)
            or not 0 <= transport_timeout < float("inf")
        ):
            raise ValueError(
                f"transport_timeout must be a number of seconds >= 0, got {transport_timeout!r}"
            )
        self._transport_timeout = float(transport_timeout)
        check_service(service)
        if store is None:
            store = MemoryStore()
        self._core = BusCore(
            store,
            service=service,
            default_policy=default_policy or ExponentialBackoff(),
            clock=clock or SystemClock(),
            retry_retention=retry_retention,
            dead_letter_retention=dead_letter_retention,
            store_timeout=float(store_timeout),
            durable=durable,
            publish_lease=float(publish_lease),
            max_claims=max_claims,
            route_refresh=float(route_refresh),
            inbox=inbox,
            inbox_retention=None if inbox_retention is None else float(inbox_retention),
        )
        store_publisher = Publisher(self._core)
        self._store_publisher = store_publisher
        self._publisher: Publishing = store_publisher
        if transport is not None:
            self.use_transport(transport)
        self.retry_queue = RetryQueue(self._core)
        self.dead_letters = DeadLetterQueue(self._core)
        #: the services sharing the store: subscriptions, workers, loads, removals
        self.services = Services(self._core)
        self._redrives: Redrives | None = None
        #: the transactional outbox: ``stage`` an event in your own transaction
        self.outbox = Outbox(self._core, lambda: store_publisher, lambda: self._publisher, outbox)
        #: the idempotent inbox: ``claim`` a delivery in your handler's transaction
        self.inbox = Inbox(self._core)
        self.instrument(metrics=metrics, tracing=tracing)

    @property
    def core(self) -> BusCore:
        """What this bus's queues and workers share (store, clock, handlers,
        observers, ledger); for workers and tools built on the bus."""
        return self._core

    @property
    def service(self) -> str:
        """The service this bus's handlers belong to (``"default"`` unless named)."""
        return self._core.service

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
        """Seconds a retry item may wait before a worker moves it to the DLQ (a
        deferred or scheduled first delivery: seconds it may wait once due)."""
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
    def breakers(self) -> Breakers:
        """The circuit breakers in front of this bus's handlers: list, get,
        isolate, reset (``Breakers``)."""
        return self._core.breakers

    @property
    def store(self) -> Store:
        """The store holding the retry queue and the dead letter queue."""
        return self._core.store

    def use_store(self, store: Store) -> None:
        """Switch to another store (for example the one ``retrybus worker --store`` names)."""
        if not isinstance(store, Store):
            raise TypeError(f"store must be a retrybus store (see open_store), got {store!r}")
        self._core.store = store

    @property
    def transport(self) -> Transport | None:
        """The broker that carries first deliveries (None: the store carries them)."""
        return self._core.transport

    def use_transport(self, transport: Transport) -> None:
        """Carry first deliveries on ``transport`` from now on (for example the one
        ``retrybus worker --transport`` names). A bus asked to publish without
        durability (``durable=False``) cannot: a broker's publish is durable."""
        if not isinstance(transport, Transport):
            raise TypeError(
                f"transport must be a retrybus transport (see open_transport), got {transport!r}"
            )
        if self._core.durable is False:
            raise ValueError(
                "a bus with a transport publishes through it, durably: durable=False "
                "cannot be kept (leave durable unset)"
            )
        if SEND_HANDLER in self._core.registry.names():
            raise ValueError(f"the handler name {SEND_HANDLER!r} is retrybus's own")
        publisher = TransportPublisher(self._core, transport, self._transport_timeout)
        self._core.transport = transport
        self._core.builtins[SEND_HANDLER] = publisher.send_subscription
        self._publisher = publisher

    def consumer(self, **options: Any) -> RetryWorker:
        """A worker of this bus (``RetryWorker(bus, **options)``) for ``async with``:
        with a transport it consumes the service's messages from the broker, and
        retries from the store, as ``retrybus worker`` does."""
        from ._worker import RetryWorker

        return RetryWorker(self, **options)

    async def register(self, *, prune: bool = False, actor: str | None = None) -> Registration:
        """Store this service's subscriptions: each handler's name, patterns,
        policy (in words), ``max_retries`` and time limit, so that publishers of
        other services record deliveries for them from now on, and keep doing so
        while no worker of this service runs (a deploy): the service catches up
        when one starts. Each handler's record also names the version of every
        registered event type it receives, and the service's registered types
        are stored beside (``Services.event_types``): what the services page
        compares producers and consumers by. Each circuit breaker's settings
        and handlers go into its control record (what ``retrybus breakers``
        reads without the app). A worker registers when it starts.
        With ``prune``, the
        service's stored handlers that this bus no longer has are removed
        (``actor`` says by whom; what was pending for them is dead-lettered by
        the workers' sweep, never dropped). Returns what changed."""
        core = self._core
        store = core.store
        now = core.clock.now()
        subscriptions = []
        for s in core.registry.subscriptions():
            patterns, details = core.types.stored_terms(s.patterns)
            subscriptions.append(
                StoredSubscription(
                    service=core.service,
                    handler_name=s.name,
                    patterns=patterns,
                    policy=repr(s.policy or core.default_policy),
                    max_retries=(s.policy or core.default_policy).max_retries,
                    handler_timeout=s.timeout,
                    registered_at=now,
                    updated_at=now,
                    details=details,
                )
            )
        await self.services.record_event_types()
        registration = await store.put_subscriptions(
            core.service,
            subscriptions,
            prune=prune,
            now=now,
            actor=actor or f"register(prune=True) by {core.publish_owner.removeprefix('publish:')}",
        )
        if registration.wrote:
            subscriptions_changed(store)
        await core.breakers.store_settings()  # `retrybus breakers` lists and resets them
        return registration

    async def close(self) -> None:
        """Write what is still on its way to the store (the removals of durable
        deliveries that succeeded), then close the store."""
        await self._publisher.flush()
        await self._core.ledger.flush()
        if self._core.transport is not None:
            await self._core.transport.close()
        await self.outbox.close()
        await self._core.store.close()

    async def __aenter__(self) -> EventBus:
        await self._core.store.connect()
        if self._core.transport is not None:
            await self._core.transport.connect()
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
        handler_timeout: float | None = None,
        inbox: bool | None = None,
        breaker: CircuitBreaker | str | None = None,
        rate: str | Rate | None = None,
        max_concurrency: int | None = None,
    ) -> Subscription:
        """Run ``handler`` for events whose type matches ``pattern`` (an exact type,
        a glob such as ``like.*`` or ``*``, or a list of them).

        ``name`` (default: the function's qualified name) must be unique on the
        bus: retries find the handler by it. ``policy`` overrides the bus's
        ``default_policy`` for this handler. ``handler_timeout`` (seconds) limits
        each call: past it, an async handler is cancelled and the delivery fails
        with ``TimeoutError`` under the policy (a plain handler's thread cannot be
        stopped: its delivery fails and the thread is left to finish).
        ``inbox`` (None: the bus's ``inbox`` setting) makes the store remember
        this handler's successes and skip an event it already handled.
        ``breaker`` (a ``CircuitBreaker``, or the name of one given to an earlier
        handler: handlers share a breaker by name) pauses the handler's
        deliveries while the dependency it calls keeps failing, without using
        their attempts (see ``CircuitBreaker``, ``bus.breakers``).
        ``rate`` (``"200/s"``, ``"30/m"``, ``"100/h"`` or a ``Rate``) limits the
        handler's calls across every worker of the service (a token bucket in
        the store): workers claim its records only as tokens allow, and a
        durable publish records its deliveries for them instead of calling it
        (a publish that is not durable calls it if a token is free now, else
        does the same). ``max_concurrency`` allows at most that many calls of it
        at once in this process (publish and workers alike).
        """
        core = self._core
        shared = None if breaker is None else core.breakers.resolve(breaker)
        subscription = core.registry.add(
            pattern,
            handler,
            name=name,
            policy=policy,
            timeout=handler_timeout,
            inbox=inbox,
            breaker=shared,
            rate=rate,
            max_concurrency=max_concurrency,
        )
        if shared is not None:
            core.breakers.attach(subscription.name, shared)
        return subscription

    def handler(
        self,
        pattern: str | Iterable[str],
        *,
        name: str | None = None,
        policy: RetryPolicy | None = None,
        handler_timeout: float | None = None,
        inbox: bool | None = None,
        breaker: CircuitBreaker | str | None = None,
        rate: str | Rate | None = None,
        max_concurrency: int | None = None,
    ) -> Callable[[H], H]:
        """Decorator form of ``subscribe``; returns the function unchanged."""

        def register(function: H) -> H:
            self.subscribe(
                pattern,
                function,
                name=name,
                policy=policy,
                handler_timeout=handler_timeout,
                inbox=inbox,
                breaker=breaker,
                rate=rate,
                max_concurrency=max_concurrency,
            )
            return function

        return register

    def unsubscribe(self, name: str) -> None:
        """Remove the handler called ``name``; raises ``UnknownHandler``."""
        if self._core.registry.remove(name) is None:
            raise UnknownHandler(name)
        self._core.breakers.detach(name)

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

    # event types ------------------------------------------------------------

    def event_type(
        self,
        name: str,
        *,
        version: int = 1,
        schema: object = None,
        upcasters: Mapping[int, Upcaster] | None = None,
        aliases: Iterable[str] = (),
        validate: Validation = "publish",
        unknown_version: Literal["dead_letter", "deliver"] = "dead_letter",
        dataschema: str | None = None,
    ) -> EventType:
        """Register the event type ``name`` at its current ``version``.

        ``schema`` is what its data is at that version: a pydantic model (the
        ``retrybus[pydantic]`` extra), or any callable that takes the data and
        raises when it is invalid (what it returns, unless None, is what a typed
        handler receives). ``upcasters[n]`` lifts version n's data to n+1: a pure
        function of the data (``fn(data)``), or of the data and the event
        (``fn(data, event)``). ``aliases`` are old names of the type, still
        accepted: an event published under one reaches this type's handlers as
        this type. ``validate`` says when the data is checked against the
        schema: at ``"publish"`` (the default: bad data raises ``ValueError``
        naming the field, and nothing is recorded), at ``"deliver"``, ``"both"``
        or never (None). ``unknown_version`` is what a version newer than
        ``version`` meets: the dead letter queue (``"dead_letter"``, the
        default: after the deploy that knows it, a redrive delivers it), or the
        handlers as it is (``"deliver"``). ``dataschema`` is a URI stamped on
        every event published (CloudEvents ``dataschema``).

        ``publish`` stamps ``dataversion`` (an event without one is version 1);
        every delivery (inline, by a worker, a reprocess, a requeue, a redrive,
        from a broker) reads the stored event as the current version, its data
        upcast on a copy: the stored payload and version are never rewritten.
        An upcaster that raises dead-letters the delivery (``UpcastFailed``, not
        retried), as does an unknown version (``UnknownVersion``).

        Registering a name again replaces its registration. Returns the type.
        """
        return self._core.types.register(
            name,
            version=version,
            schema=schema,
            upcasters=upcasters,
            aliases=aliases,
            validate=validate,
            unknown_version=unknown_version,
            dataschema=dataschema,
        )

    @property
    def event_types(self) -> list[EventType]:
        """The registered event types, in registration order."""
        return list(self._core.types)

    def on_dead_letter(self, callback: DeadLetterHook) -> DeadLetterHook:
        """Call ``callback(item)`` (plain or async) for each new dead letter, for
        alerts. Its own failure is logged; the dead letter is kept regardless.
        Usable as a decorator."""
        if not callable(callback):
            raise TypeError(f"on_dead_letter needs a callable, got {callback!r}")
        self._core.ledger.add_dead_letter_hook(callback)
        return callback

    # publishing ------------------------------------------------------------

    async def publish(
        self,
        event: Event,
        *,
        durable: bool | None = None,
        defer: bool = False,
        deliver_at: datetime | None = None,
        deliver_in: float | None = None,
        ordering_key: str | None = None,
    ) -> PublishResult:
        """Deliver ``event`` to every handler matching its type.

        By default the handlers run here, concurrently, and this returns once
        each has succeeded or had its failure recorded (scheduled for retry or
        dead-lettered): a handler's error never reaches the publisher. Durable
        (``durable``, by default the bus's setting: on for a persistent store), a
        pending record per handler is written first, so that a process dying
        mid-handler leaves the delivery to a worker instead of losing it.

        ``defer=True`` records the deliveries and returns at once: workers run
        them. ``deliver_at`` (an aware datetime) or ``deliver_in`` (seconds) do the
        same, not before that time. ``PublishResult.pending`` names the handlers
        left to a worker (empty when no handler here matches: nothing is recorded).

        Store writes are retried through an outage for up to ``store_timeout``
        seconds; raises ``StoreUnavailable`` when they could still not be made,
        or ``RecordRejected`` when the store refuses the record (not worth retrying).

        ``ordering_key`` (a non-empty str of at most 200 characters; it travels
        as the event's CloudEvents ``partitionkey`` extension, and an event that
        carries one is keyed too): each handler of a service gets the events of
        one key one at a time, in publish order. A keyed event is recorded
        pending and left to the workers (it never runs inline, where it could
        overtake an earlier one of its key), also on a bus with a transport,
        whose competing consumers could not keep the order.
        """
        if not isinstance(event, Event):
            raise TypeError(f"publish takes a retrybus.Event, got {event!r}")
        event = keyed(event, ordering_key)
        core = self._core
        if core.types.active:
            event = core.types.stamp(event)
        if durable is not None and not isinstance(durable, bool):
            raise TypeError(f"durable must be True, False or None, got {durable!r}")
        if not isinstance(defer, bool):
            raise TypeError(f"defer must be True or False, got {defer!r}")
        due = self._due(deliver_at, deliver_in)
        if durable is False and core.transport is not None:
            raise ValueError(
                "a bus with a transport publishes through it, durably: durable=False is "
                "not possible (the broker's confirm is the durability point)"
            )
        if ordering_key_of(event.extensions) is not None:
            return await self._store_publisher.publish(event, durable=True, due=due, defer=True)
        return await self._publisher.publish(
            event,
            durable=core.publishes_durably if durable is None else durable,
            due=due,
            defer=defer,
        )

    def _due(self, deliver_at: datetime | None, deliver_in: float | None) -> datetime | None:
        """When a scheduled delivery falls due (None: not scheduled)."""
        if deliver_at is not None and deliver_in is not None:
            raise ValueError("give deliver_at or deliver_in, not both")
        if deliver_at is not None:
            if not isinstance(deliver_at, datetime):
                raise TypeError(f"deliver_at must be a datetime, got {deliver_at!r}")
            if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
                raise ValueError(f"deliver_at must be timezone-aware, got {deliver_at!r}")
            return deliver_at.astimezone(UTC)
        if deliver_in is not None:
            if (
                isinstance(deliver_in, bool)
                or not isinstance(deliver_in, int | float)
                or not 0 <= deliver_in < float("inf")
            ):
                raise ValueError(f"deliver_in must be a number of seconds >= 0, got {deliver_in!r}")
            return self._core.clock.now() + timedelta(seconds=deliver_in)
        return None

    # monitoring ------------------------------------------------------------

    async def stats(self) -> Stats:
        """Queue sizes, retry success rate and average attempts (the seed's monitoring),
        how many retries fall due within a minute and an hour, and the retry queue
        by kind (retries, pending and scheduled deliveries), and the deliveries
        this process skipped because the inbox says they succeeded before."""
        store = self._core.store
        counters = await store.counters()
        now = self._core.clock.now()
        return Stats.from_counts(
            kinds=await store.count_retry_kinds(now),
            retry_queue_size=await store.retry_count(),
            dead_letter_queue_size=await store.count_dead(DeadLetterFilter()),
            unprocessed_dead_letters=await store.count_dead(DeadLetterFilter(processed=False)),
            counters=counters,
            due_within_minute=await store.count_due(now + timedelta(minutes=1)),
            due_within_hour=await store.count_due(now + timedelta(hours=1)),
            inbox_skipped=self._core.inbox_skips,
        )
