"""The Redis store's admin half: browsing, counting, grouping, changing and deleting
retry items and dead letters, and control records.

Dead letters are indexed per value of each field one filters by (event type, handler,
reason, failure group, service, processed: sorted sets by ``created_at``; event id:
one lexicographic set). A query walks the most selective of the sets its filter names,
newest first, in one script: a page costs the members of that set up to the page's
last match, a count with at most one such set is a ``ZCOUNT`` (with several and no
time range or cursor, a ``ZINTERCARD``), and grouping without other conditions than
a time range and a cursor is a few ``O(log n)`` calls per group. A keyset cursor
(``DeadLetterFilter.cursor``) is a position in a set: the members after its score,
and those at its score with a smaller id (found by a binary search). Otherwise
counting and grouping walk every candidate of that set inside the script (admin
calls: about 3 to 4 µs per candidate, 50,000 candidates in about 0.2 s, during which
the server waits), as does a page deep into a filter naming several sets.

``group_retry`` has no index to use (the per-handler due sets that claims read are
scored by when an item can be claimed, not by its ``next_retry``; one per event type
would cost every retry): it reads the retry items in chunks of ``GROUP_CHUNK``, each
chunk consistent, the whole not a snapshot while workers change the queue. Listing
the retry items of one service walks the queue too (``CHUNK`` per script).

Neither has a record's kind (``RetryKind``) an index: it is the record's ``attempt``
(read from the front of its JSON, without decoding it) and its ``next_retry`` against
``now``. Listing by kind walks ``P:retry:next`` within the kind's time range only
(pending: due by now; scheduled: due after now), ``CHUNK`` items per script, up to the
page's last match; ``count_retry_kinds`` reads every item, ``GROUP_CHUNK`` per script,
as ``group_retry`` does (about 1 µs per item inside the script). An index of first
deliveries would make both ``O(log n)``, at the cost of a write on every publish and
every outcome and of a layout upgrade; the admin pages do not need it.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..._event import encode_json
from ..._filters import DeadLetterFilter
from ..._groups import GroupCount
from ..._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from .._newest import check_limit, newest_first
from ..base import (
    AdminStore,
    ControlRecord,
    DeadLetterField,
    RetryField,
    check_retry_kind,
)
from .codec import (
    dead_letter,
    dead_texts,
    from_score,
    lane,
    retry_from_reply,
    retry_json,
    strict,
    to_score,
)
from .common import CHUNK, pairs, text

__all__ = ["GROUP_CHUNK", "RedisAdmin"]

#: retry items read per ``group_retry`` script
GROUP_CHUNK = 2000

# the key name of each filter field's per-value zsets (see scripts.lua)
_DEAD_KEY_NAMES = {
    "event_type": "type",
    "handler_name": "handler",
    "reason": "reason",
    "failure_group": "group",
    "service": "service",
}


class RedisAdmin(AdminStore):
    """The ``AdminStore`` methods of ``RedisStore``, which inherits them and gives
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

    # retry queue -----------------------------------------------------------

    async def retry_count(self) -> int:
        return int(await self._command("HLEN", self._key("retry:items")))

    async def count_due(self, before: datetime) -> int:
        return int(
            await self._command("ZCOUNT", self._key("retry:next"), "-inf", f"({to_score(before)}")
        )

    async def get_retry(self, item_id: str) -> RetryItem | None:
        items = strict(retry_from_reply(await self._run("fetch_retry", item_id)))
        return items[0] if items else None

    async def list_retry(
        self,
        *,
        limit: int,
        offset: int,
        handler_name: str | None = None,
        event_type: str | None = None,
        kind: RetryKind | None = None,
        now: datetime | None = None,
        service: str | None = None,
    ) -> list[RetryItem]:
        check_retry_kind(kind, now)
        if limit <= 0:
            return []
        if handler_name is None and event_type is None and kind is None and service is None:
            reply = await self._run("page_retry", offset, offset + limit - 1)
            return strict(retry_from_reply(reply))
        # filtered: walk the queue in next_retry order (an admin listing, not a hot path),
        # with a kind only its time range, the script passing on that kind's items only
        score = "0" if now is None else to_score(now)
        found: list[RetryItem] = []
        skipped = 0
        start = 0
        while len(found) < limit:
            if kind is None:
                reply = await self._run("page_retry", start, start + CHUNK - 1)
                read = len(reply) // 5
            else:
                reply = await self._run("page_retry_kind", kind, score, start, CHUNK)
                read, reply = int(reply[0]), reply[1:]
            if not read:
                break
            for item in strict(retry_from_reply(reply)):
                if (
                    (handler_name is None or item.handler_name == handler_name)
                    and (event_type is None or item.event_type == event_type)
                    and (service is None or item.service == service)
                ):
                    if skipped < offset:
                        skipped += 1
                    elif len(found) < limit:
                        found.append(item)
            if read < CHUNK:
                break
            start += CHUNK
        return found

    async def count_retry_kinds(self, now: datetime) -> dict[RetryKind, int]:
        """Every item read, ``GROUP_CHUNK`` per script (see the module): O(queue
        length), and not a snapshot while workers change the queue."""
        counts = dict.fromkeys(RETRY_KINDS, 0)
        score = to_score(now)
        start = 0
        while True:
            reply = await self._run("count_kinds", score, start, start + GROUP_CHUNK - 1)
            for kind, count in zip(RETRY_KINDS, reply[1:], strict=True):
                counts[kind] += int(count)
            if int(reply[0]) < GROUP_CHUNK:
                return counts
            start += GROUP_CHUNK

    async def find_retry_ids(self, prefix: str, *, limit: int) -> list[str]:
        """An HSCAN of the retry items' hash: O(queue length), for a person's command."""
        return await self._find_ids("retry:items", prefix, limit)

    async def cancel_delivery(self, item_id: str, *, now: datetime) -> bool:
        return bool(await self._run("cancel_delivery", item_id, to_score(now)))

    async def delete_retry(self, item_id: str) -> bool:
        return bool(await self._run("delete_retry", item_id))

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        """Counted per value of ``by`` from the records themselves (there is no index
        per type, and the per-lane due sets are scored by when an item can be
        claimed, not by its ``next_retry``), ``GROUP_CHUNK`` items per script:
        O(queue length), and not a snapshot while workers change the queue."""
        if by not in ("handler_name", "event_type", "service"):
            raise ValueError(f"cannot group retry items by {by!r}")
        if limit <= 0:
            return []
        # key -> [count, earliest score, latest score, sample id]
        merged: dict[str, list[Any]] = {}
        start = 0
        while True:
            reply = await self._run("group_retry", by, start, start + GROUP_CHUNK - 1)
            for i in range(1, len(reply), 5):
                key = json.loads(f'"{text(reply[i])}"')
                count, first, last = int(reply[i + 1]), float(reply[i + 2]), float(reply[i + 3])
                sample = text(reply[i + 4])
                group = merged.get(key)
                if group is None:
                    merged[key] = [count, first, last, sample]
                    continue
                group[0] += count
                if (first, sample) < (group[1], group[3]):
                    group[1], group[3] = first, sample
                group[2] = max(group[2], last)
            if int(reply[0]) < GROUP_CHUNK:
                break
            start += GROUP_CHUNK
        groups = [
            GroupCount(key, count, from_score(repr(first)), from_score(repr(last)), sample)
            for key, (count, first, last, sample) in merged.items()
        ]
        groups.sort(key=lambda group: (-group.count, group.key))
        return groups[:limit]

    async def newest_failures(self, *, service: str | None = None, limit: int) -> list[RetryItem]:
        """Read from the records themselves, as ``group_retry`` is (no index holds
        ``updated_at``: every claim would write it), ``GROUP_CHUNK`` items per
        script: O(queue length), and not a snapshot while workers change the queue.
        The winners are read again whole at the end (one that has gone since is
        left out)."""
        check_limit(limit)
        # (service, handler) -> (updated_at text, id)
        newest: dict[tuple[str, str], tuple[str, str]] = {}
        start = 0
        while True:
            reply = await self._run(
                "newest_failures", service or "", start, start + GROUP_CHUNK - 1
            )
            for i in range(1, len(reply), 4):
                key = (text(reply[i]), text(reply[i + 1]))
                found = (text(reply[i + 2]), text(reply[i + 3]))
                known = newest.get(key)
                if known is None or found > known:
                    newest[key] = found
            if int(reply[0]) < GROUP_CHUNK:
                break
            start += GROUP_CHUNK
        if not newest:
            return []
        ids = [item_id for _, item_id in newest.values()]
        read = retry_from_reply(await self._run("fetch_retry", *ids))
        return newest_first((item for item in read if isinstance(item, RetryItem)), limit)

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
            "" if where.created_after is None else to_score(where.created_after),
            "" if where.created_before is None else to_score(where.created_before),
            where.event_id or "",
            "" if where.cursor is None else to_score(where.cursor[0]),
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
            dead_letter(text(reply[i]), text(reply[i + 1]))
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
                key=text(reply[i]),
                count=int(reply[i + 1]),
                first_at=from_score(reply[i + 2]),
                last_at=from_score(reply[i + 3]),
                sample_id=text(reply[i + 4]),
            )
            for i in range(0, len(reply), 5)
        ]
        groups.sort(key=lambda group: (-group.count, group.key))
        return groups[:limit]

    async def get_dead(self, item_id: str) -> DeadLetterItem | None:
        record = await self._command("HGET", self._key("dead:items"), item_id)
        return None if record is None else dead_letter(item_id, text(record))

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        """An HSCAN of the dead letters' hash: O(dead letters), for a person's command."""
        return await self._find_ids("dead:items", prefix, limit)

    async def _find_ids(self, name: str, prefix: str, limit: int) -> list[str]:
        """The fields of hash ``name`` that start with ``prefix`` (HSCAN), ascending."""
        if limit <= 0:
            return []
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        found: set[str] = set()
        cursor: Any = 0
        while True:
            cursor, flat = await self._command(
                "HSCAN", self._key(name), cursor, "MATCH", pattern, "COUNT", 1000
            )
            found.update(text(field) for field, _value in pairs(flat))
            if int(cursor) == 0:
                return sorted(found)[:limit]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        return bool(await self._run("update_dead", item.id, *dead_texts(item)))

    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        return bool(
            await self._run(
                "requeue_dead",
                item_id,
                retry_item.id,
                retry_json(retry_item),
                to_score(retry_item.next_retry),
                to_score(retry_item.created_at),
                lane(retry_item.service, retry_item.handler_name),
                retry_item.ordering_key or "",
            )
        )

    async def delete_dead(self, item_id: str) -> bool:
        return bool(await self._run("delete_dead", item_id))

    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        unique = list(dict.fromkeys(ids))
        deleted = 0
        for start in range(0, len(unique), CHUNK):
            deleted += int(await self._run("delete_dead_many", *unique[start : start + CHUNK]))
        return deleted

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
        record = encode_json(dict(value), f"control record {key!r}")
        written = int(await self._run("put_control", key, int(version), record))
        return written or None

    async def list_control(self, prefix: str) -> list[ControlRecord]:
        """From the sorted set of control keys (``ZRANGEBYLEX``), never ``KEYS``."""
        reply = await self._run("list_control", prefix)
        return [
            ControlRecord(text(reply[i]), int(reply[i + 1]), json.loads(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]

    async def delete_control(self, key: str) -> bool:
        return bool(await self._run("delete_control", key))
