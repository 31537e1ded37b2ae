"""What a transport is: a broker that carries each event's first delivery
between services, beside the store (which keeps retries, delays and dead
letters). A ``Transport`` sends events and declares, per service, what holds
the messages that service reads (a consumer group, a queue, a durable
consumer); a ``Receiver`` is one consumer process's view of one service's
messages: it receives them, keeps them while handlers run (``extend``), and
acks them once their outcome is in the store.

A message delivered a second time (its consumer died or hung past the lease)
says so in ``Inbound.deliveries``; the consumer above decides what follows.
Every method raises ``TransportUnavailable`` for a broker that cannot be
reached (the next call reconnects) and ``TransportUnusable`` for one that
answered but refuses what retrybus asks of it.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from .._event import Event

__all__ = [
    "Inbound",
    "Receiver",
    "ServiceTopology",
    "Transport",
    "TransportReport",
    "TransportSettings",
]


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """How a service's messages are held, from the bus and its worker."""

    #: seconds a received message stays with its consumer without an ``extend``
    #: (after that, a broker with leases delivers it again, to any consumer)
    lease: float = 30.0
    #: deliveries of one message the consumer acts on; brokers that cap
    #: deliveries themselves are set one above, as a backstop
    max_claims: int = 3
    #: messages one receiver holds at once (received and not yet acked)
    prefetch: int = 16


@dataclass(slots=True)
class Inbound:
    """One message as a receiver got it."""

    #: the event it carries (None: the body is not a CloudEvent retrybus can read)
    event: Event | None
    #: the message body as it arrived (kept in an unreadable message's dead letter)
    body: bytes
    #: why ``event`` is None
    problem: str | None
    #: which delivery of this message this is, 1 for the first
    deliveries: int
    #: the broker's name for the message ("like/1733232000000-0", "RETRYBUS#42")
    receipt: str
    #: the transport's own handle (an entry id, an aio-pika message, a nats Msg)
    token: Any = field(default=None, repr=False)


@dataclass(slots=True)
class ServiceTopology:
    """What holds one service's messages on the broker."""

    service: str
    #: the broker's objects for it: group, queue or consumer names, filters, bindings
    holders: list[str] = field(default_factory=list)
    #: messages waiting for it and held by its consumers (None: not known)
    lag: int | None = None
    #: messages received by a consumer and not yet acked (None: not known)
    in_flight: int | None = None
    #: consumers attached (None: not known)
    consumers: int | None = None
    #: what is wrong with it (a missing queue, another queue type)
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class TransportReport:
    """What ``Transport.check`` found on the broker."""

    url: str
    kind: str
    services: list[ServiceTopology] = field(default_factory=list)
    #: the rest of the topology (streams, exchanges, messages kept), by name
    extra: dict[str, Any] = field(default_factory=dict)
    #: what an operator should know (a Redis without persistence)
    warnings: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No service has a problem."""
        return not any(service.problems for service in self.services)


class Receiver(abc.ABC):
    """One consumer's hold on one service's messages (not shared between tasks
    that receive at once: one consumer loop receives, any task may ack)."""

    @abc.abstractmethod
    async def receive(self, limit: int, wait: float) -> list[Inbound]:
        """Up to ``limit`` messages: those the broker redelivers to this consumer
        and new ones, waiting at most ``wait`` seconds for the first."""

    @abc.abstractmethod
    async def ack(self, messages: Sequence[Inbound]) -> None:
        """The service is done with ``messages``: the broker forgets them for it."""

    @abc.abstractmethod
    async def extend(self, messages: Sequence[Inbound]) -> None:
        """Start the lease of ``messages`` again (a handler still runs).
        Nothing happens on a broker without leases."""

    async def given_up(self, limit: int) -> list[Inbound]:
        """Messages the broker stopped delivering by its own cap (its dead-letter
        queue, its max-deliveries advisories), to be dead-lettered and then acked
        with ``ack``. A broker without a cap gives none."""
        return []

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving; messages received and not acked are delivered again."""


class Transport(abc.ABC):
    """A broker that carries first deliveries (``open_transport(url)`` makes one)."""

    #: "memory", "redis", "rabbitmq" or "nats"
    kind: ClassVar[str]
    #: whether what it holds survives this process (memory: no)
    persistent: ClassVar[bool] = True

    def __init__(self, url: str) -> None:
        #: the URL it was opened with, any password replaced by ``***``
        self.url = url

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect (a transport also connects on first use)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection, receivers included."""

    @abc.abstractmethod
    async def health(self) -> None:
        """Return if the broker answers, else raise ``TransportUnavailable``."""

    @abc.abstractmethod
    async def send(self, events: Sequence[Event]) -> list[str | None]:
        """Send ``events`` and return once the broker has confirmed each (its
        receipt; None where no service subscribes, so nothing was kept)."""

    @abc.abstractmethod
    async def declare(
        self, service: str, patterns: Collection[str], settings: TransportSettings
    ) -> None:
        """Make (or bring up to date) what holds ``service``'s messages: every
        event sent from now on whose type one of ``patterns`` matches reaches it.
        A broker may hold a superset (coarse filters); the consumer matches exactly."""

    @abc.abstractmethod
    async def forget(self, service: str) -> None:
        """Remove what holds ``service``'s messages, with any still waiting."""

    @abc.abstractmethod
    async def receiver(self, service: str, consumer: str, settings: TransportSettings) -> Receiver:
        """A receiver of ``service``'s messages for the consumer named ``consumer``
        (declared already)."""

    @abc.abstractmethod
    async def lag(self, service: str) -> int | None:
        """Messages waiting for ``service`` or held by its consumers (None: the
        broker does not say)."""

    @abc.abstractmethod
    async def check(self, services: Collection[str] = ()) -> TransportReport:
        """The topology found on the broker, for the services it knows and ``services``."""
