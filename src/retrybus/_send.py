"""Publishing through a transport: the broker carries each event's first
delivery, and ``publish`` returns once the broker has confirmed it (the XADD
reply, the publisher confirm, the JetStream PubAck). No handler runs in the
publishing process; the consumers of each subscribed service run theirs.

Concurrent publishes share one ``Transport.send`` (one pipeline, one round of
confirms). A broker that cannot be reached is tried again for up to the bus's
``transport_timeout``, then ``TransportUnavailable`` is raised.

A scheduled publish (``deliver_at``/``deliver_in``) is one store record of
retrybus's own handler ``retrybus:send``, due then: a worker of the publishing
service sends the event when it falls due (retried through a broker outage
under ``SEND_POLICY``), and every service subscribed at that moment gets it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from ._errors import TransportUnavailable
from ._event import Event
from ._handlers import Subscription
from ._observers import Publication
from ._policy import ExponentialBackoff
from ._publish import PublishResult
from ._records import RetryItem

if TYPE_CHECKING:
    from ._core import BusCore
    from ._transports.base import Transport

__all__ = ["SEND_HANDLER", "SEND_POLICY", "TransportPublisher"]

#: the handler name of scheduled sends (reserved: no handler may take it)
SEND_HANDLER = "retrybus:send"
#: how a scheduled send is retried while the broker cannot be reached
SEND_POLICY = ExponentialBackoff(max_retries=50, initial_delay=1.0, max_delay=60.0)
#: events one ``Transport.send`` carries at most
_MOST_PER_SEND = 500


class TransportPublisher:
    """Runs publishes for a bus with a transport (``EventBus.publish`` hands each to it)."""

    def __init__(self, core: BusCore, transport: Transport, timeout: float) -> None:
        self._core = core
        self._transport = transport
        self._timeout = timeout
        self._waiting: list[tuple[Event, asyncio.Future[str | None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.send_subscription = Subscription(
            name=SEND_HANDLER,
            patterns=(),
            handler=self._send_scheduled,
            policy=SEND_POLICY,
            is_async=True,
        )

    async def publish(
        self,
        event: Event,
        *,
        durable: bool,
        due: datetime | None,
        defer: bool,
    ) -> PublishResult:
        """Send ``event`` to the broker (``due``: record it to be sent then)."""
        core = self._core
        pending = tuple(s.name for s in core.registry.match(event.type))
        if due is not None:
            await self._schedule(event, due)
            return PublishResult(event, pending=pending)
        observers = core.observers
        if not observers.watch_calls and not observers.watching_publish_ends:
            receipt = await self.send(event)
            return PublishResult(event, pending=pending, receipt=receipt)
        publication = Publication(event)
        observers.publish_started(publication)  # tracing gives it its traceparent
        try:
            receipt = await self.send(publication.event)
        except BaseException as exc:
            observers.publish_ended(publication, exc)
            raise
        observers.publish_ended(publication, None)
        return PublishResult(publication.event, pending=pending, receipt=receipt)

    async def send(self, event: Event) -> str | None:
        """Send ``event`` with whatever else is being published now; its receipt."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()
        self._waiting.append((event, future))
        if self._sender is None:
            # starts on the loop's next turn: publishes made now join it
            self._sender = loop.create_task(self._send_waiting())
        return await future

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                group = self._waiting[:_MOST_PER_SEND]
                del self._waiting[:_MOST_PER_SEND]
                await self._send_group(group)
        finally:
            self._sender = None
            if self._waiting:  # cancelled (the loop is closing): nobody will send these
                for _, future in self._waiting:
                    if not future.done():
                        future.set_exception(asyncio.CancelledError())
                self._waiting = []

    async def _send_group(self, group: list[tuple[Event, asyncio.Future[str | None]]]) -> None:
        events = [event for event, _ in group]
        what = f"event {events[0].id} ({events[0].type})" + (
            f" and {len(events) - 1} more" if len(events) > 1 else ""
        )
        try:
            receipts = await self._core.ledger.through_outage(
                lambda: self._transport.send(events),
                what,
                unavailable=TransportUnavailable,
                give_up_after=self._timeout,
            )
        except ValueError as exc:  # one event the broker cannot carry: find whose
            if len(group) > 1:
                for entry in group:
                    await self._send_group([entry])
                return
            _fail(group, exc)
            return
        except BaseException as exc:
            _fail(group, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), receipt in zip(group, receipts, strict=True):
            if not future.done():
                future.set_result(receipt)

    async def _schedule(self, event: Event, due: datetime) -> None:
        core = self._core
        record = RetryItem.pending(
            event,
            SEND_HANDLER,
            max_retries=SEND_POLICY.max_retries,
            due=due,
            now=core.clock.now(),
            service=core.service,
        )
        await core.ledger.record_pending([record], f"event {event.id} ({event.type})")

    async def _send_scheduled(self, event: Event) -> None:
        """The handler of ``retrybus:send`` records: send the event now."""
        await self.send(event)

    async def flush(self) -> None:
        """Wait until what is being sent has been confirmed (or failed)."""
        sender = self._sender
        if sender is not None:
            await asyncio.gather(sender, return_exceptions=True)


def _fail(group: Sequence[tuple[Event, asyncio.Future[str | None]]], error: BaseException) -> None:
    for _, future in group:
        if not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: a caller that left logs nothing
