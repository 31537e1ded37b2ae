"""Consuming a service's first deliveries from a transport, inside a
``RetryWorker``: its own lanes (``prefetch`` of them) run the matching handlers
of each message received, and the message is acked only once every handler has
succeeded or had its failure written to the store. A failure never goes back to
the broker: it becomes a retry record with the delivery's own id, which the
worker's claim loop retries as any other.

A message the broker delivers a second time (its consumer died or hung past the
lease) is not run here: it becomes a pending store record per matching handler,
counting the deliveries made without an outcome as claims, so that the worker's
``max_claims`` and run-alone rules apply exactly as to the store's own
deliveries: a message that keeps killing its consumer ends in the dead letter
queue as ``undeliverable``. Writing that record before the ack makes a crash in
between harmless: the next delivery finds the record there and adds nothing.

A handler whose circuit breaker holds deliveries back (open or isolated) is not
called either: its delivery becomes the same pending record, due when the
breaker half-opens and without a claim, written before the ack; the message's
other handlers run as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._delivery import (
    Attempted,
    Calls,
    call_all_observed,
    call_all_plain,
    failure_outcome,
    first_record,
    observed_calls,
)
from ._errors import StoreUnavailable, TransportUnavailable
from ._event import Event
from ._held_back import pending_record, split_held_back
from ._observe import trace_metadata
from ._records import DeadLetterItem, dead_letter_id_for, delivery_id
from ._transports.base import Inbound, Receiver, TransportSettings

if TYPE_CHECKING:
    from ._core import BusCore
    from ._handlers import Subscription
    from ._transports.base import Transport

__all__ = ["TransportConsumer"]

logger = logging.getLogger("retrybus.worker")

T = TypeVar("T")

#: seconds one receive waits for a message (a stop waits for it to return)
_RECEIVE_WAIT = 0.25
#: longest pause between tries while the broker or the store is down
_LONGEST_PAUSE = 30.0
#: acks sent in one call at most, and how long a lone ack waits for company
_ACK_BATCH = 100
_ACK_GATHER = 0.002
#: seconds between two looks at what the broker gave up on
_GIVEN_UP_INTERVAL = 5.0
#: the first bytes of an unreadable message kept in its dead letter
_RAW_KEPT = 64 * 1024


class TransportConsumer:
    """One worker's consumer of its service's messages on the bus's transport."""

    def __init__(
        self,
        core: BusCore,
        transport: Transport,
        *,
        name: str,
        prefetch: int,
        lease: float,
        handler_timeout: float | None,
        suspect: Callable[[], asyncio.Event | None],
    ) -> None:
        self._core = core
        self._transport = transport
        self._name = name
        self._prefetch = prefetch
        self._handler_timeout = handler_timeout
        self._suspect = suspect
        self._settings = TransportSettings(
            lease=lease, max_claims=core.max_claims, prefetch=prefetch
        )
        self._receiver: Receiver | None = None
        self._stopping = False
        self._held: set[int] = set()  # ids of the messages whose outcome is not yet written
        self._messages: dict[int, Inbound] = {}
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks: list[tuple[Inbound, float]] = []
        self._acking = asyncio.Lock()
        self._ack_wanted = asyncio.Event()
        self._broker_down_since: float | None = None
        self._store_down_since: float | None = None
        #: messages acked that no handler of the service matches
        self.unmatched = 0
        #: messages that came a second time or more, handed to the store
        self.redelivered = 0
        #: deliveries to a handler whose breaker held them back, handed to the store
        self.held_back = 0

    @property
    def quiet(self) -> bool:
        """No message is being handled (its outcome not yet written)."""
        return not self._held

    def stop_receiving(self) -> None:
        """Receive nothing more; what was received is finished by ``run``."""
        self._stopping = True
        self._room.set()

    async def run(self) -> None:
        """Declare the service, receive and handle messages until
        ``stop_receiving``, then finish what was received, ack it and close."""
        acker = asyncio.create_task(self._ack_continuously(), name=f"retrybus-acks-{self._name}")
        heartbeat = asyncio.create_task(self._extend_continuously())
        drainer: asyncio.Task[None] | None = None
        try:
            if await self._open():
                drainer = asyncio.create_task(self._drain_given_up())
                await self._receive_continuously()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._flush_acks()
        finally:
            background = [acker, heartbeat, *([drainer] if drainer else []), *self._tasks]
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            receiver, self._receiver = self._receiver, None
            if receiver is not None:
                with contextlib.suppress(Exception):
                    await receiver.close()

    # receiving ---------------------------------------------------------------

    async def _open(self) -> bool:
        """Declare what holds the service's messages and open a receiver,
        through outages of the broker and the store; False: stopped first."""
        pause = 0.5
        while not self._stopping:
            try:
                patterns = await self._patterns()
                await self._transport.declare(self._core.service, patterns, self._settings)
                self._receiver = await self._transport.receiver(
                    self._core.service, self._name, self._settings
                )
            except TransportUnavailable as exc:
                self._broker_failed(exc, pause)
            except StoreUnavailable as exc:
                self._store_failed(exc, pause)
            except Exception:  # a broker that refuses (TransportUnusable): loudly, and on
                logger.exception(
                    "worker %s: cannot consume from %s; trying again in %.1fs",
                    self._name,
                    self._transport.url,
                    pause,
                )
            else:
                self._broker_answered()
                self._store_answered()
                logger.info(
                    "worker %s of service %s consuming from %s (%s)",
                    self._name,
                    self._core.service,
                    self._transport.url,
                    ", ".join(sorted(patterns)) or "no patterns",
                )
                return True
            await self._pause(pause)
            pause = min(pause * 2, _LONGEST_PAUSE)
        return False

    async def _patterns(self) -> set[str]:
        """The type patterns of the service's live handlers: those stored by any of
        its processes, and this one's."""
        core = self._core
        patterns = {p for s in core.registry.subscriptions() for p in s.patterns}
        for stored in await core.store.list_subscriptions(core.service):
            patterns.update(stored.patterns)
        return patterns

    async def _receive_continuously(self) -> None:
        receiver = self._receiver
        assert receiver is not None
        pause = 0.5
        while not self._stopping:
            suspect = self._suspect()
            if suspect is not None:  # a suspect runs alone: nothing new meanwhile
                await suspect.wait()
                continue
            room = self._prefetch - len(self._held)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                messages = await receiver.receive(room, _RECEIVE_WAIT)
            except TransportUnavailable as exc:
                self._broker_failed(exc, pause)
                await self._pause(pause)
                pause = min(pause * 2, _LONGEST_PAUSE)
                continue
            except Exception:
                # never a consumer silently stopped: say why, and go on trying
                logger.exception(
                    "worker %s: receiving from %s failed; trying again in %.1fs",
                    self._name,
                    self._transport.url,
                    pause,
                )
                await self._pause(pause)
                pause = min(pause * 2, _LONGEST_PAUSE)
                continue
            pause = 0.5
            self._broker_answered()
            for message in messages:
                self._start(message)

    async def _drain_given_up(self) -> None:
        """Every few seconds, hand the store what the broker stopped delivering by
        its own cap (RabbitMQ's dead-letter queue, NATS's max-deliveries
        advisories): a record past ``max_claims``, which the worker's next claim
        dead-letters as undeliverable."""
        receiver = self._receiver
        assert receiver is not None
        while not self._stopping:
            await asyncio.sleep(_GIVEN_UP_INTERVAL)
            try:
                messages = await receiver.given_up(_ACK_BATCH)
            except TransportUnavailable:
                continue  # the receive loop says so
            for message in messages:
                message.deliveries = max(message.deliveries, self._core.max_claims + 1)
                self._start(message)

    def _start(self, message: Inbound) -> None:
        key = id(message)
        self._held.add(key)
        self._messages[key] = message
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), seconds)
        if not self._stopping:
            self._room.clear()

    # handling ----------------------------------------------------------------

    async def _handle(self, message: Inbound) -> None:
        key = id(message)
        try:
            event = message.event
            if event is None:
                await self._stored(lambda: self._unreadable(message))
            else:
                subscriptions = self._core.registry.match(event.type)
                if not subscriptions:
                    self.unmatched += 1
                elif message.deliveries > 1:
                    self.redelivered += 1
                    await self._stored(lambda: self._to_store(event, message.deliveries))
                else:
                    await self._run(event, subscriptions)
        except Exception:
            # not acked: the broker delivers it again, and the store takes it then
            logger.exception(
                "worker %s: unexpected error handling message %s", self._name, message.receipt
            )
            return
        finally:
            self._held.discard(key)
            self._messages.pop(key, None)
            self._room.set()
        self._acks.append((message, time.monotonic()))
        self._ack_wanted.set()

    async def _run(self, event: Event, subscriptions: Any) -> None:
        """Call the matching handlers; write the failures' records."""
        core = self._core
        observers = core.observers
        publisher = event.extensions.get("traceparent")
        remembering = core.remembered.in_use
        if remembering:
            # the inbox: one look per message; a handler that handled it is not run
            handled = await self._stored(
                lambda: core.remembered.handled_handlers(event, subscriptions, core.clock.now())
            )
            if handled:
                subscriptions = tuple(s for s in subscriptions if s.name not in handled)
                if not subscriptions:
                    return
        if core.breakers.active or core.registry.rated:
            subscriptions = await self._hold_back(event, subscriptions, publisher)
            if not subscriptions:
                return
        if not observers.watch_calls:
            errors = await call_all_plain(subscriptions, event, self._handler_timeout)
            calls = Calls(errors, None)
        else:
            calls = observed_calls(subscriptions, event, "deliver", trace_metadata(publisher, None))
            await call_all_observed(calls, subscriptions, event, observers, self._handler_timeout)
        budgets = core.retry_budgets
        if budgets is not None:  # first deliveries that succeeded here
            for subscription, error in zip(subscriptions, calls.errors, strict=True):
                if error is None:
                    budgets.first_delivery(subscription.name)
        if remembering:
            # before the ack: a broker's redelivery finds them
            succeeded = [
                s for s, error in zip(subscriptions, calls.errors, strict=True) if error is None
            ]
            if succeeded:
                await self._stored(
                    lambda: core.remembered.remember_handlers(event, succeeded, core.clock.now())
                )
        if not any(calls.errors):
            return
        now = core.clock.now()
        attempted: list[Attempted] = []
        for index, (subscription, error) in enumerate(
            zip(subscriptions, calls.errors, strict=True)
        ):
            if error is None:
                continue
            policy = subscription.policy or core.default_policy
            record = first_record(
                event,
                subscription.name,
                policy.max_retries,
                now,
                publisher,
                core.service,
                record_id=delivery_id(event.source, event.id, subscription.name, core.service),
            )
            delivery = None if calls.deliveries is None else calls.deliveries[index]
            traceparent = None if delivery is None else delivery.traceparent
            attempted.append(
                Attempted(failure_outcome(record, error, policy, now, traceparent), delivery)
            )
        context = f"event {event.id} ({event.type})"
        await self._stored(lambda: core.ledger.record_first_failures(attempted, context))

    async def _hold_back(
        self, event: Event, subscriptions: tuple[Subscription, ...], publisher: str | None
    ) -> tuple[Subscription, ...]:
        """The subscriptions to call; a pending record written for each of the
        others, whose breaker holds deliveries back or whose rate leaves them to
        the workers (uncalled, no attempt used)."""
        core = self._core
        if core.breakers.active:
            with contextlib.suppress(StoreUnavailable):  # the cached state serves meanwhile
                await core.breakers.refresh_if_due()  # one read every few seconds, not per message
        run, records = split_held_back(core, event, subscriptions, trace_metadata(publisher, None))
        if records:
            context = f"event {event.id} ({event.type})"
            await self._stored(lambda: core.ledger.record_pending(records, context))
            self.held_back += len(records)
        return run

    async def _to_store(self, event: Event, deliveries: int) -> None:
        """A redelivered message: a pending record per matching handler, its
        deliveries counted as claims (those already stored are left as they are)."""
        core = self._core
        now = core.clock.now()
        metadata = trace_metadata(event.extensions.get("traceparent"), None)
        records = [
            pending_record(
                core, event, subscription, due=now, metadata=metadata, claims=deliveries - 1
            )
            for subscription in core.registry.match(event.type)
        ]
        await core.ledger.record_pending(records, f"event {event.id} ({event.type})")

    async def _unreadable(self, message: Inbound) -> None:
        """A message that carries no readable event: a dead letter keeping its body."""
        core = self._core
        now = core.clock.now()
        record_id = delivery_id("", message.receipt, "*", core.service)
        raw = message.body[:_RAW_KEPT].decode("utf-8", "replace")
        dead = DeadLetterItem(
            id=dead_letter_id_for(record_id),
            event_id="",
            event_type="unknown",
            event_data=None,
            event_source="",
            event_timestamp=now,
            handler_name="*",
            error=message.problem or "unreadable",
            error_type="retrybus.UndecodableMessage",
            attempt=0,
            reason=f"undecodable message: {message.problem}",
            created_at=now,
            metadata={"raw_message": raw, "receipt": message.receipt},
            service=core.service,
        )
        await core.ledger.add_dead_letters([dead])

    async def _stored(self, write: Callable[[], Awaitable[T]]) -> T:
        """``write()``, tried again with backoff for as long as the store is down
        (the message is kept meanwhile: never handed back to the broker)."""
        pause = 0.5
        while True:
            try:
                result = await write()
            except StoreUnavailable as exc:
                self._store_failed(exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _LONGEST_PAUSE)
                continue
            self._store_answered()
            return result

    # acks and leases ---------------------------------------------------------

    async def _ack_continuously(self) -> None:
        while True:
            await self._ack_wanted.wait()
            if len(self._acks) < _ACK_BATCH:
                await asyncio.sleep(_ACK_GATHER)
            self._ack_wanted.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        async with self._acking:  # the acker and the stop never ack one message twice
            receiver = self._receiver
            pause = 0.05
            while self._acks and receiver is not None:
                batch = self._acks[:_ACK_BATCH]
                del self._acks[: len(batch)]
                try:
                    await receiver.ack([message for message, _ in batch])
                except TransportUnavailable as exc:
                    # past its lease the broker delivers it again, and the store takes it
                    expired = time.monotonic() - self._settings.lease
                    self._acks[:0] = [(m, at) for m, at in batch if at > expired]
                    if self._stopping or not self._acks:
                        logger.warning("worker %s: acks not sent: %s", self._name, exc)
                        self._acks.clear()
                        return
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)

    async def _extend_continuously(self) -> None:
        interval = self._settings.lease / 3
        while True:
            await asyncio.sleep(interval)
            receiver = self._receiver
            held = list(self._messages.values())
            if receiver is None or not held:
                continue
            try:
                await asyncio.wait_for(receiver.extend(held), interval)
            except (TransportUnavailable, TimeoutError) as exc:
                logger.warning(
                    "worker %s: could not extend the lease of %d message(s): %s",
                    self._name,
                    len(held),
                    exc or "timed out",
                )

    # outages -----------------------------------------------------------------

    def _broker_failed(self, exc: TransportUnavailable, retry_in: float) -> None:
        if self._broker_down_since is None:
            self._broker_down_since = time.monotonic()
            logger.warning(
                "worker %s: broker unavailable, reconnecting in %.1fs (and on, with backoff): %s",
                self._name,
                retry_in,
                exc,
            )
        else:
            logger.debug("worker %s: broker still unavailable: %s", self._name, exc)

    def _broker_answered(self) -> None:
        if self._broker_down_since is not None:
            lasted = time.monotonic() - self._broker_down_since
            self._broker_down_since = None
            logger.info(
                "worker %s: broker %s is back after %.1fs", self._name, self._transport.url, lasted
            )

    def _store_failed(self, exc: StoreUnavailable, retry_in: float) -> None:
        if self._store_down_since is None:
            self._store_down_since = time.monotonic()
            logger.warning(
                "worker %s: store unavailable while consuming, retrying in %.1fs: %s",
                self._name,
                retry_in,
                exc,
            )

    def _store_answered(self) -> None:
        if self._store_down_since is not None:
            lasted = time.monotonic() - self._store_down_since
            self._store_down_since = None
            logger.info("worker %s: store is back for the consumer after %.1fs", self._name, lasted)
