"""The Redis store's services half (issue 12, key layout 4): the subscriptions each
service keeps, its workers' heartbeats, moving what waits for a removed handler to
the dead letter queue, and what waits for each (service, handler).

Subscriptions are one hash, ``P:subs``: field ``S NUL H``, value a JSON object whose
last member is the subscription's terms (patterns, policy, max_retries,
handler_timeout, details) as canonical JSON (sorted keys, compact), so that a script
tells "unchanged" by comparing text. ``P:subs:revision`` is the revision, taken by
``INCR`` at a script's first write (one per call) and never lowered. Each write is one
script (``put_subscriptions``, ``remove_subscriptions``, ``forget_subscriptions``).

Heartbeats are ``P:workers`` (worker name -> JSON) and ``P:workers:seen`` (name ->
last seen), written together by one script; pruning reads the sorted set.

``dead_letter_unsubscribed`` is shaped like ``expire_retry``: a read-only script
finds the tombstones and, in each tombstoned lane's due set, the first items no live
lease holds; the dead letters are made here (their failure group is Python's); a
second script moves each item still as it was read, unleased, and whose
subscription is still a tombstone. Within one lane the candidates come in the due
set's order (when each can be claimed: an item whose lease ran out is placed by the
lease's end, not its ``next_retry``); the batch is then sorted by ``next_retry``.

``service_loads`` walks the retry queue as ``count_retry_kinds`` does (``GROUP_CHUNK``
items per script: O(queue length), not a snapshot while workers change it) and
counts the dead letters of each (service, handler) with ``ZINTERCARD`` of the
per-value sets (Redis 7; a walk of each service's set otherwise).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from ..._event import compact_json, encode_json
from ..._outcomes import CorruptRecord, corrupt_to_dead_letter
from ..._records import DeadLetterItem
from ..._services import (
    HandlerLoad,
    Registration,
    StoredSubscription,
    WorkerBeat,
    check_subscriptions,
    unsubscribed_reason,
)
from .._codec import parse_text_time, text_time
from ..base import ServiceStore
from . import admin
from .codec import dead_texts, decode_retry, from_score, split_lane, to_score
from .common import pairs, text

__all__ = ["RedisServices"]

_canonical = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True
).encode


class RedisServices(ServiceStore):
    """The ``ServiceStore`` methods of ``RedisStore``, which inherits them and gives
    them its scripts and commands (``_run``, ``_command``, ``_key``)."""

    @abc.abstractmethod
    async def _run(self, script: str, *args: Any) -> Any:
        """Run one script of ``scripts.lua`` with every key and (prefix, *args)."""

    @abc.abstractmethod
    async def _command(self, name: str, *args: Any) -> Any:
        """Run one Redis command."""

    @abc.abstractmethod
    def _key(self, name: str) -> str:
        """The key ``name`` under the store's prefix."""

    @abc.abstractmethod
    async def _upgrade_layout(self) -> None:
        """Bring the key layout up to date, once per store object."""

    # subscriptions ---------------------------------------------------------

    async def put_subscriptions(
        self,
        service: str,
        subscriptions: Sequence[StoredSubscription],
        *,
        prune: bool,
        now: datetime,
        actor: str,
    ) -> Registration:
        """One script (``put_subscriptions``): each row compared by its terms' text,
        written only when it changes (see the module)."""
        check_subscriptions(service, subscriptions)
        args: list[Any] = []
        for terms in subscriptions:
            args += (terms.handler_name, _terms_json(terms))
        reply = await self._run(
            "put_subscriptions",
            service,
            _json_time(now),
            compact_json(actor),
            "1" if prune else "0",
            len(subscriptions),
            *args,
        )
        flags = text(reply[0])
        done: dict[str, list[str]] = {"a": [], "c": [], "u": []}
        for terms, flag in zip(subscriptions, flags, strict=True):
            done[flag].append(terms.handler_name)
        return Registration(
            added=tuple(sorted(done["a"])),
            changed=tuple(sorted(done["c"])),
            removed=tuple(sorted(text(name) for name in reply[1:])),
            unchanged=tuple(sorted(done["u"])),
        )

    async def remove_subscriptions(
        self, service: str, handlers: Collection[str] | None, *, now: datetime, actor: str
    ) -> list[str]:
        names = [] if handlers is None else list(dict.fromkeys(handlers))
        reply = await self._run(
            "remove_subscriptions",
            service,
            _json_time(now),
            compact_json(actor),
            -1 if handlers is None else len(names),
            *names,
        )
        return sorted(text(name) for name in reply)

    async def list_subscriptions(
        self, service: str | None = None, *, removed: bool = False
    ) -> list[StoredSubscription]:
        """One ``HGETALL`` of ``P:subs`` (a row per handler of each service)."""
        found: list[StoredSubscription] = []
        for field, row in pairs(await self._command("HGETALL", self._key("subs"))):
            owner, _, handler_name = text(field).partition("\0")
            if service is not None and owner != service:
                continue
            subscription = _subscription(owner, handler_name, json.loads(row))
            if removed or not subscription.removed:
                found.append(subscription)
        found.sort(key=lambda subscription: subscription.key)
        return found

    async def subscriptions_revision(self) -> int:
        revision = await self._command("GET", self._key("subs:revision"))
        return 0 if revision is None else int(revision)

    async def forget_subscriptions(self, before: datetime) -> int:
        return int(await self._run("forget_subscriptions", text_time(before)))

    async def dead_letter_unsubscribed(self, *, now: datetime, limit: int) -> list[DeadLetterItem]:
        """Two scripts, as ``expire_retry`` (see the module)."""
        if limit < 1:
            return []
        reply = await self._run("unsubscribed_candidates", to_score(now), limit)
        count = int(reply[0])
        removed_by: dict[str, str] = {}
        for i in range(1, 1 + 2 * count, 2):
            removed_by[text(reply[i])] = json.loads(reply[i + 1])["removed_by"] or "unknown"
        candidates = [
            (text(reply[i]), text(reply[i + 1]), text(reply[i + 2]), text(reply[i + 3]))
            for i in range(1 + 2 * count, len(reply), 4)
        ]
        candidates.sort(key=lambda c: (float(c[2]) if c[2] else float("inf"), c[0]))
        letters: dict[str, DeadLetterItem] = {}
        args: list[Any] = []
        for item_id, record, _due, key in candidates[:limit]:
            owner, _, handler_name = key.partition("\0")
            reason = unsubscribed_reason(owner, handler_name, removed_by[key])
            decoded = decode_retry(item_id, record)
            letter = (
                corrupt_to_dead_letter(decoded, now, reason)
                if isinstance(decoded, CorruptRecord)
                else decoded.to_dead_letter(
                    reason=reason, now=now, attempt=max(decoded.attempt - 1, 0)
                )
            )
            letters[item_id] = letter
            args += (item_id, record, key, letter.id, *dead_texts(letter))
        if not args:
            return []
        done = {
            text(item_id) for item_id in await self._run("unsubscribed_move", to_score(now), *args)
        }
        return [letter for item_id, letter in letters.items() if item_id in done]

    # heartbeats ------------------------------------------------------------

    async def beat(self, beat: WorkerBeat) -> None:
        record = compact_json(
            {
                "service": beat.service,
                "host": beat.host,
                "pid": beat.pid,
                "started_at": text_time(beat.started_at),
                "last_seen": text_time(beat.last_seen),
                "interval": beat.interval,
                "lanes": beat.lanes,
                "lanes_busy": beat.lanes_busy,
                "handlers": list(beat.handlers),
                "version": beat.version,
            }
        )
        await self._run("beat", beat.name, record, to_score(beat.last_seen))

    async def forget_worker(self, name: str) -> bool:
        return bool(await self._run("forget_worker", name))

    async def list_workers(self, service: str | None = None) -> list[WorkerBeat]:
        """One ``HGETALL`` of ``P:workers``."""
        beats = [
            _beat(text(name), json.loads(record))
            for name, record in pairs(await self._command("HGETALL", self._key("workers")))
        ]
        found = [beat for beat in beats if service in (None, beat.service)]
        found.sort(key=lambda beat: (beat.service, beat.name))
        return found

    async def prune_workers(self, before: datetime) -> int:
        return int(await self._run("prune_workers", to_score(before)))

    # loads -----------------------------------------------------------------

    async def service_loads(self, now: datetime) -> list[HandlerLoad]:
        """The retry queue walked ``GROUP_CHUNK`` items per script, then one script
        for the dead letters (see the module)."""
        await self._upgrade_layout()  # the dead letters' service index
        counts: dict[tuple[str, str], dict[str, Any]] = {}

        def load(key: tuple[str, str]) -> dict[str, Any]:
            return counts.setdefault(key, {})

        score = to_score(now)
        start = 0
        while True:
            chunk = admin.GROUP_CHUNK
            reply = await self._run("retry_loads", score, start, start + chunk - 1)
            for i in range(1, len(reply), 6):
                entry = load(split_lane(text(reply[i])))
                for offset, name in enumerate(("retrying", "pending", "scheduled", "leased"), 1):
                    if int(reply[i + offset]):
                        entry[name] = entry.get(name, 0) + int(reply[i + offset])
                oldest = text(reply[i + 5])
                if oldest:
                    due = from_score(oldest)
                    if entry.get("oldest_pending_due") is None or due < entry["oldest_pending_due"]:
                        entry["oldest_pending_due"] = due
            if int(reply[0]) < chunk:
                break
            start += chunk
        reply = await self._run("dead_loads")
        for i in range(0, len(reply), 4):
            entry = load((text(reply[i]), text(reply[i + 1])))
            if int(reply[i + 2]):
                entry["dead_unprocessed"] = int(reply[i + 2])
            if int(reply[i + 3]):
                entry["dead_processed"] = int(reply[i + 3])
        return [
            HandlerLoad(service=service, handler_name=handler_name, **entry)
            for (service, handler_name), entry in sorted(counts.items())
        ]


def _json_time(moment: datetime) -> str:
    """A time as the JSON text the subscription rows keep (``text_time``)."""
    return f'"{text_time(moment)}"'


def _terms_json(terms: StoredSubscription) -> str:
    """A subscription's terms as canonical JSON (the scripts compare the text)."""
    details = json.loads(encode_json(dict(terms.details), f"details of {terms.handler_name}"))
    timeout = terms.handler_timeout
    return _canonical(
        {
            "patterns": list(terms.patterns),
            "policy": terms.policy,
            "max_retries": int(terms.max_retries),
            "handler_timeout": None if timeout is None else float(timeout),
            "details": details,
        }
    )


def _subscription(service: str, handler_name: str, row: dict[str, Any]) -> StoredSubscription:
    """A stored subscription row (see the module) as a ``StoredSubscription``."""
    terms = row["terms"]
    removed_at = row["removed_at"]
    return StoredSubscription(
        service=service,
        handler_name=handler_name,
        patterns=tuple(terms["patterns"]),
        policy=terms["policy"],
        max_retries=terms["max_retries"],
        handler_timeout=terms["handler_timeout"],
        registered_at=parse_text_time(row["registered_at"]),
        updated_at=parse_text_time(row["updated_at"]),
        removed_at=None if removed_at is None else parse_text_time(removed_at),
        removed_by=row["removed_by"],
        revision=int(row["revision"]),
        details=terms["details"],
    )


def _beat(name: str, record: dict[str, Any]) -> WorkerBeat:
    return WorkerBeat(
        name=name,
        service=record["service"],
        host=record["host"],
        pid=record["pid"],
        started_at=parse_text_time(record["started_at"]),
        last_seen=parse_text_time(record["last_seen"]),
        interval=record["interval"],
        lanes=record["lanes"],
        lanes_busy=record["lanes_busy"],
        handlers=tuple(record["handlers"]),
        version=record["version"],
    )
