"""``memory://``: a broker inside this process, for tests of an app's services
(as httpx's ``MockTransport`` is for its clients). One object is one broker:
two buses given the same ``MemoryTransport`` are two services on it. Nothing
outlives the process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from .._event import Event
from .._patterns import PatternIndex
from .base import Inbound, Receiver, ServiceTopology, Transport, TransportReport, TransportSettings
from .wire import decode, encode

__all__ = ["MemoryTransport"]


@dataclass(slots=True)
class _Held:
    message: Inbound
    holder: str
    deadline: float


@dataclass(slots=True)
class _Queue:
    """One service's messages: waiting, and held by a consumer until acked."""

    patterns: tuple[str, ...]
    waiting: deque[tuple[str, bytes]] = field(default_factory=deque)
    held: dict[str, _Held] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def depth(self) -> int:
        return len(self.waiting) + len(self.held)


class MemoryTransport(Transport):
    """An in-process broker: per service, a queue of waiting messages and the
    messages its consumers hold (given to another consumer once their lease
    runs out, as a broker with leases does). ``join()`` waits until every
    message sent has been acked."""

    kind = "memory"
    persistent = False

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self._queues: dict[str, _Queue] = {}
        self._index: PatternIndex[str] = PatternIndex()
        self._sequence = itertools.count(1)
        self._receivers: set[_MemoryReceiver] = set()

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Close every receiver (what they hold is delivered again)."""
        for receiver in list(self._receivers):
            await receiver.close()

    async def health(self) -> None:
        """Always answers."""

    async def send(self, events: Sequence[Event]) -> list[str | None]:
        """Put each event in the queue of every service whose patterns match its type."""
        return [await self.send_body(event.type, encode(event)) for event in events]

    async def send_body(self, event_type: str, body: bytes) -> str | None:
        """Put ``body`` as it is (any bytes: tests send broken ones) in the queue of
        every service whose patterns match ``event_type``; its receipt, or None
        when no service subscribes."""
        services = self._index.match(event_type)
        if not services:
            return None
        receipt = f"memory#{next(self._sequence)}"
        for service in services:
            queue = self._queues[service]
            queue.waiting.append((receipt, body))
            queue.changed.set()
        return receipt

    async def declare(
        self, service: str, patterns: Collection[str], settings: TransportSettings
    ) -> None:
        """Route the types ``patterns`` match to ``service``'s queue (made if new)."""
        queue = self._queues.get(service)
        if queue is None:
            queue = self._queues[service] = _Queue(tuple(patterns))
        queue.patterns = tuple(patterns)
        self._index.remove(service)
        self._index.add(service, queue.patterns, service)

    async def forget(self, service: str) -> None:
        """Drop ``service``'s queue and whatever waits in it."""
        self._index.remove(service)
        queue = self._queues.pop(service, None)
        if queue is not None:
            queue.changed.set()

    async def receiver(self, service: str, consumer: str, settings: TransportSettings) -> Receiver:
        """A receiver of ``service``'s queue (declared already)."""
        if service not in self._queues:
            raise LookupError(f"service {service!r} is not declared on {self.url}")
        receiver = _MemoryReceiver(self, service, consumer, settings)
        self._receivers.add(receiver)
        return receiver

    async def lag(self, service: str) -> int | None:
        """Messages waiting for ``service`` plus those its consumers hold."""
        queue = self._queues.get(service)
        return None if queue is None else queue.depth()

    async def check(self, services: Collection[str] = ()) -> TransportReport:
        """Each declared service's queue and depth; ``services`` not declared are problems."""
        report = TransportReport(self.url, self.kind)
        for name in sorted({*self._queues, *services}):
            queue = self._queues.get(name)
            if queue is None:
                report.services.append(ServiceTopology(name, problems=["not declared"]))
                continue
            report.services.append(
                ServiceTopology(
                    name,
                    holders=[f"queue {name} ({', '.join(queue.patterns)})"],
                    lag=queue.depth(),
                    in_flight=len(queue.held),
                    consumers=sum(1 for r in self._receivers if r.service == name),
                )
            )
        return report

    async def join(self) -> None:
        """Wait until every message sent so far has been acked by its services."""
        # polled: each queue's event wakes its receivers, which clear it
        while any(queue.depth() for queue in self._queues.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    def _queue(self, service: str) -> _Queue | None:
        return self._queues.get(service)

    def _closed(self, receiver: _MemoryReceiver) -> None:
        self._receivers.discard(receiver)


class _MemoryReceiver(Receiver):
    def __init__(
        self, transport: MemoryTransport, service: str, consumer: str, settings: TransportSettings
    ) -> None:
        self._transport = transport
        self.service = service
        self._consumer = consumer
        self._lease = settings.lease

    async def receive(self, limit: int, wait: float) -> list[Inbound]:
        deadline = time.monotonic() + wait
        while True:
            queue = self._transport._queue(self.service)
            if queue is None:
                raise LookupError(f"service {self.service!r} was forgotten")
            queue.changed.clear()
            messages = self._take(queue, limit)
            remaining = deadline - time.monotonic()
            if messages or remaining <= 0:
                return messages
            expiry = min((h.deadline for h in queue.held.values()), default=None)
            if expiry is not None:
                remaining = min(remaining, max(expiry - time.monotonic(), 0.001))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.changed.wait(), remaining)

    def _take(self, queue: _Queue, limit: int) -> list[Inbound]:
        now = time.monotonic()
        messages: list[Inbound] = []
        for held in list(queue.held.values()):
            if len(messages) >= limit:
                return messages
            if held.deadline <= now:
                message = held.message
                message.deliveries += 1
                held.holder = self._consumer
                held.deadline = now + self._lease
                messages.append(_copy(message))
        while queue.waiting and len(messages) < limit:
            receipt, body = queue.waiting.popleft()
            try:
                event, problem = decode(body), None
            except ValueError as exc:
                event, problem = None, str(exc)
            message = Inbound(event, body, problem, 1, receipt, token=receipt)
            queue.held[receipt] = _Held(message, self._consumer, now + self._lease)
            messages.append(_copy(message))
        return messages

    async def ack(self, messages: Sequence[Inbound]) -> None:
        queue = self._transport._queue(self.service)
        if queue is None:
            return
        for message in messages:
            held = queue.held.get(message.receipt)
            # a message another consumer took over after the lease is theirs now
            if held is not None and held.message.deliveries == message.deliveries:
                del queue.held[message.receipt]
        queue.changed.set()

    async def extend(self, messages: Sequence[Inbound]) -> None:
        queue = self._transport._queue(self.service)
        if queue is None:
            return
        deadline = time.monotonic() + self._lease
        for message in messages:
            held = queue.held.get(message.receipt)
            if held is not None and held.message.deliveries == message.deliveries:
                held.deadline = deadline

    async def close(self) -> None:
        queue = self._transport._queue(self.service)
        if queue is not None:
            for held in queue.held.values():
                if held.holder == self._consumer:
                    held.deadline = 0.0
            queue.changed.set()
        self._transport._closed(self)


def _copy(message: Inbound) -> Inbound:
    """A receiver's own view of a held message (its ``deliveries`` fixed)."""
    return Inbound(
        message.event,
        message.body,
        message.problem,
        message.deliveries,
        message.receipt,
        message.token,
    )
