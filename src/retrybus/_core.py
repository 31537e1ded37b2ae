"""What a bus, its two queues and its workers share: the store, the clock, the
handlers and their policies, the retention settings, the observers and the
ledger. ``EventBus`` builds one and hands it to the parts it is made of, which
reach the bus's state only through it."""

from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING

from ._breakers import Breakers
from ._budget import RetryBudgets
from ._clock import Clock
from ._event import Event
from ._handlers import HandlerRegistry, Subscription
from ._inbox.remembered import RememberedSuccesses
from ._leases import PublishLeases
from ._ledger import Ledger
from ._observe import Metrics, Tracing
from ._observers import Observer, Observers
from ._policy import RetryPolicy
from ._reporting import LogObserver, MetricsObserver, TracingObserver
from ._routes import Routes
from ._services import DEFAULT_SERVICE
from ._stores.base import Store

if TYPE_CHECKING:
    from ._transports.base import Transport

__all__ = ["BusCore"]


class BusCore:
    """The state one bus's parts share; see ``EventBus`` for what each setting means."""

    def __init__(
        self,
        store: Store,
        *,
        service: str = DEFAULT_SERVICE,
        default_policy: RetryPolicy,
        clock: Clock,
        retry_retention: float | None,
        dead_letter_retention: float | None,
        store_timeout: float,
        durable: bool | None = None,
        publish_lease: float = 60.0,
        max_claims: int = 3,
        route_refresh: float = 5.0,
        inbox: bool = False,
        inbox_retention: float | None = 7 * 24 * 3600.0,
    ) -> None:
        self.store = store
        #: the service this bus's handlers belong to, which its records carry
        self.service = service
        #: None: durable when the store is persistent
        self.durable = durable
        self.publish_lease = publish_lease
        self.max_claims = max_claims
        #: the lease owner of this process's durable publishes
        self.publish_owner = f"publish:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.default_policy = default_policy
        self.clock = clock
        self.retry_retention = retry_retention
        self.dead_letter_retention = dead_letter_retention
        self.store_timeout = store_timeout
        #: whether the store remembers every handler's successes (``EventBus(inbox=)``)
        self.inbox = inbox
        #: seconds successes and inbox claims are remembered (None: forever)
        self.inbox_retention = inbox_retention
        #: deliveries skipped by this process because their handler succeeded before
        self.inbox_skips = 0
        #: the store's remembered successes, as this bus uses them
        self.remembered = RememberedSuccesses(self)
        self.registry = HandlerRegistry()
        #: the event types this bus knows (``EventBus.event_type``)
        self.types = self.registry.types
        #: the broker that carries first deliveries (None: the store carries them)
        self.transport: Transport | None = None
        #: handlers of retrybus's own records, claimed as the registry's are (by name)
        self.builtins: dict[str, Subscription] = {}
        self.metrics: Metrics | None = None
        self.tracing: Tracing | None = None
        self.observers = Observers([LogObserver()])
        self.ledger = Ledger(self)
        #: other services' handlers that events reach (their stored subscriptions)
        self.routes = Routes(self, route_refresh)
        #: the circuit breakers in front of handlers (``bus.breakers``)
        self.breakers = Breakers(self)
        #: the retry budgets of this process's workers (None: no worker has one)
        self.retry_budgets: RetryBudgets | None = None
        self.leases = PublishLeases(
            lambda: self.store,
            lambda: self.clock.now(),
            self.publish_owner,
            lambda: self.publish_lease,
        )

    @property
    def publishes_durably(self) -> bool:
        """Whether ``publish`` records deliveries before running them by default."""
        return self.store.persistent if self.durable is None else self.durable

    def instrument(self, metrics: Metrics | None, tracing: Tracing | None) -> None:
        """Observe with ``metrics`` and ``tracing`` (each replaces the one set before;
        None leaves it as it is)."""
        if metrics is not None:
            self.metrics = metrics
        if tracing is not None:
            self.tracing = tracing
        observers: list[Observer] = []
        if self.metrics is not None:
            observers.append(MetricsObserver(self.metrics, self.service))
        if self.tracing is not None:
            observers.append(TracingObserver(self.tracing))
        observers.append(LogObserver())
        self.observers = Observers(observers)

    def inbox_skipped(self, handler: str, event: Event) -> None:
        """A delivery of ``event`` to ``handler`` was not run: the inbox says it
        succeeded before. Counted (``Stats.inbox_skipped``) and announced."""
        self.inbox_skips += 1
        self.observers.inbox_skipped(self.service, handler, event)

    def subscription(self, name: str) -> Subscription | None:
        """The handler subscribed as ``name``, or retrybus's own of that name (None:
        there is none)."""
        subscription = self.registry.get(name)
        if subscription is None and self.builtins:
            return self.builtins.get(name)
        return subscription

    def claimable_handlers(self) -> list[str]:
        """The handler names whose records this bus's workers claim: the
        subscribed handlers' and retrybus's own, but for those whose circuit
        breaker holds their deliveries back."""
        names = self.registry.names()
        if self.breakers.active:
            names = self.breakers.claimable(names)
        return [*names, *self.builtins] if self.builtins else names

    def policy_for(self, handler_name: str) -> RetryPolicy:
        """The policy that governs ``handler_name`` (the bus default if it has none)."""
        subscription = self.subscription(handler_name)
        if subscription is not None and subscription.policy is not None:
            return subscription.policy
        return self.default_policy
