"""The in-memory store: the bus's default, and the one to use in your own tests.

Everything lives in this process and is gone when it ends. Each operation runs
without awaiting in between, so on one event loop every operation is atomic.

It is the reference the other engines follow, their services part
(``ServiceStore``: subscriptions, worker heartbeats, loads) included.
"""

from __future__ import annotations

import copy
import heapq
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar

from .._event import encode_json
from .._filters import DeadLetterFilter
from .._groups import GroupCount
from .._outcomes import (
    CorruptRecord,
    Counters,
    DeadLettered,
    Outcome,
    Rescheduled,
    Succeeded,
)
from .._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from .._services import (
    HandlerLoad,
    Registration,
    StoredSubscription,
    WorkerBeat,
    check_subscriptions,
    compare_subscriptions,
    unsubscribed_reason,
)
from ._newest import check_limit, newest_first
from .base import (
    ControlRecord,
    DeadLetterField,
    RetryField,
    Store,
    check_retry_kind,
)

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """A store in a dict: fast, shared by everything in this process, not durable."""

    persistent: ClassVar[bool] = False

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._retry: dict[str, RetryItem] = {}
        self._dead: dict[str, DeadLetterItem] = {}
        self._counters = Counters()
        self._control: dict[str, ControlRecord] = {}
        # (service, handler_name) -> its subscription, tombstones included
        self._subscriptions: dict[tuple[str, str], StoredSubscription] = {}
        self._revision = 0
        self._workers: dict[str, WorkerBeat] = {}
        # a keyed record's sequence number (its ordering key's order), by id
        self._sequence: dict[str, int] = {}
        self._last_sequence = 0
        # remembered successes (the inbox): until when, by delivery id
        self._successes: dict[str, datetime] = {}

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def health(self) -> None:
        return None

    def _count(self, **deltas: int) -> None:
        current = self._counters
        self._counters = replace(
            current, **{name: getattr(current, name) + delta for name, delta in deltas.items()}
        )

    # retry queue -----------------------------------------------------------

    def _add(self, item: RetryItem) -> None:
        """Put a new record in the retry queue, numbered when it has an ordering key."""
        self._retry[item.id] = item
        if item.ordering_key is not None:
            self._last_sequence += 1
            self._sequence[item.id] = self._last_sequence

    def _heads(self) -> dict[tuple[str, str, str], int]:
        """The lowest sequence number of each (service, handler, ordering key) in
        the retry queue: only that record of a key may be claimed."""
        heads: dict[tuple[str, str, str], int] = {}
        live: dict[str, int] = {}
        for item_id, number in self._sequence.items():
            item = self._retry.get(item_id)
            if item is None:
                continue
            live[item_id] = number
            key = item.ordering_key
            if key is None:
                continue
            group = (item.service, item.handler_name, key)
            if number < heads.get(group, number + 1):
                heads[group] = number
        if len(live) != len(self._sequence):
            self._sequence = live  # forget the records that left
        return heads

    def _in_turn(self, item: RetryItem, heads: dict[tuple[str, str, str], int]) -> bool:
        """Whether no earlier record of ``item``'s ordering key holds it back."""
        key = item.ordering_key
        if key is None:
            return True
        number = self._sequence.get(item.id)
        return number is None or heads.get((item.service, item.handler_name, key)) == number

    async def record_failures(
        self, retry_items: Sequence[RetryItem], dead_letters: Sequence[DeadLetterItem]
    ) -> None:
        added = 0
        for item in retry_items:
            if item.id not in self._retry:  # a repeated write adds nothing twice
                self._add(item)
                added += 1
        for dead in dead_letters:
            self._dead.setdefault(dead.id, dead)
        if added:
            self._count(retry_added=added)

    async def record_pending(self, items: Sequence[RetryItem]) -> set[str]:
        added: set[str] = set()
        for item in items:
            if item.id not in self._retry:
                self._add(item)
                added.add(item.id)
        return added

    def _claimable(
        self, now: datetime, service: str | None, handlers: Collection[str] | None
    ) -> list[RetryItem]:
        heads = self._heads() if self._sequence else {}
        return [
            item
            for item in self._retry.values()
            if item.next_retry <= now
            and (item.lease_until is None or item.lease_until <= now)
            and (service is None or item.service == service)
            and (handlers is None or item.handler_name in handlers)
            and (not heads or self._in_turn(item, heads))
        ]

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
        due = heapq.nsmallest(
            limit,
            self._claimable(now, service, handlers),
            key=lambda item: (item.next_retry, item.id),
        )
        claimed: list[RetryItem | CorruptRecord] = []
        for item in due:
            leased = replace(
                item,
                lease_owner=owner,
                lease_until=lease_until,
                updated_at=now,
                claims=item.claims + 1,
            )
            self._retry[item.id] = leased
            claimed.append(leased)
        return claimed

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        extended = 0
        for item_id in ids:
            item = self._retry.get(item_id)
            if item is not None and item.lease_owner == owner:
                self._retry[item_id] = replace(item, lease_until=lease_until)
                extended += 1
        return extended

    async def release(self, ids: Sequence[str], owner: str) -> int:
        released = 0
        for item_id in ids:
            item = self._retry.get(item_id)
            if item is not None and item.lease_owner == owner:
                self._retry[item_id] = replace(
                    item, lease_owner=None, lease_until=None, claims=max(item.claims - 1, 0)
                )
                released += 1
        return released

    def _held(self, item_id: str, owner: str | None, now: datetime) -> RetryItem | None:
        item = self._retry.get(item_id)
        if item is None:
            return None
        if owner is None:
            leased = item.lease_until is not None and item.lease_until > now
            return None if leased else item
        return item if item.lease_owner == owner else None

    async def complete(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> set[str]:
        applied: set[str] = set()
        added = succeeded = attempts = dead_lettered = 0
        for outcome in outcomes:
            if isinstance(outcome, Succeeded):
                held = self._held(outcome.item.id, owner, now)
                if held is None:
                    continue
                del self._retry[held.id]
                if not held.first_delivery:
                    succeeded += 1
                    attempts += held.attempt
                applied.add(held.id)
            elif isinstance(outcome, Rescheduled):
                if self._held(outcome.item.id, owner, now) is None:
                    continue
                self._retry[outcome.item.id] = replace(
                    outcome.item, lease_owner=None, lease_until=None, claims=0
                )
                added += outcome.first_delivery
                applied.add(outcome.item.id)
            elif isinstance(outcome, DeadLettered):
                if self._held(outcome.item_id, owner, now) is None:
                    continue
                del self._retry[outcome.item_id]
                self._dead.setdefault(outcome.dead_letter.id, outcome.dead_letter)
                dead_lettered += not outcome.first_delivery
                applied.add(outcome.item_id)
        if applied:
            self._count(
                retry_added=added,
                retry_succeeded=succeeded,
                retry_succeeded_attempts=attempts,
                retry_dead_lettered=dead_lettered,
            )
        return applied

    async def next_due(
        self, handlers: Collection[str] | None = None, *, service: str | None = None
    ) -> datetime | None:
        heads = self._heads() if self._sequence else {}
        times = [
            max(item.next_retry, item.lease_until) if item.lease_until else item.next_retry
            for item in self._retry.values()
            if (handlers is None or item.handler_name in handlers)
            and (service is None or item.service == service)
            and (not heads or self._in_turn(item, heads))
        ]
        return min(times, default=None)

    async def retry_count(self) -> int:
        return len(self._retry)

    async def count_due(self, before: datetime) -> int:
        return sum(1 for item in self._retry.values() if item.next_retry < before)

    async def get_retry(self, item_id: str) -> RetryItem | None:
        return self._retry.get(item_id)

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
        items = [
            item
            for item in self._retry.values()
            if (handler_name is None or item.handler_name == handler_name)
            and (event_type is None or item.event_type == event_type)
            and (service is None or item.service == service)
            # check_retry_kind: now is given unless kind is None or "retry"
            and (kind is None or item.kind(now or item.next_retry) == kind)
        ]
        items.sort(key=lambda item: (item.next_retry, item.id))
        return items[offset : offset + limit]

    async def count_retry_kinds(self, now: datetime) -> dict[RetryKind, int]:
        counts = dict.fromkeys(RETRY_KINDS, 0)
        for item in self._retry.values():
            counts[item.kind(now)] += 1
        return counts

    async def find_retry_ids(self, prefix: str, *, limit: int) -> list[str]:
        return sorted(item_id for item_id in self._retry if item_id.startswith(prefix))[:limit]

    async def cancel_delivery(self, item_id: str, *, now: datetime) -> bool:
        item = self._retry.get(item_id)
        if item is None or not item.first_delivery or item.leased_at(now):
            return False
        del self._retry[item_id]
        return True

    async def delete_retry(self, item_id: str) -> bool:
        return self._retry.pop(item_id, None) is not None

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        moved: list[DeadLetterItem] = []
        for item in list(self._retry.values()):
            if (
                item.created_at < before
                and (not item.first_delivery or item.next_retry < before)
                and (item.lease_until is None or item.lease_until <= now)
            ):
                dead = item.to_dead_letter(reason=reason, now=now, attempt=max(item.attempt - 1, 0))
                del self._retry[item.id]
                self._dead.setdefault(dead.id, dead)
                moved.append(dead)
        if moved:
            self._count(retry_dead_lettered=len(moved))
        return moved

    # dead letter queue -----------------------------------------------------

    async def list_dead(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterItem]:
        items = [item for item in self._dead.values() if where.matches(item)]
        items.sort(key=lambda item: (item.created_at, item.id), reverse=True)
        return items[offset : offset + limit]

    async def count_dead(self, where: DeadLetterFilter) -> int:
        return sum(1 for item in self._dead.values() if where.matches(item))

    async def group_dead(
        self, by: DeadLetterField, where: DeadLetterFilter, *, limit: int
    ) -> list[GroupCount]:
        matching = (item for item in self._dead.values() if where.matches(item))
        return _group(
            matching,
            key=lambda item: str(getattr(item, by)),
            moment=lambda item: item.created_at,
            sample=lambda item: (item.created_at, item.id),
            newest=True,
            limit=limit,
        )

    async def get_dead(self, item_id: str) -> DeadLetterItem | None:
        return self._dead.get(item_id)

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        return sorted(item_id for item_id in self._dead if item_id.startswith(prefix))[:limit]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        if item.id not in self._dead:
            return False
        self._dead[item.id] = item
        return True

    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        if self._dead.pop(item_id, None) is None:
            return False
        self._add(retry_item)
        self._count(retry_added=1)
        return True

    async def delete_dead(self, item_id: str) -> bool:
        return self._dead.pop(item_id, None) is not None

    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        return sum(1 for item_id in set(ids) if self._dead.pop(item_id, None) is not None)

    async def cleanup_dead(self, before: datetime) -> int:
        old = [item_id for item_id, item in self._dead.items() if item.created_at < before]
        for item_id in old:
            del self._dead[item_id]
        return len(old)

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        return _group(
            self._retry.values(),
            key=lambda item: str(getattr(item, by)),
            moment=lambda item: item.next_retry,
            sample=lambda item: (item.next_retry, item.id),
            newest=False,
            limit=limit,
        )

    async def newest_failures(self, *, service: str | None = None, limit: int) -> list[RetryItem]:
        check_limit(limit)
        newest: dict[tuple[str, str], RetryItem] = {}
        for item in self._retry.values():
            if item.attempt == 0 or (service is not None and item.service != service):
                continue
            key = (item.service, item.handler_name)
            known = newest.get(key)
            if known is None or (item.updated_at, item.id) > (known.updated_at, known.id):
                newest[key] = item
        return newest_first(newest.values(), limit)

    async def counters(self) -> Counters:
        return self._counters

    # the inbox ---------------------------------------------------------------

    async def remember_successes(self, ids: Sequence[str], until: datetime) -> None:
        successes = self._successes
        for delivery_id in ids:
            known = successes.get(delivery_id)
            if known is None or known < until:
                successes[delivery_id] = until

    async def remembered(self, ids: Collection[str], now: datetime) -> set[str]:
        successes = self._successes
        return {i for i in ids if (until := successes.get(i)) is not None and until > now}

    async def forget_successes(self, before: datetime) -> int:
        old = [i for i, until in self._successes.items() if until <= before]
        for delivery_id in old:
            del self._successes[delivery_id]
        return len(old)

    # control records -------------------------------------------------------

    async def get_control(self, key: str) -> ControlRecord | None:
        record = self._control.get(key)
        return None if record is None else replace(record, value=copy.deepcopy(record.value))

    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        current = self._control.get(key)
        if (current.version if current else 0) != version:
            return None
        # a JSON round trip, as the other engines store it
        stored = json.loads(encode_json(dict(value), f"control record {key!r}"))
        self._control[key] = ControlRecord(key, version + 1, stored)
        return version + 1

    async def list_control(self, prefix: str) -> list[ControlRecord]:
        return [
            replace(record, value=copy.deepcopy(record.value))
            for key, record in sorted(self._control.items())
            if key.startswith(prefix)
        ]

    async def delete_control(self, key: str) -> bool:
        return self._control.pop(key, None) is not None

    # services --------------------------------------------------------------

    def _stored(
        self, terms: StoredSubscription, *, registered_at: datetime, now: datetime, revision: int
    ) -> StoredSubscription:
        """``terms`` as stored: live, changed ``now`` at ``revision``, its details a
        JSON round trip (as the other engines keep them)."""
        details = json.loads(encode_json(dict(terms.details), f"details of {terms.handler_name}"))
        return replace(
            terms,
            registered_at=registered_at,
            updated_at=now,
            removed_at=None,
            removed_by=None,
            revision=revision,
            details=details,
        )

    def _tombstone(
        self, current: StoredSubscription, *, now: datetime, actor: str, revision: int
    ) -> StoredSubscription:
        return replace(current, removed_at=now, removed_by=actor, updated_at=now, revision=revision)

    async def put_subscriptions(
        self,
        service: str,
        subscriptions: Sequence[StoredSubscription],
        *,
        prune: bool,
        now: datetime,
        actor: str,
    ) -> Registration:
        check_subscriptions(service, subscriptions)
        revision = self._revision + 1
        stored = {h: sub for (s, h), sub in self._subscriptions.items() if s == service}
        changes = compare_subscriptions(stored, subscriptions, prune=prune)
        for terms, since in changes.puts:
            self._subscriptions[terms.key] = self._stored(
                terms, registered_at=now if since is None else since, now=now, revision=revision
            )
        for name in changes.removed:
            self._subscriptions[service, name] = self._tombstone(
                stored[name], now=now, actor=actor, revision=revision
            )
        if changes.writes:
            self._revision = revision
        return changes.registration

    async def remove_subscriptions(
        self, service: str, handlers: Collection[str] | None, *, now: datetime, actor: str
    ) -> list[str]:
        revision = self._revision + 1
        removed: list[str] = []
        for key, current in sorted(self._subscriptions.items()):
            if (
                key[0] == service
                and not current.removed
                and (handlers is None or key[1] in handlers)
            ):
                self._subscriptions[key] = self._tombstone(
                    current, now=now, actor=actor, revision=revision
                )
                removed.append(key[1])
        if removed:
            self._revision = revision
        return removed

    async def list_subscriptions(
        self, service: str | None = None, *, removed: bool = False
    ) -> list[StoredSubscription]:
        return [
            # details of their own, as the other engines' are
            replace(subscription, details=copy.deepcopy(subscription.details))
            for key, subscription in sorted(self._subscriptions.items())
            if (service is None or key[0] == service) and (removed or not subscription.removed)
        ]

    async def subscriptions_revision(self) -> int:
        return self._revision

    async def forget_subscriptions(self, before: datetime) -> int:
        old = [
            key
            for key, subscription in self._subscriptions.items()
            if subscription.removed_at is not None and subscription.removed_at < before
        ]
        for key in old:
            del self._subscriptions[key]
        return len(old)

    async def dead_letter_unsubscribed(self, *, now: datetime, limit: int) -> list[DeadLetterItem]:
        removed = {key: sub for key, sub in self._subscriptions.items() if sub.removed}
        if not removed or limit < 1:
            return []
        orphans = heapq.nsmallest(
            limit,
            (
                item
                for item in self._retry.values()
                if (item.service, item.handler_name) in removed and not item.leased_at(now)
            ),
            key=lambda item: (item.next_retry, item.id),
        )
        moved: list[DeadLetterItem] = []
        for item in orphans:
            tombstone = removed[(item.service, item.handler_name)]
            reason = unsubscribed_reason(
                item.service, item.handler_name, tombstone.removed_by or "unknown"
            )
            dead = item.to_dead_letter(reason=reason, now=now, attempt=max(item.attempt - 1, 0))
            del self._retry[item.id]
            self._dead.setdefault(dead.id, dead)
            moved.append(dead)
        if moved:
            self._count(retry_dead_lettered=len(moved))
        return moved

    async def beat(self, beat: WorkerBeat) -> None:
        self._workers[beat.name] = beat

    async def forget_worker(self, name: str) -> bool:
        return self._workers.pop(name, None) is not None

    async def list_workers(self, service: str | None = None) -> list[WorkerBeat]:
        beats = [beat for beat in self._workers.values() if service in (None, beat.service)]
        beats.sort(key=lambda beat: (beat.service, beat.name))
        return beats

    async def prune_workers(self, before: datetime) -> int:
        old = [name for name, beat in self._workers.items() if beat.last_seen < before]
        for name in old:
            del self._workers[name]
        return len(old)

    async def service_loads(self, now: datetime) -> list[HandlerLoad]:
        counts: dict[tuple[str, str], dict[str, Any]] = {}

        def load(service: str, handler_name: str) -> dict[str, Any]:
            return counts.setdefault((service, handler_name), {"oldest_pending_due": None})

        for item in self._retry.values():
            entry = load(item.service, item.handler_name)
            kind = item.kind(now)
            name = "retrying" if kind == "retry" else kind
            entry[name] = entry.get(name, 0) + 1
            if item.leased_at(now):
                entry["leased"] = entry.get("leased", 0) + 1
            oldest = entry["oldest_pending_due"]
            if kind == "pending" and (oldest is None or item.next_retry < oldest):
                entry["oldest_pending_due"] = item.next_retry
        for dead in self._dead.values():
            entry = load(dead.service, dead.handler_name)
            which = "dead_processed" if dead.processed else "dead_unprocessed"
            entry[which] = entry.get(which, 0) + 1
        return [
            HandlerLoad(service=service, handler_name=handler_name, **entry)
            for (service, handler_name), entry in sorted(counts.items())
        ]


def _group(
    items: Iterable[Any],
    *,
    key: Callable[[Any], str],
    moment: Callable[[Any], datetime],
    sample: Callable[[Any], tuple[datetime, str]],
    newest: bool,
    limit: int,
) -> list[GroupCount]:
    """Count ``items`` per ``key``; the sample is the newest (or earliest) by ``sample``."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        value = key(item)
        moment_of = moment(item)
        group = groups.get(value)
        if group is None:
            groups[value] = [1, moment_of, moment_of, item]
            continue
        group[0] += 1
        group[1] = min(group[1], moment_of)
        group[2] = max(group[2], moment_of)
        better = sample(item) > sample(group[3]) if newest else sample(item) < sample(group[3])
        if better:
            group[3] = item
    counted = [
        GroupCount(value, count, first, last, chosen.id)
        for value, (count, first, last, chosen) in groups.items()
    ]
    counted.sort(key=lambda group: (-group.count, group.key))
    return counted[:limit]
