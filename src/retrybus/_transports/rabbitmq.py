"""``amqp://``: RabbitMQ (3.10+, quorum queues) through aio-pika.

Topology, ``X`` being the ``exchange`` option (default ``retrybus``):

- ``X``: a durable topic exchange; an event is published to it with its type as
  the routing key (persistent, publisher confirms, ``mandatory``: an event no
  queue is bound for comes back, and ``send`` says None for it);
- per service a quorum queue ``X.<service>`` bound to ``X`` with the service's
  coarse filters (``like.added`` exact, ``like.*`` as ``like.#``, ``*`` as ``#``),
  ``x-delivery-limit = max_claims`` (the broker's backstop), dead letters
  at least once to the direct exchange ``X.dlx`` with the service as key, into
  the quorum queue ``X.<service>.undeliverable`` that ``given_up`` reads;
- per service ``X.<service>.bindings``: a one-message queue holding the binding
  keys last declared, so a later declare (from any process) unbinds stale ones
  (AMQP cannot list bindings).

RabbitMQ has no lease: a live consumer keeps its messages (until the broker's
``consumer_timeout``); a closed channel or a lost connection requeues them, and
the queue's ``x-delivery-count`` header tells the next consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Collection, Sequence
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aiormq.exceptions as amqp_errors
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pamqp.common import FieldValue

from .._errors import TransportUnavailable, TransportUnusable
from .._event import Event
from .._patterns import is_glob
from .._stores._url import redact
from .base import Inbound, Receiver, ServiceTopology, Transport, TransportReport, TransportSettings
from .wire import CONTENT_TYPE, coarse_prefixes, decode, encode

__all__ = ["RabbitTransport"]

logger = logging.getLogger("retrybus")


class _ReportedHere(logging.Filter):
    """aiormq logs every failed connect at ERROR; the transport raises
    ``TransportUnavailable`` for it instead, and the consumer says so once per
    outage, not once per try."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_ReportedHere())

_OPTIONS = {"exchange", "timeout"}
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_MAX_KEY = 255  # bytes in a routing key, a binding key or a queue name
_BROKER_ERRORS = (
    amqp_errors.AMQPError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aiormq's ChannelInvalidStateError: a channel already closed
)
_REFUSALS = (
    amqp_errors.AuthenticationError,
    amqp_errors.ProbableAuthenticationError,
    amqp_errors.IncompatibleProtocolError,
    amqp_errors.ChannelAccessRefused,
    amqp_errors.ChannelPreconditionFailed,
)


class RabbitTransport(Transport):
    """RabbitMQ: a topic exchange, a quorum queue per service, a dead-letter
    queue per service for what the broker stopped delivering (see the module)."""

    kind = "rabbitmq"

    def __init__(self, url: str) -> None:
        super().__init__(redact(url))
        self._amqp_url, self.exchange, self._timeout = _parse(url, self.url)
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._publisher: AbstractChannel | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._declared: dict[str, tuple[tuple[str, ...], TransportSettings]] = {}
        self._warned: set[str] = set()
        self._mismatched: dict[str, str] = {}
        self._receivers: set[_RabbitReceiver] = set()
        self._lost_at: float | None = None

    # connection -----------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and declare the exchanges (again after a loss)."""
        await self._connected()

    async def _connected(self) -> AbstractConnection:
        connection = self._connection
        if connection is not None and not connection.is_closed and self._publishing():
            return connection
        async with self._lock:
            connection = self._connection
            if connection is not None and not connection.is_closed:
                if self._publishing():
                    return connection
                # the publisher channel alone was closed: start afresh
                connection.close_callbacks.discard(self._on_lost)
                with contextlib.suppress(*_BROKER_ERRORS):
                    await connection.close()
            try:
                return await asyncio.wait_for(self._open(), self._timeout)
            except _BROKER_ERRORS as exc:
                raise self._failure(exc, "connect") from exc

    async def _open(self) -> AbstractConnection:
        connection = await aio_pika.connect(
            self._amqp_url,
            timeout=self._timeout,
            client_properties={"connection_name": f"retrybus {self.exchange}"},
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._publisher = channel
            self._exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            await channel.declare_exchange(
                f"{self.exchange}.dlx", aio_pika.ExchangeType.DIRECT, durable=True
            )
            for service, (patterns, settings) in list(self._declared.items()):
                await self._declare(connection, service, patterns, settings)
        except BaseException:
            await connection.close()
            raise
        connection.close_callbacks.add(self._on_lost)
        self._connection = connection
        self._generation += 1
        if self._lost_at is not None:
            waited = asyncio.get_running_loop().time() - self._lost_at
            logger.debug("broker %s is back after %.1fs", self.url, waited)
            self._lost_at = None
        return connection

    def _publishing(self) -> bool:
        channel = self._publisher
        return channel is not None and not channel.is_closed

    def _on_lost(self, sender: object, exc: BaseException | None) -> None:
        # aio-pika's is_closed stays False after the broker closed it: drop it here
        if sender is self._connection:
            self._connection = None
        if self._lost_at is not None:
            return  # told already
        self._lost_at = asyncio.get_running_loop().time()
        # the consumer and the publisher say so, once per outage
        logger.debug("broker %s: connection lost (%s); reconnecting on next use", self.url, exc)

    def _failure(self, exc: BaseException, what: str) -> Exception:
        """The error a caller sees for ``exc`` met while doing ``what``."""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, _REFUSALS):
            return TransportUnusable(f"RabbitMQ at {self.url} refused to {what}: {reason}")
        if self._connection is not None and self._connection.is_closed:
            self._connection = None
        return TransportUnavailable(f"RabbitMQ at {self.url} is unavailable ({what}): {reason}")

    async def _channel(self) -> AbstractChannel:
        """A short-lived channel for topology work (a refusal closes only it)."""
        connection = await self._connected()
        try:
            return await connection.channel(publisher_confirms=False)
        except _BROKER_ERRORS as exc:
            raise self._failure(exc, "open a channel") from exc

    async def close(self) -> None:
        """Close every receiver (what they hold is requeued) and the connection."""
        for receiver in list(self._receivers):
            await receiver.close()
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            connection.close_callbacks.discard(self._on_lost)
            with contextlib.suppress(*_BROKER_ERRORS):
                await connection.close()

    async def health(self) -> None:
        """Return if the broker answers (a channel opened and closed)."""
        channel = await self._channel()
        try:
            await channel.close()
        except _BROKER_ERRORS as exc:
            raise self._failure(exc, "answer") from exc

    # publishing -------------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> list[str | None]:
        """Publish ``events`` at once on the confirm channel; None for an event
        no queue is bound for (the broker returned it)."""
        for event in events:
            if len(event.type.encode()) > _MAX_KEY:
                raise ValueError(
                    f"event type {event.type[:40]!r}… is longer than RabbitMQ's "
                    f"{_MAX_KEY}-byte routing key"
                )
        if not events:
            return []
        await self._connected()
        exchange = self._exchange
        assert exchange is not None
        if len(events) == 1:  # one publish alone: no task to gather
            event = events[0]
            return [await self._publish(exchange, event.type, encode(event), event.id)]
        results = await asyncio.gather(
            *(self._publish(exchange, event.type, encode(event), event.id) for event in events),
            return_exceptions=True,
        )
        receipts: list[str | None] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            receipts.append(result)
        return receipts

    async def _publish(
        self, exchange: AbstractExchange, routing_key: str, body: bytes, message_id: str
    ) -> str | None:
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            type=routing_key,
            content_type=CONTENT_TYPE,
        )
        try:
            await exchange.publish(message, routing_key, mandatory=True, timeout=self._timeout)
        except amqp_errors.PublishError:
            return None  # returned: no queue is bound for this type
        except amqp_errors.DeliveryError as exc:
            raise TransportUnavailable(
                f"RabbitMQ at {self.url} did not take event {message_id} ({exc}): "
                "a queue is full or a node is down"
            ) from exc
        except _BROKER_ERRORS as exc:
            raise self._failure(exc, "publish") from exc
        return f"{self.exchange}#{message_id}"

    # topology ---------------------------------------------------------------------

    async def declare(
        self, service: str, patterns: Collection[str], settings: TransportSettings
    ) -> None:
        """Make (or update) the service's queue, its bindings and its dead-letter
        queue; bindings no pattern needs any more are removed."""
        _check_service(service, self.exchange)
        binding_keys(patterns)  # a ValueError before anything changes
        self._declared[service] = (tuple(patterns), settings)
        connection = await self._connected()
        try:
            await self._declare(connection, service, tuple(patterns), settings)
        except _BROKER_ERRORS as exc:
            raise self._failure(exc, f"declare service {service!r}") from exc

    async def _declare(
        self,
        connection: AbstractConnection,
        service: str,
        patterns: tuple[str, ...],
        settings: TransportSettings,
    ) -> None:
        name = self._queue_name(service)
        arguments: dict[str, FieldValue] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.max_claims,
            "x-dead-letter-exchange": f"{self.exchange}.dlx",
            "x-dead-letter-routing-key": service,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        channel = await connection.channel(publisher_confirms=False)
        try:
            try:
                queue = await channel.declare_queue(name, durable=True, arguments=arguments)
            except amqp_errors.ChannelPreconditionFailed as exc:
                self._mismatch(name, exc)
                channel = await connection.channel(publisher_confirms=False)
                queue = await channel.declare_queue(name, passive=True)
            dead = await channel.declare_queue(
                f"{name}.undeliverable", durable=True, arguments={"x-queue-type": "quorum"}
            )
            await dead.bind(f"{self.exchange}.dlx", routing_key=service)
            await self._bind(channel, queue, binding_keys(patterns))
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _bind(self, channel: AbstractChannel, queue: AbstractQueue, keys: set[str]) -> None:
        """Bind ``keys``, unbind those the last declare bound and ``keys`` lacks."""
        state = await channel.declare_queue(
            f"{queue.name}.bindings",
            durable=True,
            arguments={"x-max-length": 1, "x-overflow": "drop-head"},
        )
        previous: set[str] = set()
        last = await state.get(no_ack=True, fail=False)
        if last is not None:
            previous = set(json.loads(last.body))
        for key in sorted(keys - previous) + sorted(keys & previous):
            await queue.bind(self.exchange, routing_key=key)
        for key in sorted(previous - keys):
            await queue.unbind(self.exchange, routing_key=key)
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(sorted(keys)).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            routing_key=state.name,
        )

    def _mismatch(self, name: str, exc: BaseException) -> None:
        """A queue declared before with other arguments: they cannot change in
        place, so it is used as it is, with one warning."""
        self._mismatched[name] = str(exc)
        if name not in self._warned:
            self._warned.add(name)
            logger.warning(
                "broker %s: queue %s exists with other arguments (%s); using it as it is "
                "(delete it to apply the new ones)",
                self.url,
                name,
                exc,
            )

    def _queue_name(self, service: str) -> str:
        return f"{self.exchange}.{service}"

    async def forget(self, service: str) -> None:
        """Delete the service's queues (with what waits in them)."""
        self._declared.pop(service, None)
        name = self._queue_name(service)
        channel = await self._channel()
        try:
            for queue in (name, f"{name}.undeliverable", f"{name}.bindings"):
                await channel.queue_delete(queue)
            await channel.close()
        except _BROKER_ERRORS as exc:
            raise self._failure(exc, f"forget service {service!r}") from exc

    async def receiver(self, service: str, consumer: str, settings: TransportSettings) -> Receiver:
        """A consumer of ``service``'s queue on a channel of its own."""
        receiver = _RabbitReceiver(self, service, consumer, settings)
        await receiver.start()
        self._receivers.add(receiver)
        return receiver

    async def _count(self, name: str) -> tuple[int, int] | None:
        """Ready messages and consumers of queue ``name`` (None: no such queue)."""
        channel = await self._channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except amqp_errors.ChannelNotFoundEntity:
            return None
        except _BROKER_ERRORS as exc:
            raise self._failure(exc, f"look at queue {name}") from exc
        try:
            await channel.close()
        except _BROKER_ERRORS as exc:
            raise self._failure(exc, f"look at queue {name}") from exc
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def lag(self, service: str) -> int | None:
        """Ready messages plus those this process's receivers hold (AMQP does not
        tell another process's unacked count)."""
        counts = await self._count(self._queue_name(service))
        if counts is None:
            return None
        held = sum(r.holding() for r in self._receivers if r.service == service)
        return counts[0] + held

    async def check(self, services: Collection[str] = ()) -> TransportReport:
        """Each service's queue, bindings, consumers and dead-letter queue."""
        report = TransportReport(self.url, self.kind)
        report.extra["exchange"] = self.exchange
        report.extra["dead_letter_exchange"] = f"{self.exchange}.dlx"
        for service in sorted({*self._declared, *services}):
            name = self._queue_name(service)
            counts = await self._count(name)
            if counts is None:
                report.services.append(ServiceTopology(service, problems=[f"no queue {name}"]))
                continue
            topology = ServiceTopology(service, lag=await self.lag(service), consumers=counts[1])
            topology.in_flight = sum(r.holding() for r in self._receivers if r.service == service)
            declared = self._declared.get(service)
            keys = ", ".join(sorted(binding_keys(declared[0]))) if declared else "?"
            topology.holders = [f"quorum queue {name} (bound to {self.exchange}: {keys})"]
            if name in self._mismatched:
                topology.problems.append(
                    f"queue {name} has other arguments: {self._mismatched[name]}"
                )
            dead = await self._count(f"{name}.undeliverable")
            if dead is None:
                topology.problems.append(f"no queue {name}.undeliverable")
            else:
                topology.holders.append(f"quorum queue {name}.undeliverable")
                report.extra[f"{name}.undeliverable"] = dead[0]
            report.services.append(topology)
        return report

    def _closed(self, receiver: _RabbitReceiver) -> None:
        self._receivers.discard(receiver)


class _RabbitReceiver(Receiver):
    """A consumer on a channel of its own (prefetch = ``settings.prefetch``);
    after a lost connection the next ``receive`` consumes again."""

    def __init__(
        self,
        transport: RabbitTransport,
        service: str,
        consumer: str,
        settings: TransportSettings,
    ) -> None:
        self._transport = transport
        self.service = service
        self._consumer = consumer
        self._prefetch = settings.prefetch
        self._max_claims = settings.max_claims
        self._name = transport._queue_name(service)
        self._channel: AbstractChannel | None = None
        self._generation = -1
        self._epoch = 0
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._held: set[int] = set()
        self._qos = settings.prefetch
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._closed = False

    def holding(self) -> int:
        """Messages delivered on the live channel and not yet acked."""
        return len(self._held) + self._buffer.qsize()

    async def start(self) -> None:
        """Consume (again, after a loss)."""
        connection = await self._transport._connected()
        if (
            self._channel is not None
            and not self._channel.is_closed
            and self._generation == self._transport._generation
        ):
            return
        self._epoch += 1
        self._buffer = asyncio.Queue()
        self._held.clear()
        self._tag = None
        try:
            channel = await connection.channel(publisher_confirms=False)
            self._queue = await channel.get_queue(self._name, ensure=True)
            buffer = self._buffer
            channel.close_callbacks.add(lambda *_: buffer.put_nowait(None))
            self._channel = channel
            await self._consume(self._prefetch)
        except amqp_errors.ChannelNotFoundEntity as exc:
            raise LookupError(
                f"service {self.service!r} is not declared on {self._transport.url}"
            ) from exc
        except _BROKER_ERRORS as exc:
            raise self._transport._failure(exc, f"consume {self._name}") from exc
        self._generation = self._transport._generation

    async def _consume(self, prefetch: int) -> None:
        """(Re)start the consumer with ``prefetch``: RabbitMQ applies a new QoS
        to new consumers only. What the old one delivered stays ours to ack."""
        assert self._channel is not None
        assert self._queue is not None
        if self._tag is not None:
            await self._queue.cancel(self._tag)
        await self._channel.set_qos(prefetch_count=prefetch)
        self._qos = prefetch
        epoch, buffer = self._epoch, self._buffer

        async def on_message(message: AbstractIncomingMessage) -> None:
            if epoch == self._epoch:
                buffer.put_nowait(message)

        self._tag = f"{self._consumer}.{uuid.uuid4().hex[:8]}"
        await self._queue.consume(on_message, consumer_tag=self._tag)

    async def receive(self, limit: int, wait: float) -> list[Inbound]:
        if self._closed:
            raise RuntimeError("receiver is closed")
        await self.start()
        messages = self._drain(limit)
        if messages or wait <= 0:
            return messages
        try:
            first = await asyncio.wait_for(self._buffer.get(), wait)
        except TimeoutError:
            return []
        if first is None:
            raise TransportUnavailable(
                f"RabbitMQ at {self._transport.url} closed the channel of {self._name}"
            )
        return [self._inbound(first), *self._drain(limit - 1)]

    def _drain(self, limit: int) -> list[Inbound]:
        messages: list[Inbound] = []
        while len(messages) < limit and not self._buffer.empty():
            message = self._buffer.get_nowait()
            if message is None:
                if not messages:
                    raise TransportUnavailable(
                        f"RabbitMQ at {self._transport.url} closed the channel of {self._name}"
                    )
                self._buffer.put_nowait(None)  # told on the next call
                break
            messages.append(self._inbound(message))
        return messages

    def _inbound(self, message: AbstractIncomingMessage, given_up: bool = False) -> Inbound:
        body = message.body
        try:
            event, problem = decode(body), None
        except ValueError as exc:
            event, problem = None, str(exc)
        headers = message.headers or {}
        count = headers.get("x-delivery-count")
        if given_up:
            # 3.10 keeps no count in a dead letter; past the limit means delivered
            # max_claims + 1 times (x-delivery-limit = max_claims)
            limited = headers.get("x-first-death-reason") == "delivery_limit"
            deliveries = self._max_claims + 1 if limited else 0
        elif isinstance(count, int):
            deliveries = count + 1
        else:
            deliveries = 2 if message.redelivered else 1
        tag = message.delivery_tag
        if tag is not None:
            self._held.add(tag)
        key = message.message_id or hashlib.sha256(body).hexdigest()[:16]
        return Inbound(
            event, body, problem, deliveries, f"{self._name}#{key}", (self._epoch, message)
        )

    async def ack(self, messages: Sequence[Inbound]) -> None:
        for inbound in messages:
            epoch, message = inbound.token
            if epoch != self._epoch or message.delivery_tag not in self._held:
                continue  # its channel is gone: the broker requeued it
            try:
                await message.ack()
            except _BROKER_ERRORS as exc:
                raise self._transport._failure(exc, f"ack on {self._name}") from exc
            self._held.discard(message.delivery_tag)

    async def extend(self, messages: Sequence[Inbound]) -> None:
        """No lease on RabbitMQ: a live consumer keeps its messages."""

    async def given_up(self, limit: int) -> list[Inbound]:
        """Messages the queue dead-lettered past ``x-delivery-limit``, from
        ``X.<service>.undeliverable``; ``deliveries`` is ``max_claims + 1``, what
        the limit allows (0 for one dead-lettered for another reason)."""
        await self.start()
        channel = self._channel
        assert channel is not None
        found: list[Inbound] = []
        try:
            queue = await channel.get_queue(f"{self._name}.undeliverable", ensure=False)
            while len(found) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                found.append(self._inbound(message, given_up=True))
        except _BROKER_ERRORS as exc:
            raise self._transport._failure(exc, f"read {self._name}.undeliverable") from exc
        return found

    async def close(self) -> None:
        self._closed = True
        self._epoch += 1
        self._held.clear()
        channel, self._channel = self._channel, None
        self._transport._closed(self)
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*_BROKER_ERRORS):
                await channel.close()


def binding_keys(patterns: Collection[str]) -> set[str]:
    """The topic binding keys that let through every type ``patterns`` match:
    an exact type as it is, a glob as its fixed words then ``#``, ``#`` for all.
    A word that is exactly ``*`` or ``#`` is a wildcard to RabbitMQ: then ``#``."""
    keys: set[str] = set()
    for pattern in patterns:
        if len(pattern.encode()) > _MAX_KEY - 2:
            raise ValueError(
                f"pattern {pattern[:40]!r}… is longer than RabbitMQ's {_MAX_KEY} bytes"
            )
        prefixes = coarse_prefixes([pattern]) if is_glob(pattern) else frozenset([pattern])
        if prefixes is None:
            return {"#"}
        for prefix in prefixes:
            if any(word in ("*", "#") for word in prefix.split(".")):
                return {"#"}
            keys.add(f"{prefix}.#" if is_glob(pattern) else prefix)
    return keys


def _check_service(service: str, exchange: str) -> None:
    if not service or len(f"{exchange}.{service}.undeliverable".encode()) > _MAX_KEY:
        raise ValueError(f"service name {service!r} is empty or too long for a RabbitMQ queue")


def _parse(url: str, shown: str) -> tuple[str, str, float]:
    """The URL aio-pika connects to, the exchange and the timeout."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ValueError(f"malformed RabbitMQ URL {shown!r}: {exc}") from None
    if parts.scheme.lower() not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(f"malformed RabbitMQ URL {shown!r}: use amqp://user:pass@host:5672/vhost")
    if "/" in parts.path[1:]:
        raise ValueError(f"malformed RabbitMQ URL {shown!r}: write a vhost with '/' as %2F")
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} in RabbitMQ URL {shown!r}: "
            f"known are {', '.join(sorted(_OPTIONS))}"
        )
    exchange = options.get("exchange", ["retrybus"])[-1]
    if not _NAME.match(exchange):
        raise ValueError(
            f"bad exchange {exchange!r} in RabbitMQ URL {shown!r}: 1-200 of A-Z a-z 0-9 _ . : -"
        )
    try:
        timeout = float(options.get("timeout", ["5"])[-1])
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= 600:
        raise ValueError(f"bad timeout in RabbitMQ URL {shown!r}: seconds, above 0, at most 600")
    return parts._replace(query="", fragment="").geturl(), exchange, timeout
