"""``nats://host:4222?stream=RETRYBUS``: NATS JetStream (nats-py).

One stream ``S`` (the ``stream`` option) holds every event, on the subject
``S.<type>``, for 7 days (limits retention: each service's consumer keeps its
own place in it; interest retention lost acknowledged messages across a
restart of nats-server 2.9.10).
Each service reads through a durable pull consumer of its own (ack explicit,
``ack_wait`` = the lease, ``max_deliver`` = ``max_claims + 1``). When a message
reaches ``max_deliver``, NATS publishes an advisory and keeps the message;
the stream ``S_ADVISORIES`` captures those advisories, read by a durable
consumer per service, which ``Receiver.given_up`` turns back into messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .._errors import TransportUnavailable, TransportUnusable
from .._event import Event
from .._stores._url import redact
from .base import Inbound, Receiver, ServiceTopology, Transport, TransportReport, TransportSettings
from .wire import coarse_prefixes, covers, decode, encode

__all__ = ["NatsTransport", "consumer_name", "subject_token", "type_of_subject"]

log = logging.getLogger("retrybus.transport.nats")

T = TypeVar("T")

_OPTIONS = frozenset({"stream"})
_DEFAULT_STREAM = "RETRYBUS"
#: what a stream name may be here (NATS forbids spaces, ".", "*", ">", path separators)
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONNECT_BUDGET = 2.5  # seconds a first connection may take (each call tries again)
_REQUEST_TIMEOUT = 5.0
_DUPLICATE_WINDOW = 120.0  # seconds within which a resent event is not stored again
_ADVISORY_AGE = 7 * 24 * 3600.0
_KEPT_FOR = 7 * 24 * 3600.0  # seconds the stream keeps each event
_MAX_ACK_PENDING = 10_000
_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
#: characters NATS forbids in a subject token, and "%" (the escape itself)
_FORBIDDEN = re.compile(r"[\s*>%\x00-\x1f\x7f]")
_ESCAPED = re.compile(r"(?:%[0-9A-F]{2})+")
_DESCRIPTION = "retrybus prefixes"  # the key of a consumer's description
_REFRESH = 5.0  # seconds between reads of a service's prefixes by its receivers

_UNAVAILABLE = (
    TimeoutError,  # asyncio's and nats.errors.TimeoutError
    OSError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.errors.FlushTimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


def subject_token(event_type: str) -> str:
    """The subject tokens for ``event_type``: its dotted words, each character NATS
    forbids in a token written ``%XX`` and an empty word written ``%``."""
    return ".".join(_escape_word(word) for word in event_type.split("."))


def _escape_word(word: str) -> str:
    if not word:
        return "%"
    return _FORBIDDEN.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), word)


def type_of_subject(token: str) -> str:
    """The event type ``subject_token`` wrote as ``token``."""
    return ".".join(_unescape_word(word) for word in token.split("."))


def _unescape_word(word: str) -> str:
    if word == "%":
        return ""
    if "%" not in word:
        return word
    return _ESCAPED.sub(lambda m: bytes.fromhex(m.group().replace("%", "")).decode(), word)


def consumer_name(service: str) -> str:
    """The durable consumer name of ``service`` (NATS forbids "." in it; "~" is
    in no service name, so the mapping is one to one)."""
    return service.replace(".", "~")


def _service_name(consumer: str) -> str:
    return consumer.replace("~", ".")


def _message_id(event: Event) -> str:
    """The ``Nats-Msg-Id`` of ``event``: JetStream stores a resent event once."""
    return hashlib.sha256(f"{event.source}\0{event.id}".encode()).hexdigest()[:32]


@dataclass(slots=True)
class _GivenUp:
    """The token of a message NATS stopped delivering: its advisory, and where it is."""

    advisory: Msg
    consumer: str
    sequence: int


class NatsTransport(Transport):
    """NATS JetStream: one interest stream, a durable pull consumer per service."""

    kind = "nats"

    def __init__(self, url: str) -> None:
        super().__init__(redact(url))
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("nats", "tls") or not parts.hostname:
            raise ValueError(
                f"malformed NATS transport URL {self.url!r}: use nats://[user:password@]host:4222"
                "?stream=NAME (or tls://)"
            )
        if parts.path not in ("", "/"):
            raise ValueError(f"malformed NATS transport URL {self.url!r}: it has no path")
        try:
            options = parse_qs(
                parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)
            )
        except ValueError:
            raise ValueError(f"malformed query in NATS transport URL {self.url!r}") from None
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} in NATS transport URL {self.url!r}: "
                "the only option is stream=NAME"
            )
        stream = options.get("stream", [_DEFAULT_STREAM])[-1]
        if not _STREAM_NAME.fullmatch(stream):
            raise ValueError(
                f"bad stream name {stream!r} in NATS transport URL {self.url!r}: "
                "1 to 64 letters, digits, '_' or '-'"
            )
        self.stream = stream
        self.advisories = f"{stream}_ADVISORIES"
        self._server = parts._replace(path="", query="", fragment="").geturl()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._lock: asyncio.Lock | None = None
        self._lost: asyncio.Event | None = None
        self._topology_ready = False
        self._declared: dict[str, tuple[frozenset[str] | None, TransportSettings]] = {}
        self._receivers: set[_NatsReceiver] = set()
        self._last_error: BaseException | None = None
        self._has_consumers: tuple[float, bool] = (0.0, False)

    # connection ----------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and make the stream (and its advisory stream) if missing."""
        await self._client()

    async def close(self) -> None:
        """Close the receivers (what they hold is delivered again) and the connection."""
        for receiver in list(self._receivers):
            with contextlib.suppress(TransportUnavailable, TransportUnusable):
                await receiver.close()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), _REQUEST_TIMEOUT)

    async def health(self) -> None:
        """Return if JetStream answers, else raise ``TransportUnavailable``."""
        _, js = await self._client()
        await self._call("health check", js.account_info())

    async def _client(self) -> tuple[Client, JetStreamContext]:
        """The connection, opened if needed, with the topology in place; raises
        ``TransportUnavailable`` at once while the client is reconnecting."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._nc is None or self._nc.is_closed:
            async with self._lock:
                if self._nc is None or self._nc.is_closed:
                    await self._open()
        nc, js = self._nc, self._js
        assert nc is not None
        assert js is not None
        if not nc.is_connected:
            raise self._unavailable("the connection is lost; reconnecting", self._last_error)
        if not self._topology_ready:
            async with self._lock:
                if not self._topology_ready:
                    await self._make_topology(js)
        return nc, js

    async def _open(self) -> None:
        nc = Client()
        self._lost = asyncio.Event()
        self._last_error = None
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=[self._server],
                    name="retrybus",
                    connect_timeout=2,
                    max_reconnect_attempts=-1,  # the default 60 give up for good
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                _CONNECT_BUDGET,
            )
        except (Exception, asyncio.CancelledError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if isinstance(exc, asyncio.CancelledError) and not isinstance(exc, TimeoutError):
                raise
            cause = self._last_error or exc
            if isinstance(cause, nats.errors.AuthorizationError):
                raise TransportUnusable(f"NATS at {self.url} refuses the credentials") from cause
            raise self._unavailable("cannot connect", cause) from exc
        self._nc, self._js = nc, nc.jetstream(timeout=_REQUEST_TIMEOUT)
        self._topology_ready = False

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        log.debug("NATS at %s: %s", self.url, exc)

    async def _on_disconnected(self) -> None:
        if self._lost is not None:
            self._lost.set()
        log.debug("NATS at %s: disconnected", self.url)

    async def _on_reconnected(self) -> None:
        if self._lost is not None:
            self._lost.clear()
        self._topology_ready = False  # declared again, in case the server lost it
        log.debug("NATS at %s: reconnected", self.url)

    def _unavailable(self, what: str, cause: BaseException | None = None) -> TransportUnavailable:
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return TransportUnavailable(f"NATS at {self.url} is unavailable ({what}){detail}")

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result; broker errors become ``TransportUnavailable`` (as
        soon as the connection drops, not at the request's timeout) or ``TransportUnusable``."""
        lost = self._lost
        task = asyncio.ensure_future(awaitable)
        watch = asyncio.ensure_future(lost.wait()) if lost is not None else None
        try:
            await asyncio.wait({task, watch} if watch else {task}, return_when="FIRST_COMPLETED")
        finally:
            if watch is not None:
                watch.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled():
            raise self._unavailable(f"connection lost during {what}", self._last_error)
        try:
            return task.result()
        except asyncio.CancelledError:
            # a gather whose requests nats-py cancelled when the connection dropped
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise self._unavailable(f"connection lost during {what}", self._last_error) from None
        except _UNAVAILABLE as exc:
            if isinstance(exc, nats.js.errors.NoStreamResponseError):
                self._topology_ready = False
            raise self._unavailable(what, exc) from exc
        except nats.errors.Error as exc:
            raise TransportUnusable(f"NATS at {self.url} refused {what}: {exc}") from exc

    # topology ------------------------------------------------------------------

    async def _make_topology(self, js: JetStreamContext) -> None:
        await self._ensure_stream(
            js,
            StreamConfig(
                name=self.stream,
                subjects=[f"{self.stream}.>"],
                # not interest retention: nats-server 2.9.10 lost acknowledged
                # messages of an interest stream across a restart (10,000 events,
                # two restarts: 80 to 220 never delivered); a limits stream keeps
                # each message for _KEPT_FOR, every service's consumer reading it
                retention=RetentionPolicy.LIMITS,
                max_age=_KEPT_FOR,
                storage=StorageType.FILE,
                duplicate_window=_DUPLICATE_WINDOW,
            ),
        )
        await self._ensure_stream(
            js,
            StreamConfig(
                name=self.advisories,
                subjects=[f"{_ADVISORY}.{self.stream}.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=_ADVISORY_AGE,
            ),
        )
        for service, (prefixes, settings) in self._declared.items():
            await self._add_consumers(js, service, prefixes, settings)
        self._topology_ready = True

    async def _ensure_stream(self, js: JetStreamContext, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            info = await self._call(f"stream {config.name}", js.stream_info(config.name))
        except TransportUnusable as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                raise
            await self._call(f"creating stream {config.name}", js.add_stream(config))
            return
        if info.config.retention != config.retention:
            raise TransportUnusable(
                f"NATS at {self.url}: stream {config.name} has retention "
                f"{info.config.retention}, retrybus needs {config.retention}"
            )

    async def _add_consumers(
        self,
        js: JetStreamContext,
        service: str,
        prefixes: frozenset[str] | None,
        settings: TransportSettings,
    ) -> None:
        name = consumer_name(service)
        described = None if prefixes is None else sorted(prefixes)
        await self._call(
            f"declaring consumer {self.stream}/{name}",
            js.add_consumer(
                self.stream,
                ConsumerConfig(
                    durable_name=name,
                    description=json.dumps({_DESCRIPTION: described}),
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=settings.lease,
                    max_deliver=settings.max_claims + 1,
                    max_ack_pending=_MAX_ACK_PENDING,
                    deliver_policy=DeliverPolicy.NEW,
                    filter_subject=f"{self.stream}.>",
                ),
            ),
        )
        await self._call(
            f"declaring consumer {self.advisories}/{name}",
            js.add_consumer(
                self.advisories,
                ConsumerConfig(
                    durable_name=name,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=60.0,
                    deliver_policy=DeliverPolicy.ALL,
                    filter_subject=f"{_ADVISORY}.{self.stream}.{name}",
                ),
            ),
        )

    async def declare(
        self, service: str, patterns: Collection[str], settings: TransportSettings
    ) -> None:
        """Make (or update) ``service``'s durable consumer. It reads every subject
        of the stream (NATS 2.9 takes one filter per consumer, and cannot change
        it in place); its description keeps the coarse prefixes of ``patterns``,
        by which its receivers skip (and ack) the messages of other types."""
        _, js = await self._client()
        prefixes = coarse_prefixes(patterns)
        await self._add_consumers(js, service, prefixes, settings)
        self._declared[service] = (prefixes, settings)
        for receiver in self._receivers:
            if receiver.service == service:
                receiver.prefixes = (time.monotonic(), prefixes)
        self._has_consumers = (time.monotonic(), True)

    async def forget(self, service: str) -> None:
        """Delete ``service``'s consumers (the messages only it waited for go with them)."""
        _, js = await self._client()
        self._declared.pop(service, None)
        name = consumer_name(service)
        for stream in (self.stream, self.advisories):
            with contextlib.suppress(TransportUnusable):  # not there: nothing to forget
                await self._call(
                    f"deleting consumer {stream}/{name}", js.delete_consumer(stream, name)
                )
        self._has_consumers = (0.0, False)

    # sending -------------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> list[str | None]:
        """Publish ``events`` concurrently (one ``Nats-Msg-Id`` each) and wait for
        every ``PubAck``; receipts ``S#seq``, None while no service has a consumer."""
        if not events:
            return []
        _, js = await self._client()
        acks, kept = await self._call(
            "publish",
            asyncio.gather(
                asyncio.gather(*(self._publish(js, event) for event in events)),
                self._any_consumer(js),
            ),
        )
        if not kept:
            return [None] * len(events)
        return [f"{self.stream}#{seq}" for seq in acks]

    async def _publish(self, js: JetStreamContext, event: Event) -> int:
        ack = await js.publish(
            f"{self.stream}.{subject_token(event.type)}",
            encode(event),
            headers={"Nats-Msg-Id": _message_id(event)},
        )
        return int(ack.seq)

    async def _any_consumer(self, js: JetStreamContext) -> bool:
        """Whether the stream has a consumer (known for a second at a time)."""
        checked, has = self._has_consumers
        if time.monotonic() - checked < 1.0:
            return has
        info = await js.stream_info(self.stream)
        has = bool(info.state.consumer_count)
        self._has_consumers = (time.monotonic(), has)
        return has

    async def send_body(self, event_type: str, body: bytes) -> None:
        """Publish ``body`` as it is on ``event_type``'s subject (tests send broken bodies)."""
        _, js = await self._client()
        subject = f"{self.stream}.{subject_token(event_type)}"
        await self._call("publish", js.publish(subject, body))

    # consuming -----------------------------------------------------------------

    async def receiver(self, service: str, consumer: str, settings: TransportSettings) -> Receiver:
        """A receiver of ``service``'s durable consumer (declared already)."""
        name = consumer_name(service)
        info = await self._consumer_info(self.stream, name)
        if info is None:
            raise LookupError(f"service {service!r} is not declared on {self.url}")
        receiver = _NatsReceiver(self, service, consumer)
        receiver.prefixes = (time.monotonic(), _described_prefixes(info))
        self._receivers.add(receiver)
        return receiver

    async def lag(self, service: str) -> int | None:
        """Messages waiting for ``service`` plus those its consumers hold."""
        info = await self._consumer_info(self.stream, consumer_name(service))
        return None if info is None else _backlog(info)

    async def _consumer_info(self, stream: str, name: str) -> ConsumerInfo | None:
        _, js = await self._client()
        try:
            return await self._call(f"consumer {stream}/{name}", js.consumer_info(stream, name))
        except TransportUnusable as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return None
            raise

    async def check(self, services: Collection[str] = ()) -> TransportReport:
        """The stream, each service's consumers with their lag, and what NATS gave up on."""
        nc, js = await self._client()
        report = TransportReport(self.url, self.kind)
        info = await self._call(f"stream {self.stream}", js.stream_info(self.stream))
        found = await self._call("consumer list", js.consumers_info(self.stream))
        report.extra["server"] = nc.connected_server_version.__str__()
        report.extra["stream"] = {
            "name": self.stream,
            "retention": str(info.config.retention),
            "storage": str(info.config.storage),
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "consumers": info.state.consumer_count,
        }
        if info.config.storage != StorageType.FILE:
            report.warnings.append(f"stream {self.stream} keeps its messages in memory only")
        consumers = {_service_name(c.name): c for c in found if c.name}
        given_up: dict[str, int] = {}
        for name in sorted({*consumers, *services}):
            topology = await self._service_topology(name, consumers.get(name), given_up)
            report.services.append(topology)
        report.extra["given_up_waiting"] = given_up
        return report

    async def _service_topology(
        self, service: str, info: ConsumerInfo | None, given_up: dict[str, int]
    ) -> ServiceTopology:
        if info is None:
            return ServiceTopology(service, problems=["no consumer on the stream (not declared)"])
        config = info.config
        topology = ServiceTopology(
            service,
            holders=[
                f"consumer {self.stream}/{info.name} (filter {config.filter_subject}, "
                f"ack_wait {config.ack_wait}s, max_deliver {config.max_deliver})"
            ],
            lag=_backlog(info),
            in_flight=info.num_ack_pending or 0,
        )
        advisory = await self._consumer_info(self.advisories, info.name)
        if advisory is None:
            topology.problems.append(f"no advisory consumer {self.advisories}/{info.name}")
        else:
            topology.holders.append(f"consumer {self.advisories}/{info.name}")
            given_up[service] = _backlog(advisory)
        return topology

    def _closed(self, receiver: _NatsReceiver) -> None:
        self._receivers.discard(receiver)


class _NatsReceiver(Receiver):
    """Fetches from the service's durable consumer; a fetch is issued per
    ``receive``, so one lost in a reconnect (nats-io/nats.py#504) is not waited on."""

    def __init__(self, transport: NatsTransport, service: str, consumer: str) -> None:
        self._transport = transport
        self.service = service
        self._consumer = consumer
        self._name = consumer_name(service)
        self._pull: JetStreamContext.PullSubscription | None = None
        self._advisory_pull: JetStreamContext.PullSubscription | None = None
        self._bound_to: Client | None = None
        #: by stream sequence, the latest delivery of each message received and not acked
        self._held: dict[int, Msg] = {}
        #: when they were read, and the coarse prefixes of the service's patterns
        self.prefixes: tuple[float, frozenset[str] | None] = (0.0, None)

    async def _subscriptions(
        self,
    ) -> tuple[Client, JetStreamContext.PullSubscription, JetStreamContext.PullSubscription]:
        t = self._transport
        nc, js = await t._client()
        if self._bound_to is not nc or self._pull is None or self._advisory_pull is None:
            self._pull = await js.pull_subscribe_bind(durable=self._name, stream=t.stream)
            self._advisory_pull = await js.pull_subscribe_bind(
                durable=self._name, stream=t.advisories
            )
            self._bound_to = nc
        return nc, self._pull, self._advisory_pull

    async def receive(self, limit: int, wait: float) -> list[Inbound]:
        deadline = time.monotonic() + wait
        while True:
            nc, pull, _ = await self._subscriptions()
            prefixes = await self._prefixes()
            msgs = await self._transport._call(
                "receive", _fetch(pull, limit, deadline - time.monotonic())
            )
            kept: list[Inbound] = []
            for msg in msgs:
                if not msg.reply:
                    continue
                if covers(prefixes, self._type_of(msg)):
                    kept.append(self._inbound(msg))
                else:  # a type the service does not subscribe to: it is done with it
                    with contextlib.suppress(nats.errors.Error):
                        await nc.publish(msg.reply, Msg.Ack.Ack)
            if kept or time.monotonic() >= deadline:
                return kept

    def _type_of(self, msg: Msg) -> str:
        return type_of_subject(msg.subject[len(self._transport.stream) + 1 :])

    async def _prefixes(self) -> frozenset[str] | None:
        read_at, prefixes = self.prefixes
        if time.monotonic() - read_at < _REFRESH:
            return prefixes
        info = await self._transport._consumer_info(self._transport.stream, self._name)
        if info is None:
            raise LookupError(f"service {self.service!r} was forgotten")
        prefixes = _described_prefixes(info)
        self.prefixes = (time.monotonic(), prefixes)
        return prefixes

    def _inbound(self, msg: Msg) -> Inbound:
        meta = msg.metadata
        self._held[meta.sequence.stream] = msg
        receipt = f"{self._transport.stream}#{meta.sequence.stream}"
        return _read(msg.data, meta.num_delivered, receipt, msg)

    async def ack(self, messages: Sequence[Inbound]) -> None:
        """Ack each message (the last one waits for the server, so all are in when it returns)."""
        if not messages:
            return
        t = self._transport
        nc, _ = await t._client()
        subjects: list[str] = []
        for message in messages:
            token = message.token
            if isinstance(token, _GivenUp):
                # the kept message leaves the interest stream once this consumer acks it
                subjects.append(f"$JS.ACK.{t.stream}.{token.consumer}.1.{token.sequence}.0.0.0")
                subjects.append(token.advisory.reply)
            elif isinstance(token, Msg):
                subjects.append(token.reply)
                sequence = token.metadata.sequence.stream
                if self._held.get(sequence) is token:
                    del self._held[sequence]
        await t._call("ack", _ack_all(nc, subjects))

    async def extend(self, messages: Sequence[Inbound]) -> None:
        """Restart the ack wait of ``messages`` (``+WPI``)."""
        t = self._transport
        nc, _ = await t._client()
        replies = [m.token.reply for m in messages if isinstance(m.token, Msg)]
        await t._call("extend", _publish_all(nc, replies, Msg.Ack.Progress))

    async def given_up(self, limit: int) -> list[Inbound]:
        """Messages NATS stopped delivering after ``max_deliver``, read back from
        the stream by the sequence their advisory names."""
        t = self._transport
        _, _, pull = await self._subscriptions()
        _, js = await t._client()
        advisories = await t._call("given up", _fetch(pull, limit, 0.2))
        return [await self._given_up(js, advisory) for advisory in advisories if advisory.reply]

    async def _given_up(self, js: JetStreamContext, advisory: Msg) -> Inbound:
        t = self._transport
        document: dict[str, Any] = json.loads(advisory.data)
        sequence = int(document["stream_seq"])
        deliveries = int(document.get("deliveries", 0))
        receipt = f"{t.stream}#{sequence}"
        token = _GivenUp(advisory, self._name, sequence)
        try:
            stored = await t._call(f"message {receipt}", js.get_msg(t.stream, sequence))
        except TransportUnusable as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                raise
            problem = f"message {receipt} is gone from the stream"
            return Inbound(None, b"", problem, deliveries, receipt, token=token)
        body = stored.data or b""
        return _read(body, deliveries, receipt, token)

    async def close(self) -> None:
        """Give back what this receiver holds (``-NAK``: delivered again at once)."""
        t = self._transport
        t._closed(self)
        pulls = [p for p in (self._pull, self._advisory_pull) if p is not None]
        self._pull = self._advisory_pull = None
        replies = [msg.reply for msg in self._held.values()]
        self._held.clear()
        nc = t._nc
        if nc is None or not nc.is_connected:
            return
        for pull in pulls:
            replies += _drain(pull)  # delivered to this receiver, not yet fetched
            with contextlib.suppress(Exception):
                await pull.unsubscribe()
        with contextlib.suppress(TransportUnavailable, TransportUnusable):
            await t._call("close", _publish_all(nc, replies, Msg.Ack.Nak, sync=True))


def _read(body: bytes, deliveries: int, receipt: str, token: Any) -> Inbound:
    """``body`` as an ``Inbound``: its event, or why there is none."""
    try:
        return Inbound(decode(body), body, None, deliveries, receipt, token)
    except ValueError as exc:
        return Inbound(None, body, str(exc), deliveries, receipt, token)


def _backlog(info: ConsumerInfo) -> int:
    """Messages a consumer has still to deliver, plus those delivered and not acked."""
    return (info.num_pending or 0) + (info.num_ack_pending or 0)


def _described_prefixes(info: ConsumerInfo) -> frozenset[str] | None:
    """The coarse prefixes a consumer's description keeps (None: every type)."""
    try:
        described = json.loads(info.config.description or "{}").get(_DESCRIPTION)
    except (ValueError, AttributeError):
        return None
    return None if described is None else frozenset(described)


def _drain(pull: JetStreamContext.PullSubscription) -> list[str]:
    """The replies of messages delivered to ``pull`` and not yet fetched."""
    queue = pull._sub._pending_queue
    replies: list[str] = []
    while not queue.empty():
        msg = queue.get_nowait()
        if msg.reply and not msg.headers:
            replies.append(msg.reply)
    return replies


async def _fetch(pull: JetStreamContext.PullSubscription, limit: int, wait: float) -> list[Msg]:
    try:
        return await pull.fetch(batch=max(limit, 1), timeout=max(wait, 0.05))
    except TimeoutError:
        return []


async def _ack_all(nc: Client, subjects: list[str]) -> None:
    await _publish_all(nc, subjects, Msg.Ack.Ack, sync=True)


async def _publish_all(
    nc: Client, subjects: list[str], payload: bytes, *, sync: bool = False
) -> None:
    """Publish ``payload`` to each subject; with ``sync``, the last as a request, so
    the server has them all when this returns (it handles one connection's in order)."""
    if not subjects:
        return
    for subject in subjects[:-1] if sync else subjects:
        await nc.publish(subject, payload)
    if sync:
        await nc.request(subjects[-1], payload, timeout=_REQUEST_TIMEOUT)
    else:
        await nc.flush(timeout=int(_REQUEST_TIMEOUT))
