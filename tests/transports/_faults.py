"""Fault-injecting wrappers around a real transport, for the consumer-level suite."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from retrybus import Event
from retrybus._transports.base import (
    Inbound,
    Receiver,
    Transport,
    TransportReport,
    TransportSettings,
)


class LosesAcks(Transport):
    """``transport``, except that the first ``times`` acks of its receivers are
    lost on the way (they return and ack nothing): what a crash between the
    store write and the ack leaves, in this process."""

    def __init__(self, transport: Transport, times: int = 1) -> None:
        super().__init__(transport.url)
        self.inner = transport
        self.failures_left = times
        #: the messages whose ack was lost
        self.lost: list[Inbound] = []
        self.kind = transport.kind  # type: ignore[misc]  # an instance, not a class, attribute

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def health(self) -> None:
        await self.inner.health()

    async def send(self, events: Sequence[Event]) -> list[str | None]:
        return await self.inner.send(events)

    async def declare(
        self, service: str, patterns: Collection[str], settings: TransportSettings
    ) -> None:
        await self.inner.declare(service, patterns, settings)

    async def forget(self, service: str) -> None:
        await self.inner.forget(service)

    async def receiver(self, service: str, consumer: str, settings: TransportSettings) -> Receiver:
        return _LosingAcks(self, await self.inner.receiver(service, consumer, settings))

    async def lag(self, service: str) -> int | None:
        return await self.inner.lag(service)

    async def check(self, services: Collection[str] = ()) -> TransportReport:
        return await self.inner.check(services)


class _LosingAcks(Receiver):
    def __init__(self, owner: LosesAcks, inner: Receiver) -> None:
        self._owner = owner
        self._inner = inner

    async def receive(self, limit: int, wait: float) -> list[Inbound]:
        return await self._inner.receive(limit, wait)

    async def ack(self, messages: Sequence[Inbound]) -> None:
        if self._owner.failures_left > 0:
            self._owner.failures_left -= 1
            self._owner.lost.extend(messages)
            return
        await self._inner.ack(messages)

    async def extend(self, messages: Sequence[Inbound]) -> None:
        await self._inner.extend(messages)

    async def given_up(self, limit: int) -> list[Inbound]:
        return await self._inner.given_up(limit)

    async def close(self) -> None:
        await self._inner.close()
