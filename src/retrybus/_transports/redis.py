"""``redis://host:6379/0?stream=NAME``: Redis Streams carry first deliveries.

Keys (``S`` = the ``stream`` option, ``retrybus-bus`` by default, apart from the
Redis store's ``retrybus:`` keys): a stream per first type word, ``S:ev:<word>``
(``like.added`` → ``S:ev:like``), each entry's body in field ``e``; ``S:streams``
(the words whose stream exists); ``S:groups`` (service → JSON list of its coarse
prefixes, ``["*"]`` for everything); ``S:forgotten`` (services ``forget`` removed,
which a receiver must not bring back). A service is a consumer group on every
stream its prefixes cover; a receiver is a consumer in those groups.

Every change of topology and every publish is one Lua script (atomic, one round
trip); an entry goes back to its service after the lease by ``XAUTOCLAIM``, with
its delivery count from the pending list. Cluster mode is not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Collection, Iterator, Sequence
from importlib import resources
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import TransportUnavailable, TransportUnusable
from .._event import Event
from .._stores._url import redact
from .base import Inbound, Receiver, ServiceTopology, Transport, TransportReport, TransportSettings
from .wire import coarse_prefixes, decode, encode

__all__ = ["RedisTransport"]

logger = logging.getLogger("retrybus.transport.redis")

_STREAM = re.compile(r"^[A-Za-z0-9_.\-]+$")
_DEFAULT_STREAM = "retrybus-bus"
#: URL options passed on to redis-py (others, and those that would break the
#: blocking reads or the replies' shape, are refused)
_REDIS_OPTIONS = frozenset(
    {
        "socket_connect_timeout",
        "socket_keepalive",
        "client_name",
        "username",
        "health_check_interval",
        "max_connections",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)
_BLOCK = 1.0  # seconds one XREADGROUP blocks at most (the stream list is re-read between)
_SOCKET_TIMEOUT = _BLOCK + 5.0  # must exceed the BLOCK
_CONNECT_TIMEOUT = 5.0
_REFRESH = 1.0  # seconds between re-reads of the streams a receiver covers
_TRIM_EVERY = 10.0
_MAX_CLAIM_EVERY = 5.0
_IDLE_CONSUMER_MS = 86_400_000  # a consumer idle this long with nothing pending is removed
_RELEASE_IDLE_MS = 30 * 86_400_000  # a closed receiver's entries: idle at once (< now in ms)
_SEND_CHUNK = 1000  # events per publish script
_ACK_CHUNK = 500  # entries per ack/extend script

# Lua: redis.lua, one block per script ------------------------------------------


def _scripts() -> dict[str, str]:
    """The scripts of ``redis.lua`` by name (each after its ``--! NAME`` line)."""
    text = resources.files(__package__).joinpath("redis.lua").read_text(encoding="utf-8")
    scripts: dict[str, str] = {}
    for block in text.split("\n--! ")[1:]:
        name, _, body = block.partition("\n")
        scripts[name.strip()] = body
    return scripts


_LUA = _scripts()
_HELPERS = _LUA["helpers"]
_PUBLISH = _LUA["publish"]
_DECLARE = _LUA["declare"]
_FORGET = _LUA["forget"]
_REPAIR = _LUA["repair"]
_SETTLE = _LUA["settle"]
_CLAIM = _LUA["claim"]
_TRIM = _LUA["trim"]

_SCRIPTS = {
    "publish": _PUBLISH,
    "declare": _DECLARE,
    "forget": _FORGET,
    "repair": _REPAIR,
    "settle": _SETTLE,
    "claim": _CLAIM,
    "trim": _TRIM,
}
_USES_HELPERS = frozenset({"publish", "declare", "forget", "repair"})


class _NoGroup(Exception):
    """Redis answered NOGROUP: a stream or group the receiver reads vanished."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _first_word(event_type: str) -> str:
    return event_type.split(".", 1)[0]


def _covers(prefixes: Sequence[str], word: str) -> bool:
    return any(prefix == "*" or _first_word(prefix) == word for prefix in prefixes)


class RedisTransport(Transport):
    """Redis Streams: a stream per first type word, a consumer group per service
    (``redis://host:6379/0?stream=NAME``, or ``rediss://``)."""

    kind = "redis"

    def __init__(self, url: str) -> None:
        super().__init__(redact(url))
        self.stream, self._redis_url = _parse(url)
        self._streams_key = f"{self.stream}:streams"
        self._groups_key = f"{self.stream}:groups"
        self._forgotten_key = f"{self.stream}:forgotten"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._receivers: set[_RedisReceiver] = set()

    def stream_key(self, word: str) -> str:
        """The key of the stream that carries the types whose first word is ``word``."""
        return f"{self.stream}:ev:{word}"

    # connection ------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            client = aioredis.Redis.from_url(
                self._redis_url,
                decode_responses=False,
                socket_timeout=_SOCKET_TIMEOUT,
                socket_connect_timeout=_CONNECT_TIMEOUT,
                # no retries inside the client: a retried publish could be stored twice,
                # and a down server must answer promptly; the caller retries
                retry=Retry(NoBackoff(), 0),
            )
            self._scripts = {
                name: client.register_script(_HELPERS + body if name in _USES_HELPERS else body)
                for name, body in _SCRIPTS.items()
            }
            self._client = client
        return self._client

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Redis's errors as the transport's."""
        try:
            yield
        except (AuthenticationError, AuthorizationError, NoPermissionError) as exc:
            raise TransportUnusable(f"Redis transport {self.url} refused: {_first(exc)}") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise TransportUnavailable(
                f"Redis transport {self.url} is unavailable: {_first(exc)}"
            ) from exc
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP"):
                raise _NoGroup(str(exc)) from exc
            raise TransportUnusable(f"Redis transport {self.url} refused: {_first(exc)}") from exc
        except RedisError as exc:
            raise TransportUnavailable(
                f"Redis transport {self.url} is unavailable: {_first(exc)}"
            ) from exc

    async def _command(self, *args: Any) -> Any:
        client = cast(Any, self._redis())
        with self._errors():
            return await client.execute_command(*args)

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self._redis()
        with self._errors():
            return await self._scripts[name](keys=list(keys), args=list(args), client=client)

    async def _pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        client = self._redis()
        with self._errors():
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    async def connect(self) -> None:
        """Check that Redis answers (commands connect as they need)."""
        await self.health()

    async def close(self) -> None:
        """Close every receiver, then the connections."""
        for receiver in list(self._receivers):
            await receiver.close()
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def health(self) -> None:
        """PING."""
        await self._command("PING")

    # publishing ------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> list[str | None]:
        """XADD each event to its first word's stream (one script per 1,000 events),
        where some service's group reads that stream; else its receipt is None."""
        receipts: list[str | None] = []
        for start in range(0, len(events), _SEND_CHUNK):
            chunk = events[start : start + _SEND_CHUNK]
            receipts += await self._send_bodies([(e.type, encode(e)) for e in chunk])
        return receipts

    async def _send_bodies(self, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        by_word: dict[str, list[int]] = {}
        for index, (event_type, _) in enumerate(messages):
            by_word.setdefault(_first_word(event_type), []).append(index)
        words = list(by_word)
        keys = [self._streams_key, self._groups_key, *map(self.stream_key, words)]
        args: list[Any] = [*words, *(len(by_word[w]) for w in words)]
        order = [index for word in words for index in by_word[word]]
        args += [messages[index][1] for index in order]
        ids = await self._script("publish", keys, args)
        receipts: list[str | None] = [None] * len(messages)
        for index, entry_id in zip(order, ids, strict=True):
            if entry_id is not None:
                word = _first_word(messages[index][0])
                receipts[index] = f"{word}/{_text(entry_id)}"
        return receipts

    # topology --------------------------------------------------------------

    async def declare(
        self, service: str, patterns: Collection[str], settings: TransportSettings
    ) -> None:
        """Record ``service``'s coarse prefixes and give it a group (at ``$``) on each
        stream they cover; groups on streams they no longer cover are removed."""
        prefixes = _prefix_list(patterns)
        await self._declare(service, prefixes)

    async def _declare(self, service: str, prefixes: Sequence[str]) -> None:
        words = sorted({_first_word(p) for p in prefixes if p != "*"})
        await self._script(
            "declare",
            [self._streams_key, self._groups_key, self._forgotten_key],
            [service, json.dumps(list(prefixes)), self.stream_key(""), *words],
        )

    async def forget(self, service: str) -> None:
        """Destroy ``service``'s groups (with what waits in them) and its record."""
        await self._script(
            "forget",
            [self._streams_key, self._groups_key, self._forgotten_key],
            [service, self.stream_key("")],
        )

    async def _prefixes(self, service: str) -> list[str] | None:
        raw = await self._command("HGET", self._groups_key, service)
        return None if raw is None else _load_prefixes(raw)

    async def _words(self) -> list[str]:
        return sorted(_text(word) for word in await self._command("SMEMBERS", self._streams_key))

    async def receiver(self, service: str, consumer: str, settings: TransportSettings) -> Receiver:
        """A consumer named ``consumer`` in ``service``'s groups (declared already)."""
        prefixes = await self._prefixes(service)
        if prefixes is None:
            raise LookupError(f"service {service!r} is not declared on {self.url}")
        receiver = _RedisReceiver(self, service, consumer, settings, prefixes)
        self._receivers.add(receiver)
        return receiver

    def _closed(self, receiver: _RedisReceiver) -> None:
        self._receivers.discard(receiver)

    async def _group_infos(self, words: Sequence[str]) -> list[list[dict[str, Any]]]:
        """XINFO GROUPS of each word's stream ([] where the stream is missing)."""
        replies = await self._pipeline([("XINFO", "GROUPS", self.stream_key(w)) for w in words])
        infos: list[list[dict[str, Any]]] = []
        for reply in replies:
            if isinstance(reply, ResponseError):
                infos.append([])
            elif isinstance(reply, Exception):
                with self._errors():
                    raise reply
            else:
                infos.append([_info_dict(group) for group in reply])
        return infos

    async def lag(self, service: str) -> int | None:
        """Entries not yet delivered to ``service`` plus those its consumers hold,
        over its streams (``XINFO GROUPS`` lag + pending)."""
        prefixes = await self._prefixes(service)
        if prefixes is None:
            return None
        words = [w for w in await self._words() if _covers(prefixes, w)]
        total = 0
        for word, groups in zip(words, await self._group_infos(words), strict=True):
            for group in groups:
                if group["name"] == service:
                    total += int(group["pending"]) + await self._unread(word, group)
        return total

    async def _unread(self, word: str, group: dict[str, Any]) -> int:
        if group.get("lag") is not None:
            return int(group["lag"])
        # 7.0 cannot tell after some deletions: count what follows its last delivered id
        after = f"({group['last-delivered-id']}"
        return len(await self._command("XRANGE", self.stream_key(word), after, "+"))

    async def trim(self) -> int:
        """Trim every stream to the oldest entry a group still needs (receivers do
        it every 10 s for their streams); the number of entries removed."""
        return await self._trim([self.stream_key(w) for w in await self._words()])

    async def _trim(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return int(await self._script("trim", keys, [_IDLE_CONSUMER_MS]))

    async def check(self, services: Collection[str] = ()) -> TransportReport:
        """Each service's groups (lag, pending, consumers), the streams' lengths, and
        a warning when Redis keeps nothing on disk (no AOF)."""
        report = TransportReport(self.url, self.kind)
        raw = await self._command("HGETALL", self._groups_key)
        declared = {_text(k): _load_prefixes(v) for k, v in _pairs(raw)}
        words = await self._words()
        infos = dict(zip(words, await self._group_infos(words), strict=True))
        lengths = await self._pipeline([("XLEN", self.stream_key(w)) for w in words])
        report.extra["streams"] = {
            self.stream_key(w): length for w, length in zip(words, lengths, strict=True)
        }
        for name in sorted({*declared, *services}):
            prefixes = declared.get(name)
            if prefixes is None:
                report.services.append(ServiceTopology(name, problems=["not declared"]))
                continue
            report.services.append(await self._topology(name, prefixes, infos))
        report.warnings += await self._persistence_warnings()
        return report

    async def _topology(
        self, name: str, prefixes: list[str], infos: dict[str, list[dict[str, Any]]]
    ) -> ServiceTopology:
        holders: list[str] = []
        problems: list[str] = []
        lag = in_flight = consumers = 0
        for word, groups in infos.items():
            if not _covers(prefixes, word):
                continue
            key = self.stream_key(word)
            group = next((g for g in groups if g["name"] == name), None)
            if group is None:
                problems.append(f"no consumer group {name!r} on stream {key}")
                continue
            holders.append(f"group {name} on {key} ({', '.join(prefixes)})")
            lag += int(group["pending"]) + await self._unread(word, group)
            in_flight += int(group["pending"])
            consumers = max(consumers, int(group["consumers"]))
        if not holders and not problems:
            holders.append(f"no stream yet for {', '.join(prefixes)}")
        return ServiceTopology(name, holders, lag, in_flight, consumers, problems)

    async def _persistence_warnings(self) -> list[str]:
        try:
            config = await self._command("CONFIG", "GET", "appendonly")
        except TransportUnusable as exc:
            return [f"could not read whether Redis keeps an append-only file: {exc}"]
        values = dict(_pairs(config))
        appendonly = _text(values.get(b"appendonly", values.get("appendonly", b"")))
        if appendonly != "yes":
            return [
                f"Redis at {self.url} has no append-only file (appendonly {appendonly}): "
                "events sent and not yet handled are lost when it restarts; set "
                "'appendonly yes' and 'appendfsync everysec' (or always)"
            ]
        return []


class _RedisReceiver(Receiver):
    """One consumer in a service's groups: reads its streams with XREADGROUP,
    takes over entries idle past the lease with XAUTOCLAIM, trims every 10 s."""

    def __init__(
        self,
        transport: RedisTransport,
        service: str,
        consumer: str,
        settings: TransportSettings,
        prefixes: list[str],
    ) -> None:
        self._t = transport
        self.service = service
        self.consumer = consumer
        self._lease_ms = max(1, int(settings.lease * 1000))
        self._claim_every = min(settings.lease / 2, _MAX_CLAIM_EVERY)
        self._prefixes = prefixes
        self._words: list[str] = []
        self._refreshed = -math.inf
        self._claim_due = 0.0
        self._trim_due = time.monotonic() + _TRIM_EVERY
        self._cursors: dict[str, str] = {}
        # receipt -> (word, entry id, deliveries): what close gives back
        self._held: dict[str, tuple[str, str, int]] = {}
        #: a read failed with the connection: entries it took may wait in our pending list
        self._read_lost = False
        # read beyond a receive's limit (XREADGROUP's COUNT is per stream)
        self._surplus: list[Inbound] = []
        self._lost_said = False

    async def receive(self, limit: int, wait: float) -> list[Inbound]:
        if limit <= 0:  # XREADGROUP's COUNT 0 would mean no limit
            return []
        deadline = time.monotonic() + wait
        messages = await self._take_surplus(limit)
        if messages:
            return messages
        await self._housekeeping()
        if self._read_lost:  # a read cut off by a lost connection: what it took is ours
            messages += await self._own_pending(limit)
            self._read_lost = False
        while True:
            await self._refresh()
            now = time.monotonic()
            if now >= self._claim_due:
                self._claim_due = now + self._claim_every
                messages += await self._claim(limit)
            if len(messages) >= limit:
                return messages
            block = 0.0 if messages else min(max(deadline - now, 0.0), _BLOCK)
            try:
                messages += await self._read(limit - len(messages), block)
            except TransportUnavailable:
                self._read_lost = True
                if messages:  # taken over already: hand them out
                    return messages
                raise
            if len(messages) > limit:
                self._surplus = messages[limit:]
                return messages[:limit]
            if messages or time.monotonic() >= deadline:
                return messages

    async def _take_surplus(self, limit: int) -> list[Inbound]:
        """Entries read beyond an earlier limit, those still this consumer's, their
        lease started again."""
        if not self._surplus:
            return []
        taken = self._surplus[:limit]
        mine = await self._settle(taken, "extend")
        del self._surplus[:limit]
        for message in taken:
            if message.token not in mine:
                self._held.pop(message.receipt, None)
        return [m for m in taken if m.token in mine]

    async def _housekeeping(self) -> None:
        if time.monotonic() < self._trim_due:
            return
        self._trim_due = time.monotonic() + _TRIM_EVERY
        try:
            await self._t._trim([self._t.stream_key(w) for w in self._words])
        except (TransportUnusable, _NoGroup) as exc:
            logger.warning("receiver %s: trimming %s failed: %s", self.consumer, self._t.url, exc)

    async def _refresh(self, force: bool = False) -> None:
        """Re-read the service's prefixes and the streams they cover (every 1 s)."""
        if not force and time.monotonic() - self._refreshed < _REFRESH:
            return
        raw, forgotten, members = await self._t._pipeline(
            [
                ("HGET", self._t._groups_key, self.service),
                ("HEXISTS", self._t._forgotten_key, self.service),
                ("SMEMBERS", self._t._streams_key),
            ]
        )
        for reply in (raw, forgotten, members):
            if isinstance(reply, Exception):
                with self._t._errors():
                    raise reply
        if raw is None:
            if forgotten:
                raise LookupError(f"service {self.service!r} was forgotten on {self._t.url}")
            self._lost(f"service {self.service!r} is not declared any more")
            await self._t._declare(self.service, self._prefixes)
            members = [w.encode() for w in await self._t._words()]
        else:
            self._prefixes = _load_prefixes(raw)
        self._words = sorted(w for w in map(_text, members) if _covers(self._prefixes, w))
        self._refreshed = time.monotonic()

    def _lost(self, what: str) -> None:
        if not self._lost_said:
            self._lost_said = True
            logger.error(
                "receiver %s: %s on %s (the broker lost its data: no persistence?); "
                "declaring it again",
                self.consumer,
                what,
                self._t.url,
            )

    async def _recover(self, problem: str) -> None:
        """A stream or group vanished: make the groups of every service covering
        the streams this receiver reads again (at ``$``)."""
        self._lost(problem)
        await self._refresh(force=True)
        await self._t._script(
            "repair",
            [self._t._streams_key, self._t._groups_key],
            [self._t.stream_key(""), *self._words],
        )
        self._cursors.clear()

    async def _read(self, count: int, block: float) -> list[Inbound]:
        if not self._words:
            if block > 0:
                await asyncio.sleep(block)
            return []
        client = cast(Any, self._t._redis())
        streams = {self._t.stream_key(w): ">" for w in self._words}
        block_ms = int(block * 1000)
        try:
            with self._t._errors():
                reply = await client.xreadgroup(
                    self.service,
                    self.consumer,
                    streams,
                    count=count,
                    block=block_ms if block_ms > 0 else None,
                )
        except _NoGroup as exc:
            await self._recover(str(exc))
            return []
        words = {self._t.stream_key(w): w for w in self._words}
        messages: list[Inbound] = []
        for key, entries in reply or []:
            word = words[_text(key)]
            for entry_id, fields in entries:
                messages.append(self._inbound(word, _text(entry_id), fields, 1))
        return messages

    async def _own_pending(self, limit: int) -> list[Inbound]:
        """This consumer's pending entries it holds no record of: a read whose
        reply the lost connection cut off delivered them here, and nobody would
        take them before the lease runs out. Their earlier delivery counts (2)."""
        if not self._words:
            return []
        client = cast(Any, self._t._redis())
        streams = {self._t.stream_key(w): "0" for w in self._words}
        try:
            with self._t._errors():
                reply = await client.xreadgroup(
                    self.service, self.consumer, streams, count=limit + len(self._held)
                )
        except _NoGroup as exc:
            await self._recover(str(exc))
            return []
        words = {self._t.stream_key(w): w for w in self._words}
        messages: list[Inbound] = []
        for key, entries in reply or []:
            word = words[_text(key)]
            for entry_id, fields in entries:
                if f"{word}/{_text(entry_id)}" in self._held or len(messages) >= limit:
                    continue
                messages.append(self._inbound(word, _text(entry_id), fields, 2))
        return messages

    async def _claim(self, limit: int) -> list[Inbound]:
        """Take over this service's entries idle past the lease (any consumer's)."""
        if not self._words:
            return []
        keys = [self._t.stream_key(w) for w in self._words]
        cursors = [self._cursors.get(w, "0-0") for w in self._words]
        try:
            reply = await self._t._script(
                "claim",
                keys,
                [self.service, self.consumer, self._lease_ms, limit, *cursors],
            )
        except _NoGroup as exc:
            await self._recover(str(exc))
            return []
        messages: list[Inbound] = []
        for word, (cursor, entries, deleted) in zip(self._words, reply, strict=True):
            self._cursors[word] = _text(cursor)
            if deleted:
                logger.error(
                    "receiver %s: %d entries of %s were deleted while pending (%s)",
                    self.consumer,
                    len(deleted),
                    self._t.stream_key(word),
                    ", ".join(map(_text, deleted[:5])),
                )
            for entry_id, fields, deliveries in entries:
                messages.append(
                    self._inbound(word, _text(entry_id), _field_dict(fields), int(deliveries))
                )
        return messages

    def _inbound(self, word: str, entry_id: str, fields: Any, deliveries: int) -> Inbound:
        receipt = f"{word}/{entry_id}"
        body = fields.get(b"e") if isinstance(fields, dict) else None
        if body is None:
            event, problem, body = None, "an entry without its body (field 'e')", b""
        else:
            try:
                event, problem = decode(body), None
            except ValueError as exc:
                event, problem = None, str(exc)
        self._held[receipt] = (word, entry_id, deliveries)
        return Inbound(event, body, problem, deliveries, receipt, token=(word, entry_id))

    async def ack(self, messages: Sequence[Inbound]) -> None:
        await self._settle(messages, "ack")
        for message in messages:
            self._held.pop(message.receipt, None)

    async def extend(self, messages: Sequence[Inbound]) -> None:
        await self._settle(messages, "extend")

    async def _settle(self, messages: Sequence[Inbound], mode: str) -> set[tuple[str, str]]:
        items = [(m.token[0], m.token[1], m.deliveries) for m in messages]
        touched: set[tuple[str, str]] = set()
        for start in range(0, len(items), _ACK_CHUNK):
            touched |= await self._settle_items(items[start : start + _ACK_CHUNK], mode)
        return touched

    async def _settle_items(
        self, items: Sequence[tuple[str, str, int]], mode: str
    ) -> set[tuple[str, str]]:
        """Run ``settle`` on (word, id, deliveries); the (word, id) it touched."""
        by_word: dict[str, list[tuple[str, int]]] = {}
        for word, entry_id, deliveries in items:
            by_word.setdefault(word, []).append((entry_id, deliveries))
        if not by_word:
            return set()
        args: list[Any] = [self.service, self.consumer, mode]
        for entries in by_word.values():
            args.append(len(entries))
            for entry_id, deliveries in entries:
                args += [entry_id, deliveries]
        args.append(_RELEASE_IDLE_MS)
        keys = [self._t.stream_key(w) for w in by_word]
        try:
            reply = await self._t._script("settle", keys, args)
        except _NoGroup:  # pragma: no cover - XPENDING runs under pcall
            return set()
        return {
            (word, _text(entry_id))
            for word, ids in zip(by_word, reply, strict=True)
            for entry_id in ids
        }

    async def close(self) -> None:
        """Give back what this consumer holds (idle at once: the next claim of any
        receiver of the service takes it), then stop."""
        held, self._held = list(self._held.values()), {}
        self._t._closed(self)
        with contextlib.suppress(TransportUnavailable, TransportUnusable):
            for start in range(0, len(held), _ACK_CHUNK):
                await self._settle_items(held[start : start + _ACK_CHUNK], "release")


# URLs and replies -----------------------------------------------------------------


def _parse(url: str) -> tuple[str, str]:
    """The stream prefix and the URL redis-py gets, or ``ValueError`` naming the URL."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ValueError(f"malformed Redis transport URL {shown!r}: {exc}") from None
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f"not a Redis transport URL: {shown!r}")
    if not parts.hostname:
        raise ValueError(f"malformed Redis transport URL {shown!r}: no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(
            f"malformed Redis transport URL {shown!r}: the path must be a database "
            f"number (redis://host:6379/0), got {parts.path!r}"
        )
    stream = _DEFAULT_STREAM
    rest: list[tuple[str, str]] = []
    unknown: list[str] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "stream":
            stream = value
        elif name in _REDIS_OPTIONS:
            rest.append((name, value))
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} in Redis transport URL {shown!r}: use "
            f"stream= or one of {', '.join(sorted(_REDIS_OPTIONS))}"
        )
    if not _STREAM.match(stream):
        raise ValueError(
            f"the stream option of {shown!r} must be letters, digits, '_', '.' or '-', "
            f"got {stream!r}"
        )
    redis_url = parts._replace(query=urlencode(rest)).geturl()
    try:
        aioredis.Redis.from_url(redis_url)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed Redis transport URL {shown!r}: {exc}") from None
    return stream, redis_url


def _prefix_list(patterns: Collection[str]) -> list[str]:
    prefixes = coarse_prefixes(patterns)
    return ["*"] if prefixes is None else sorted(prefixes)


def _load_prefixes(raw: Any) -> list[str]:
    try:
        loaded = json.loads(raw)
    except ValueError:
        return []
    return [str(p) for p in loaded] if isinstance(loaded, list) else []


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))


def _field_dict(flat: Sequence[Any]) -> dict[bytes, Any]:
    return {k if isinstance(k, bytes) else str(k).encode(): v for k, v in _pairs(flat)}


def _info_dict(reply: Any) -> dict[str, Any]:
    """One group of ``XINFO GROUPS`` (a flat list, or a dict) with text keys and names."""
    info = {_text(k): v for k, v in _pairs(reply)}
    for name in ("name", "last-delivered-id"):
        if name in info:
            info[name] = _text(info[name])
    return info


def _first(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
