"""The Redis store class: its client, its scripts, its errors, its pub/sub watch and
the hot half of the protocol (what publish and the workers use on every delivery).

Every write is one script of ``scripts.lua``, run with every key of ``KEY_NAMES`` and
the prefix: atomic, and one round trip. The admin half is ``RedisAdmin``
(``admin.py``) and the services half ``RedisServices`` (``services.py``), which
``RedisStore`` inherits.

Services (key layout 4): a record carries its service, and each (service, handler)
has a due set of its own, its lane (``codec.lane``): a claim or ``next_due`` for a
service and its handlers reads those lanes' sets only, so that no service's backlog
is read by another's claims. The default service's lanes are the due sets layout 3
keeps per handler: nothing moved, and a process of layout 3 still running keeps
claiming its handlers' (default-service) items.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.commands.core import AsyncScript
from redis.exceptions import DataError, RedisError

from ..._errors import RecordRejected, RetrybusError, StoreUnavailable
from ..._outcomes import (
    CorruptRecord,
    Counters,
    DeadLettered,
    Outcome,
    Rescheduled,
    Succeeded,
    corrupt_to_dead_letter,
)
from ..._rate import check_take
from ..._records import DeadLetterItem, RetryItem
from .._codec import text_time
from .._queries import load_queries
from .._url import redact, split
from ..base import Store
from .admin import RedisAdmin
from .codec import dead_texts, decode_retry, from_score, lane, retry_json, to_score
from .common import CHUNK, pairs, text
from .migrate import upgrade_layout
from .services import RedisServices

__all__ = ["KEY_NAMES", "RedisStore"]

_LUA = load_queries("scripts.lua", __package__)
_HELPERS = _LUA.pop("helpers")
_SUBSCRIPTION_HELPERS = _LUA.pop("subscription_helpers")
#: the scripts that get the subscription helpers too (the others do not define them:
#: each helper a script defines costs every call of it)
SUBSCRIPTION_SCRIPTS = frozenset(
    {
        "put_subscriptions",
        "remove_subscriptions",
        "forget_subscriptions",
        "unsubscribed_candidates",
        "unsubscribed_move",
    }
)
#: the KEYS every script gets, in this order (suffixes of the prefix)
KEY_NAMES = (
    "retry:items",
    "retry:next",
    "retry:ready",
    "retry:leased",
    "retry:created",
    "retry:claims",
    "counters",
    "dead:items",
    "dead:created",
    "dead:index",
    "dead:events",
    "retry:handler_of",
    "retry:handlers",
    "retry:claim_count",
    "subs",
    "subs:revision",
    "workers",
    "workers:seen",
)
#: the inbox's remembered successes (a sorted set; no script uses it)
_SUCCESSES = "inbox:successes"
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]+$")
_WATCH_RETRY = 1.0
_CONNECT_TIMEOUT = 5.0  # seconds, unless the URL says socket_connect_timeout=
# the query options redis-py understands in a URL, plus ours (prefix)
_REDIS_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {
    "client_name",
    "username",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
}
# what Redis answers to a value larger than it keeps (proto-max-bulk-len, 512 MB)
_REFUSED_DATA = ("exceeds maximum allowed size", "invalid bulk length")


class RedisStore(RedisAdmin, RedisServices, Store):
    """Both queues in Redis (``redis://host:6379/0?prefix=retrybus``)."""

    def __init__(self, url: str, *, redis_url: str | None = None, prefix: str = "retrybus") -> None:
        if not _PREFIX.match(prefix):
            raise ValueError(
                f"the key prefix of {redact(url)!r} must be letters, digits, '_', '.' "
                f"or '-', got {prefix!r}"
            )
        self.url = redact(url)
        self.prefix = prefix
        self._redis_url = redis_url or url
        self._keys = [f"{prefix}:{name}" for name in KEY_NAMES]
        self.channel = f"{prefix}:changes"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._layout_ready = False
        # fail now on a URL redis-py cannot use
        self._new_client()

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """The store ``redis://host:6379/0?prefix=NAME`` names (or ``rediss://``); the
        other query options are redis-py's."""
        parts = split(url)
        if parts.scheme.lower() not in ("redis", "rediss"):
            raise ValueError(f"not a Redis store URL: {redact(url)!r}")
        if not parts.hostname:
            raise ValueError(f"malformed Redis store URL {redact(url)!r}: no host")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(
                f"malformed Redis store URL {redact(url)!r}: the path must be a database "
                f"number (redis://host:6379/0), got {parts.path!r}"
            )
        options = parse_qsl(parts.query, keep_blank_values=True)
        prefix = "retrybus"
        rest: list[tuple[str, str]] = []
        for name, value in options:
            if name == "prefix":
                prefix = value
            elif name in _REDIS_OPTIONS:
                rest.append((name, value))
            else:
                raise ValueError(
                    f"unknown option {name!r} in Redis store URL {redact(url)!r}: use prefix= "
                    f"or one of redis-py's ({', '.join(sorted(_REDIS_OPTIONS))})"
                )
        redis_url = parts._replace(query=urlencode(rest)).geturl()
        return cls(url, redis_url=redis_url, prefix=prefix)

    def _new_client(self) -> aioredis.Redis:
        try:
            return aioredis.Redis.from_url(
                self._redis_url, decode_responses=False, socket_connect_timeout=_CONNECT_TIMEOUT
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"malformed Redis store URL {self.url!r}: {exc}") from None

    # connection ------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            client = self._new_client()
            self._scripts = {
                name: client.register_script(_script(name, body)) for name, body in _LUA.items()
            }
            self._client = client
        return self._client

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreUnavailable(f"Redis store {self.url} is unavailable: {message}")

    def _failure(self, exc: BaseException) -> RetrybusError:
        """``RecordRejected`` for data Redis (or its client) refuses, which no retry
        would change; ``StoreUnavailable`` for everything else."""
        message = str(exc)
        if isinstance(exc, DataError | UnicodeError) or any(
            sign in message for sign in _REFUSED_DATA
        ):
            first = message.splitlines()[0] if message else type(exc).__name__
            return RecordRejected(f"Redis store {self.url} refused the data: {first}")
        return self._unavailable(exc)

    async def connect(self) -> None:
        await self.health()
        await self._upgrade_layout()

    async def migrate(self) -> int | None:
        """Upgrade the key layout now, and index by service every dead letter a
        process of layout 3 wrote or changed, whatever the quick check on connect
        says (``migrate.upgrade_layout``): run it once the last process of layout 3
        has stopped."""
        await self.health()
        await upgrade_layout(
            self._command, self._run, self._key, thorough=True, name=f"Redis store {self.url}"
        )
        self._layout_ready = True
        return await self.schema_version()

    async def _upgrade_layout(self) -> None:
        """Bring the key layout up to ``LAYOUT_VERSION`` (``migrate.upgrade_layout``),
        once per store object."""
        if self._layout_ready:
            return
        await upgrade_layout(self._command, self._run, self._key, name=f"Redis store {self.url}")
        self._layout_ready = True

    async def close(self) -> None:
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def health(self) -> None:
        try:
            await self._redis().ping()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def _run(self, script: str, *args: Any) -> Any:
        """Run one script of ``scripts.lua`` with every key and (prefix, *args)."""
        client = self._redis()
        try:
            return await self._scripts[script](
                keys=self._keys, args=[self.prefix, *args], client=client
            )
        except (RedisError, OSError, UnicodeError) as exc:
            raise self._failure(exc) from exc

    async def _command(self, name: str, *args: Any) -> Any:
        client = self._redis()
        try:
            return await cast(Any, client).execute_command(name, *args)
        except (RedisError, OSError, UnicodeError) as exc:
            raise self._failure(exc) from exc

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def watch(self, on_change: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """Subscribe to the prefix's channel: every add of a retry item or of an
        unleased (deferred) pending delivery, reschedule, release and requeue
        publishes on it, and ``on_change()`` is called for each message."""
        ready = asyncio.Event()
        task = asyncio.create_task(self._listen(on_change, ready), name=f"retrybus-watch-{self}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready.wait()), 2.0)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

        return stop

    async def _listen(self, on_change: Callable[[], None], ready: asyncio.Event) -> None:
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self._redis().pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                ready.set()
                on_change()  # something may have changed while we were not listening
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None:
                        on_change()
            except (RedisError, OSError):
                ready.set()
                await asyncio.sleep(_WATCH_RETRY)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(cast(Any, pubsub).aclose())

    # retry queue -----------------------------------------------------------

    async def record_failures(
        self, retry_items: Sequence[RetryItem], dead_letters: Sequence[DeadLetterItem]
    ) -> None:
        if not retry_items and not dead_letters:
            return
        args: list[Any] = [len(retry_items), len(dead_letters)]
        for item in retry_items:
            args += _item_args(item)
        for dead in dead_letters:
            args += (dead.id, *dead_texts(dead))
        await self._run("record_failures", *args)

    async def record_pending(self, items: Sequence[RetryItem]) -> set[str]:
        """One script for the whole batch (``record_pending``): each id not stored yet
        is added with its indexes; the reply is one character per item (added or
        not), not the ids. Publishes on the channel only when an unleased one was
        added."""
        if not items:
            return set()
        args: list[Any] = []
        for item in items:
            args += _item_args(item)
        flags = text(await self._run("record_pending", *args))
        return {item.id for item, flag in zip(items, flags, strict=True) if flag == "1"}

    async def claim_due(
        self,
        *,
        now: datetime,
        limit: int,
        owner: str,
        lease_until: datetime,
        service: str | None = None,
        handlers: Collection[str] | None = None,
    ) -> list[RetryItem | CorruptRecord]:
        """One script: the front of each of the lanes' due sets (``P:retry:due:L``:
        the service's handlers'; without a service or handlers, of every lane that
        matches, from ``P:retry:handlers``), merged by due time, so that no other
        lane's items are read."""
        if limit <= 0 or (handlers is not None and not handlers):
            return []
        await self._upgrade_layout()  # the due sets are layout 3's
        touched = text_time(now)
        reply = await self._run(
            "claim_due",
            to_score(now),
            limit,
            owner,
            to_score(lease_until),
            touched,
            *_lane_args(service, handlers),
        )
        # the lease is what the script wrote; exact times come from the arguments
        return [
            decode_retry(
                text(reply[i]), text(reply[i + 1]), owner, lease_until, touched, int(reply[i + 2])
            )
            for i in range(0, len(reply), 3)
        ]

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        if not ids:
            return 0
        return int(await self._run("extend_leases", owner, to_score(lease_until), *ids))

    async def release(self, ids: Sequence[str], owner: str) -> int:
        if not ids:
            return 0
        return int(await self._run("release", owner, *ids))

    async def complete(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> set[str]:
        if not outcomes:
            return set()
        succeeded: list[Any] = []
        rescheduled: list[Any] = []
        dead: list[Any] = []
        for outcome in outcomes:
            if isinstance(outcome, Succeeded):
                succeeded += (outcome.item.id, outcome.item.attempt)
            elif isinstance(outcome, Rescheduled):
                item = outcome.item
                rescheduled += (
                    item.id,
                    retry_json(item),
                    to_score(item.next_retry),
                    lane(item.service, item.handler_name),
                    _flag(outcome.first_delivery),
                )
            elif isinstance(outcome, DeadLettered):
                letter = outcome.dead_letter
                dead += (
                    outcome.item_id,
                    letter.id,
                    *dead_texts(letter),
                    _flag(outcome.first_delivery),
                )
        reply = await self._run(
            "complete",
            "0" if owner is None else "1",
            owner or "",
            to_score(now),
            len(succeeded) // 2,
            len(rescheduled) // 5,
            len(dead) // 5,
            *succeeded,
            *rescheduled,
            *dead,
        )
        return {text(item_id) for item_id in reply}

    async def next_due(
        self, handlers: Collection[str] | None = None, *, service: str | None = None
    ) -> datetime | None:
        """The first entry of each of the lanes' due sets (one script; without a
        service or handlers, of every lane that matches, from ``P:retry:handlers``)."""
        if handlers is not None and not handlers:
            return None
        await self._upgrade_layout()
        score = await self._run("next_due", *_lane_args(service, handlers))
        return None if score is None else from_score(score)

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        moved: list[DeadLetterItem] = []
        offset = 0
        while True:
            reply = await self._run(
                "expire_candidates", to_score(before), to_score(now), offset, CHUNK
            )
            scanned = int(reply[0])
            args: list[Any] = []
            letters: dict[str, DeadLetterItem] = {}
            for i in range(1, len(reply), 2):
                item_id, record = text(reply[i]), text(reply[i + 1])
                if not record:
                    continue
                decoded = decode_retry(item_id, record)
                letter = (
                    corrupt_to_dead_letter(decoded, now, reason)
                    if isinstance(decoded, CorruptRecord)
                    else decoded.to_dead_letter(
                        reason=reason, now=now, attempt=max(decoded.attempt - 1, 0)
                    )
                )
                letters[item_id] = letter
                args += (item_id, record, letter.id, *dead_texts(letter))
            reply = await self._run("expire_move", to_score(now), *args) if args else []
            done = {text(item_id) for item_id in reply}
            moved.extend(letter for item_id, letter in letters.items() if item_id in done)
            if scanned < CHUNK:
                break
            offset += scanned - len(done)
        return moved

    async def cleanup_dead(self, before: datetime) -> int:
        total = 0
        while True:
            deleted = int(await self._run("cleanup_dead", to_score(before), CHUNK))
            total += deleted
            if deleted < CHUNK:
                return total

    # the inbox: a sorted set of delivery ids scored by until when they are
    # remembered (ZADD GT and ZMSCORE: Redis 6.2+); reads compare the score with
    # now, and the worker's maintenance prunes what has expired

    async def remember_successes(self, ids: Sequence[str], until: datetime) -> None:
        if not ids:
            return
        score = to_score(until)
        members: list[str] = []
        for delivery_id in dict.fromkeys(ids):
            members += (score, delivery_id)
        await self._command("ZADD", self._key(_SUCCESSES), "GT", *members)

    async def remembered(self, ids: Collection[str], now: datetime) -> set[str]:
        if not ids:
            return set()
        wanted = list(ids)
        scores = await self._command("ZMSCORE", self._key(_SUCCESSES), *wanted)
        at = float(to_score(now))
        return {
            delivery_id
            for delivery_id, score in zip(wanted, scores, strict=True)
            if score is not None and float(score) > at
        }

    async def forget_successes(self, before: datetime) -> int:
        key = self._key(_SUCCESSES)
        return int(await self._command("ZREMRANGEBYSCORE", key, "-inf", to_score(before)))

    async def take_tokens(
        self, key: str, *, want: int, rate: float, burst: float, now: datetime
    ) -> int:
        """The token bucket in one script (``take_tokens``): one round trip, atomic."""
        check_take(want, rate, burst)
        if want == 0:
            return 0
        return int(
            await self._run(
                "take_tokens",
                key,
                want,
                repr(float(rate)),
                repr(float(burst)),
                repr(now.timestamp()),
            )
        )

    async def counters(self) -> Counters:
        values = await self._command("HGETALL", self._key("counters"))
        got = {text(name): int(value) for name, value in pairs(values)}
        return Counters(**{name: got.get(name, 0) for name in Counters.__dataclass_fields__})


def _script(name: str, body: str) -> str:
    """Script ``name`` of ``scripts.lua`` as it is registered: the helpers, then the
    subscription helpers if it keeps subscriptions, then its body."""
    if name in SUBSCRIPTION_SCRIPTS:
        return f"{_HELPERS}\n{_SUBSCRIPTION_HELPERS}\n{body}"
    return f"{_HELPERS}\n{body}"


def _item_args(item: RetryItem) -> tuple[Any, ...]:
    """What ``record_failures`` and ``record_pending`` take of a new item: id, record,
    next_retry, created_at, lane, claim (time and owner) or '', lease end or '',
    claims, ordering key or ''."""
    return (
        item.id,
        retry_json(item),
        to_score(item.next_retry),
        to_score(item.created_at),
        lane(item.service, item.handler_name),
        "" if item.lease_owner is None else text_time(item.updated_at) + item.lease_owner,
        "" if item.lease_until is None else to_score(item.lease_until),
        item.claims,
        item.ordering_key or "",
    )


def _lane_args(service: str | None, handlers: Collection[str] | None) -> list[Any]:
    """A script's lane arguments (``lane_args`` in ``scripts.lua``): the service
    ('': any), how many handlers (-1: every handler) and their names."""
    if handlers is None:
        return ["" if service is None else service, -1]
    names = list(dict.fromkeys(handlers))
    return ["" if service is None else service, len(names), *names]


def _flag(value: bool) -> str:
    return "1" if value else "0"
