"""The Redis store (``redis://host:6379/0``): both queues in a Redis server, for many
workers on many machines.

Every write is one Lua script (``redis.lua``), so each is atomic and one round trip:
claiming a batch, completing a batch, moving to the dead letter queue, requeueing,
expiring and cleaning up. Records are JSON strings in hashes keyed by id; sorted sets
index them by time (see the top of ``redis.lua`` for every key). All times come from
the caller's ``now`` (never the server's clock), and nothing is ever expired by Redis:
retention is ``cleanup`` only.

Dead letters are indexed per value of each field one filters by (event type, handler,
reason, failure group, processed: sorted sets by ``created_at``; event id: one
lexicographic set). A query walks the most selective of the sets its filter names,
newest first, in one script: a page costs the members of that set up to the page's
last match, a count with at most one such set is a ``ZCOUNT`` (with several and no
time range or cursor, a ``ZINTERCARD``), and grouping without other conditions than
a time range and a cursor is a few ``O(log n)`` calls per group. A keyset cursor
(``DeadLetterFilter.cursor``) is a position in a set: the members after its score,
and those at its score with a smaller id (found by a binary search). Otherwise counting and grouping walk
every candidate of that set inside the script (admin calls: about 3 to 4 µs per
candidate, 50,000 candidates in about 0.2 s, during which the server waits), as does
a page deep into a filter naming several sets.
``group_retry`` has no index to use (adding one would cost every retry): it reads the
retry items in chunks of ``_GROUP_CHUNK``, each chunk consistent, the whole not a
snapshot while workers change the queue.

The key layout has a version (``P:schema``). Version 2 added the reason, failure
group and event id indexes; dead letters written by version 1 get them on first use
(``connect()`` or the first dead letter query), in batches, by ``backfill_dead``.

Options: ``?prefix=NAME`` (default ``retrybus``) puts every key under ``NAME:``, so
several buses share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.commands.core import AsyncScript
from redis.exceptions import DataError, RedisError

from .._errors import RecordRejected, RetrybusError, StoreUnavailable
from .._event import compact_json, encode_json
from .._filters import DeadLetterFilter
from .._groups import GroupCount
from .._outcomes import (
    CorruptRecord,
    Counters,
    DeadLettered,
    Outcome,
    Rescheduled,
    Succeeded,
    corrupt_to_dead_letter,
)
from .._records import DeadLetterItem, RetryItem
from ._codec import parse_text_time as _dt
from ._codec import parse_text_time_or_none as _dt_or_none
from ._codec import text_time as _ts
from ._codec import text_time_or_none as _ts_or_none
from ._queries import load_queries
from ._url import redact, split
from .base import (
    ControlRecord,
    DeadLetterField,
    RetryField,
    Store,
)

__all__ = ["RedisStore"]

_LUA = load_queries("redis.lua")
_HELPERS = _LUA.pop("helpers")
# the KEYS every script gets, in this order (suffixes of the prefix)
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
)
#: the version of the key layout this module writes (see ``_upgrade_layout``)
LAYOUT_VERSION = 2
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]+$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_CHUNK = 500
_GROUP_CHUNK = 2000  # retry items read per group_retry script
_WATCH_RETRY = 1.0
_STAMP = 32  # characters of a claim time (ISO, UTC, microseconds) in retry:claims
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


# times -------------------------------------------------------------------------


def _score(moment: datetime) -> str:
    """Epoch seconds as the text of a float: distinct microseconds give distinct,
    ordered floats (until the year 2255), and ``_from_score`` gives the time back."""
    if moment.tzinfo is None:
        raise ValueError(f"stored times must be timezone-aware, got {moment!r}")
    return repr(((moment - _EPOCH) // _MICROSECOND) / 1e6)


def _from_score(text: str | bytes) -> datetime:
    return _EPOCH + timedelta(microseconds=round(float(text) * 1e6))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """The field, value pairs of a hash reply: a dict (redis-py's response callbacks)
    or, in RESP2 without them, a flat list."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))


# records -----------------------------------------------------------------------


def _retry_json(item: RetryItem) -> str:
    # "attempt", "id", "handler_name", "event_type" first, in this order: the scripts
    # read them with an anchored pattern, without decoding (complete, group_retry)
    return compact_json(
        {
            "attempt": item.attempt,
            "id": item.id,
            "handler_name": item.handler_name,
            "event_type": item.event_type,
            "event_id": item.event_id,
            "event_data": item.event_data,
            "event_source": item.event_source,
            "event_timestamp": _ts(item.event_timestamp),
            "event_subject": item.event_subject,
            "event_extensions": dict(item.event_extensions),
            "error": item.error,
            "error_type": item.error_type,
            "traceback": item.traceback,
            "max_retries": item.max_retries,
            "next_retry": _ts(item.next_retry),
            "created_at": _ts(item.created_at),
            "updated_at": _ts(item.updated_at),
            "metadata": dict(item.metadata),
        }
    )


def _dead_json(item: DeadLetterItem) -> str:
    return compact_json(
        {
            "id": item.id,
            "event_id": item.event_id,
            "event_type": item.event_type,
            "event_data": item.event_data,
            "event_source": item.event_source,
            "event_timestamp": _ts(item.event_timestamp),
            "event_subject": item.event_subject,
            "event_extensions": dict(item.event_extensions),
            "handler_name": item.handler_name,
            "error": item.error,
            "error_type": item.error_type,
            "traceback": item.traceback,
            "attempt": item.attempt,
            "max_retries": item.max_retries,
            "reason": item.reason,
            "processed": item.processed,
            "created_at": _ts(item.created_at),
            "processed_at": _ts_or_none(item.processed_at),
            "first_failed_at": _ts_or_none(item.first_failed_at),
            "metadata": dict(item.metadata),
        }
    )


def _dead_index(item: DeadLetterItem) -> str:
    """What the scripts need to index a dead letter, without decoding its record
    (the failure group is computed here: Lua cannot)."""
    return compact_json(
        [
            item.event_type,
            item.handler_name,
            int(item.processed),
            _score(item.created_at),
            item.reason,
            item.failure_group,
            item.event_id,
        ]
    )


# the key name of each filter field's per-value zsets (see redis.lua)
_DEAD_KEY_NAMES = {
    "event_type": "type",
    "handler_name": "handler",
    "reason": "reason",
    "failure_group": "group",
}


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object: {value!r:.80}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string: {value!r:.80}")
    return value


def _retry_from_record(
    record: Mapping[str, Any],
    owner: str | None,
    lease_until: datetime | None,
    touched: str | None,
) -> RetryItem:
    subject = record.get("event_subject")
    return RetryItem(
        id=_str(record["id"], "id"),
        event_id=_str(record["event_id"], "event_id"),
        event_type=_str(record["event_type"], "event_type"),
        event_data=record["event_data"],
        event_source=_str(record["event_source"], "event_source"),
        event_timestamp=_dt(record["event_timestamp"]),
        event_subject=None if subject is None else _str(subject, "event_subject"),
        event_extensions=_object(record.get("event_extensions", {}), "event_extensions"),
        handler_name=_str(record["handler_name"], "handler_name"),
        error=_str(record.get("error", ""), "error"),
        error_type=_str(record.get("error_type", ""), "error_type"),
        traceback=_str(record.get("traceback", ""), "traceback"),
        attempt=int(record["attempt"]),
        max_retries=int(record["max_retries"]),
        next_retry=_dt(record["next_retry"]),
        created_at=_dt(record["created_at"]),
        updated_at=_dt(touched if touched is not None else record["updated_at"]),
        lease_owner=owner,
        lease_until=lease_until,
        metadata=_object(record.get("metadata", {}), "metadata"),
    )


def _decode_retry(
    item_id: str,
    text: str,
    owner: str | None = None,
    lease_until: datetime | None = None,
    touched: str | None = None,
) -> RetryItem | CorruptRecord:
    """The item stored as ``text``, or a ``CorruptRecord`` saying why it cannot be."""
    record: Any = None
    try:
        record = json.loads(text)
        return _retry_from_record(_object(record, "the record"), owner, lease_until, touched)
    except Exception as exc:  # any decoding failure makes the record a dead letter
        if isinstance(record, dict):
            raw = {
                str(key): None if value is None else _raw_text(value)
                for key, value in record.items()
            }
            raw.setdefault("id", item_id)
        else:
            raw = {"id": item_id, "record": text}
        return CorruptRecord(id=item_id, raw=raw, problem=f"{type(exc).__name__}: {exc}")


def _raw_text(value: Any) -> str:
    return value if isinstance(value, str) else compact_json(value)


def _dead_from_text(item_id: str, text: str) -> DeadLetterItem:
    """A dead letter as stored; a damaged one is still shown, its record as text."""
    try:
        record = _object(json.loads(text), "the record")
        subject = record.get("event_subject")
        return DeadLetterItem(
            id=_str(record["id"], "id"),
            event_id=_str(record["event_id"], "event_id"),
            event_type=_str(record["event_type"], "event_type"),
            event_data=record["event_data"],
            event_source=_str(record["event_source"], "event_source"),
            event_timestamp=_dt(record["event_timestamp"]),
            event_subject=None if subject is None else _str(subject, "event_subject"),
            event_extensions=_object(record.get("event_extensions", {}), "event_extensions"),
            handler_name=_str(record["handler_name"], "handler_name"),
            error=_str(record.get("error", ""), "error"),
            error_type=_str(record.get("error_type", ""), "error_type"),
            traceback=_str(record.get("traceback", ""), "traceback"),
            attempt=int(record["attempt"]),
            max_retries=int(record.get("max_retries", 0)),
            reason=_str(record["reason"], "reason"),
            processed=bool(record.get("processed", False)),
            created_at=_dt(record["created_at"]),
            processed_at=_dt_or_none(record.get("processed_at")),
            first_failed_at=_dt_or_none(record.get("first_failed_at")),
            metadata=_object(record.get("metadata", {}), "metadata"),
        )
    except Exception as exc:
        return DeadLetterItem(
            id=item_id,
            event_id="",
            event_type="unknown",
            event_data=text,
            event_source="",
            event_timestamp=_EPOCH,
            handler_name="unknown",
            error=f"{type(exc).__name__}: {exc}",
            attempt=0,
            reason="undecodable dead letter",
            created_at=_EPOCH,
            metadata={"undecodable": True},
        )


def _retry_from_reply(reply: Sequence[Any]) -> list[RetryItem | CorruptRecord]:
    """Items from a ``fetch_retry``-shaped reply: (id, json, claim, lease_until) each,
    a claim being the claim's time (32 characters) and the lease owner, if any."""
    items: list[RetryItem | CorruptRecord] = []
    for start in range(0, len(reply), 4):
        item_id, text, claim, lease = reply[start : start + 4]
        if text is None:
            continue
        touched = owner = None
        if claim is not None:
            claim = _text(claim)
            touched, owner = claim[:_STAMP], claim[_STAMP:] or None
        items.append(
            _decode_retry(
                _text(item_id),
                _text(text),
                owner,
                None if lease is None else _from_score(lease),
                touched,
            )
        )
    return items


def _strict(records: list[RetryItem | CorruptRecord]) -> list[RetryItem]:
    items: list[RetryItem] = []
    for record in records:
        if isinstance(record, CorruptRecord):
            raise ValueError(f"stored retry item {record.id!r} cannot be decoded: {record.problem}")
        items.append(record)
    return items


# the store ---------------------------------------------------------------------


# what Redis answers to a value larger than it keeps (proto-max-bulk-len, 512 MB)
_REFUSED_DATA = ("exceeds maximum allowed size", "invalid bulk length")


class RedisStore(Store):
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
                name: client.register_script(f"{_HELPERS}\n{body}") for name, body in _LUA.items()
            }
            self._client = client
        return self._client

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreUnavailable(f"Redis store {self.url} is unavailable: {message}")

    def _failure(self, exc: BaseException) -> RetrybusError:
        """``RecordRejected`` for data Redis (or its client) refuses, which no retry
        would change; ``StoreUnavailable`` for everything else."""
        text = str(exc)
        if isinstance(exc, DataError | UnicodeError) or any(sign in text for sign in _REFUSED_DATA):
            message = text.splitlines()[0] if text else type(exc).__name__
            return RecordRejected(f"Redis store {self.url} refused the data: {message}")
        return self._unavailable(exc)

    async def connect(self) -> None:
        await self.health()
        await self._upgrade_layout()

    async def _upgrade_layout(self) -> None:
        """Bring the dead letter indexes written by an older version of this module up
        to ``LAYOUT_VERSION`` (once per store object; safe to run in several processes
        at once: each batch re-indexes only entries still as read).

        Layout 1 indexed dead letters by type, handler and processed only; layout 2
        adds reason, failure group and event id. The missing fields come from each
        dead letter's record, ``_CHUNK`` at a time (HSCAN of ``P:dead:index``).
        """
        if self._layout_ready:
            return
        version = await self._command("GET", self._key("schema"))
        if version is None or int(version) < LAYOUT_VERSION:
            cursor: Any = 0
            while True:
                cursor, flat = await self._command(
                    "HSCAN", self._key("dead:index"), cursor, "COUNT", _CHUNK
                )
                old: dict[str, tuple[str, list[Any]]] = {}
                for field, value in _pairs(flat):
                    index = json.loads(value)
                    if len(index) < 7:
                        old[_text(field)] = (_text(value), index)
                if old:
                    texts = await self._command("HMGET", self._key("dead:items"), *old)
                    args: list[Any] = []
                    for (item_id, (raw, index)), text in zip(old.items(), texts, strict=True):
                        if text is None:
                            continue
                        item = _dead_from_text(item_id, _text(text))
                        new = [*index[:4], item.reason, item.failure_group, item.event_id]
                        args += (item_id, raw, compact_json(new))
                    if args:
                        await self._run("backfill_dead", *args)
                if int(cursor) == 0:
                    break
            await self._command("SET", self._key("schema"), LAYOUT_VERSION)
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
        """Run one script of ``redis.lua`` with every key and (prefix, *args)."""
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
        """Subscribe to the prefix's channel: every add, reschedule, release and
        requeue publishes on it, and ``on_change()`` is called for each message."""
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
            args += (
                item.id,
                _retry_json(item),
                _score(item.next_retry),
                _score(item.created_at),
                "" if item.lease_owner is None else _ts(item.updated_at) + item.lease_owner,
                "" if item.lease_until is None else _score(item.lease_until),
            )
        for dead in dead_letters:
            args += (dead.id, _dead_json(dead), _dead_index(dead))
        await self._run("record_failures", *args)

    async def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_until: datetime
    ) -> list[RetryItem | CorruptRecord]:
        if limit <= 0:
            return []
        touched = _ts(now)
        reply = await self._run(
            "claim_due", _score(now), limit, owner, _score(lease_until), touched
        )
        # the lease is what the script wrote; exact times come from the arguments
        return [
            _decode_retry(_text(reply[i]), _text(reply[i + 1]), owner, lease_until, touched)
            for i in range(0, len(reply), 2)
        ]

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        if not ids:
            return 0
        return int(await self._run("extend_leases", owner, _score(lease_until), *ids))

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
                rescheduled += (item.id, _retry_json(item), _score(item.next_retry))
            elif isinstance(outcome, DeadLettered):
                letter = outcome.dead_letter
                dead += (outcome.item_id, letter.id, _dead_json(letter), _dead_index(letter))
        reply = await self._run(
            "complete",
            "0" if owner is None else "1",
            owner or "",
            _score(now),
            len(succeeded) // 2,
            len(rescheduled) // 3,
            len(dead) // 4,
            *succeeded,
            *rescheduled,
            *dead,
        )
        return {_text(item_id) for item_id in reply}

    async def next_due(self) -> datetime | None:
        score = await self._run("next_due")
        return None if score is None else _from_score(score)

    async def retry_count(self) -> int:
        return int(await self._command("HLEN", self._key("retry:items")))

    async def count_due(self, before: datetime) -> int:
        return int(
            await self._command("ZCOUNT", self._key("retry:next"), "-inf", f"({_score(before)}")
        )

    async def get_retry(self, item_id: str) -> RetryItem | None:
        items = _strict(_retry_from_reply(await self._run("fetch_retry", item_id)))
        return items[0] if items else None

    async def list_retry(
        self,
        *,
        limit: int,
        offset: int,
        handler_name: str | None = None,
        event_type: str | None = None,
    ) -> list[RetryItem]:
        if limit <= 0:
            return []
        if handler_name is None and event_type is None:
            reply = await self._run("page_retry", offset, offset + limit - 1)
            return _strict(_retry_from_reply(reply))
        # filtered: walk the queue in next_retry order (an admin listing, not a hot path)
        found: list[RetryItem] = []
        skipped = 0
        start = 0
        while len(found) < limit:
            reply = await self._run("page_retry", start, start + _CHUNK - 1)
            if not reply:
                break
            for item in _strict(_retry_from_reply(reply)):
                if (handler_name is None or item.handler_name == handler_name) and (
                    event_type is None or item.event_type == event_type
                ):
                    if skipped < offset:
                        skipped += 1
                    elif len(found) < limit:
                        found.append(item)
            start += _CHUNK
        return found

    async def delete_retry(self, item_id: str) -> bool:
        return bool(await self._run("delete_retry", item_id))

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        moved: list[DeadLetterItem] = []
        offset = 0
        while True:
            reply = await self._run(
                "expire_candidates", _score(before), _score(now), offset, _CHUNK
            )
            scanned = int(reply[0])
            args: list[Any] = []
            letters: dict[str, DeadLetterItem] = {}
            for i in range(1, len(reply), 2):
                item_id, text = _text(reply[i]), _text(reply[i + 1])
                if not text:
                    continue
                record = _decode_retry(item_id, text)
                letter = (
                    corrupt_to_dead_letter(record, now, reason)
                    if isinstance(record, CorruptRecord)
                    else record.to_dead_letter(reason=reason, now=now, attempt=record.attempt - 1)
                )
                letters[item_id] = letter
                args += (item_id, text, letter.id, _dead_json(letter), _dead_index(letter))
            reply = await self._run("expire_move", _score(now), *args) if args else []
            done = {_text(item_id) for item_id in reply}
            moved.extend(letter for item_id, letter in letters.items() if item_id in done)
            if scanned < _CHUNK:
                break
            offset += scanned - len(done)
        return moved

    # dead letter queue -----------------------------------------------------

    def _filter_args(self, where: DeadLetterFilter) -> list[Any]:
        """A filter as the scripts' ``dead_filter`` reads it."""
        sets = [
            self._key(f"dead:{name}:{value}")
            for field, name in _DEAD_KEY_NAMES.items()
            if (value := getattr(where, field)) is not None
        ]
        if where.processed is not None:
            sets.append(self._key(f"dead:processed:{int(where.processed)}"))
        return [
            "" if where.created_after is None else _score(where.created_after),
            "" if where.created_before is None else _score(where.created_before),
            where.event_id or "",
            "" if where.cursor is None else _score(where.cursor[0]),
            "" if where.cursor is None else where.cursor[1],
            len(sets),
            *sets,
        ]

    async def list_dead(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterItem]:
        """Dead letters matching ``where``, newest first, from the most selective of
        the index sets the filter names (see the module)."""
        if limit <= 0:
            return []
        await self._upgrade_layout()
        reply = await self._run("list_dead", max(offset, 0), limit, *self._filter_args(where))
        return [
            _dead_from_text(_text(reply[i]), _text(reply[i + 1]))
            for i in range(0, len(reply), 2)
            if reply[i + 1] is not None
        ]

    async def count_dead(self, where: DeadLetterFilter) -> int:
        """A ``ZCOUNT`` when the filter names at most one index set (and no event id),
        a ``ZINTERCARD`` for several without a time range; otherwise a walk of the most
        selective one (see the module)."""
        await self._upgrade_layout()
        return int(await self._run("count_dead", *self._filter_args(where)))

    async def group_dead(
        self, by: DeadLetterField, where: DeadLetterFilter, *, limit: int
    ) -> list[GroupCount]:
        """Counted per value of ``by`` in one script: from the per-value sets when the
        filter has no other condition than a time range (and ``by``'s own value),
        otherwise by walking the matching dead letters' index entries (see the module)."""
        name = _DEAD_KEY_NAMES.get(by)
        if name is None:
            raise ValueError(f"cannot group dead letters by {by!r}")
        if limit <= 0:
            return []
        await self._upgrade_layout()
        own = getattr(where, by)
        reply = await self._run("group_dead", name, own or "", *self._filter_args(where))
        groups = [
            GroupCount(
                key=_text(reply[i]),
                count=int(reply[i + 1]),
                first_at=_from_score(reply[i + 2]),
                last_at=_from_score(reply[i + 3]),
                sample_id=_text(reply[i + 4]),
            )
            for i in range(0, len(reply), 5)
        ]
        groups.sort(key=lambda group: (-group.count, group.key))
        return groups[:limit]

    async def get_dead(self, item_id: str) -> DeadLetterItem | None:
        text = await self._command("HGET", self._key("dead:items"), item_id)
        return None if text is None else _dead_from_text(item_id, _text(text))

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        """An HSCAN of the dead letters' hash: O(dead letters), for a person's command."""
        if limit <= 0:
            return []
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        found: set[str] = set()
        cursor: Any = 0
        while True:
            cursor, flat = await self._command(
                "HSCAN", self._key("dead:items"), cursor, "MATCH", pattern, "COUNT", 1000
            )
            found.update(_text(field) for field, _value in _pairs(flat))
            if int(cursor) == 0:
                return sorted(found)[:limit]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        return bool(await self._run("update_dead", item.id, _dead_json(item), _dead_index(item)))

    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        return bool(
            await self._run(
                "requeue_dead",
                item_id,
                retry_item.id,
                _retry_json(retry_item),
                _score(retry_item.next_retry),
                _score(retry_item.created_at),
            )
        )

    async def delete_dead(self, item_id: str) -> bool:
        return bool(await self._run("delete_dead", item_id))

    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        unique = list(dict.fromkeys(ids))
        deleted = 0
        for start in range(0, len(unique), _CHUNK):
            deleted += int(await self._run("delete_dead_many", *unique[start : start + _CHUNK]))
        return deleted

    async def cleanup_dead(self, before: datetime) -> int:
        total = 0
        while True:
            deleted = int(await self._run("cleanup_dead", _score(before), _CHUNK))
            total += deleted
            if deleted < _CHUNK:
                return total

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        """Counted per value of ``by`` from the records themselves (there is no index
        per handler or type: it would cost every add), ``_GROUP_CHUNK`` items per
        script: O(queue length), and not a snapshot while workers change the queue."""
        if by not in ("handler_name", "event_type"):
            raise ValueError(f"cannot group retry items by {by!r}")
        if limit <= 0:
            return []
        # key -> [count, earliest score, latest score, sample id]
        merged: dict[str, list[Any]] = {}
        start = 0
        while True:
            reply = await self._run("group_retry", by, start, start + _GROUP_CHUNK - 1)
            for i in range(1, len(reply), 5):
                key = json.loads(f'"{_text(reply[i])}"')
                count, first, last = int(reply[i + 1]), float(reply[i + 2]), float(reply[i + 3])
                sample = _text(reply[i + 4])
                group = merged.get(key)
                if group is None:
                    merged[key] = [count, first, last, sample]
                    continue
                group[0] += count
                if (first, sample) < (group[1], group[3]):
                    group[1], group[3] = first, sample
                group[2] = max(group[2], last)
            if int(reply[0]) < _GROUP_CHUNK:
                break
            start += _GROUP_CHUNK
        groups = [
            GroupCount(key, count, _from_score(repr(first)), _from_score(repr(last)), sample)
            for key, (count, first, last, sample) in merged.items()
        ]
        groups.sort(key=lambda group: (-group.count, group.key))
        return groups[:limit]

    # control records -------------------------------------------------------

    async def get_control(self, key: str) -> ControlRecord | None:
        version, value = await self._command(
            "HMGET", self._key(f"control:rec:{key}"), "version", "value"
        )
        if version is None or value is None:
            return None
        return ControlRecord(key, int(version), json.loads(value))

    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        """Compare-and-set in one script (``put_control``): atomic across processes."""
        if not isinstance(value, Mapping):
            raise TypeError(f"control record {key!r} must be a JSON object, got {value!r:.80}")
        text = encode_json(dict(value), f"control record {key!r}")
        written = int(await self._run("put_control", key, int(version), text))
        return written or None

    async def list_control(self, prefix: str) -> list[ControlRecord]:
        """From the sorted set of control keys (``ZRANGEBYLEX``), never ``KEYS``."""
        reply = await self._run("list_control", prefix)
        return [
            ControlRecord(_text(reply[i]), int(reply[i + 1]), json.loads(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]

    async def delete_control(self, key: str) -> bool:
        return bool(await self._run("delete_control", key))

    async def counters(self) -> Counters:
        values = await self._command("HGETALL", self._key("counters"))
        got = {_text(name): int(value) for name, value in _pairs(values)}
        return Counters(**{name: got.get(name, 0) for name in Counters.__dataclass_fields__})
