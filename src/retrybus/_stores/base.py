"""The store protocol: what every engine (memory, SQLite, PostgreSQL, Redis,
MongoDB, or a store of your own) implements.

A store keeps both queues and moves items between them atomically. It takes
the time as an argument (``now``) from the caller, who reads it from the
bus's clock, so that schedules can be tested without sleeping. Methods that
finish a claimed item take the claim's ``owner`` token and do nothing for an
item whose lease another claim has taken over (the fencing check).

Services (issue 12) share one store: each record carries its service's name,
and the store keeps each service's subscriptions and its workers' heartbeats
(``ServiceStore``). Every engine keeps them; ``MemoryStore`` is the reference.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from .._appdb import AppConnection
from .._filters import DeadLetterFilter
from .._groups import GroupCount
from .._outcomes import CorruptRecord, Counters, Outcome, Succeeded
from .._rate import check_take, take_from_bucket
from .._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from .._services import (
    HandlerLoad,
    Registration,
    StoredSubscription,
    WorkerBeat,
)

__all__ = [
    "DEAD_LETTER_GROUP_FIELDS",
    "RETRY_GROUP_FIELDS",
    "AdminStore",
    "ControlRecord",
    "DeadLetterField",
    "RetryField",
    "RetryStore",
    "ServiceStore",
    "Store",
    "check_retry_kind",
]

#: compare-and-set attempts of ``Store.take_tokens`` before it grants nothing
_TOKEN_TRIES = 8


DeadLetterField = Literal["failure_group", "handler_name", "event_type", "reason", "service"]
RetryField = Literal["handler_name", "event_type", "service"]
DEAD_LETTER_GROUP_FIELDS: tuple[str, ...] = (
    "failure_group",
    "handler_name",
    "event_type",
    "reason",
    "service",
)
RETRY_GROUP_FIELDS: tuple[str, ...] = ("handler_name", "event_type", "service")


def check_retry_kind(kind: str | None, now: datetime | None) -> None:
    """Refuse (``ValueError``) a kind that is not a ``RetryKind``, and ``pending`` or
    ``scheduled`` without the ``now`` that tells them apart."""
    if kind is None:
        return
    if kind not in RETRY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(RETRY_KINDS)}, got {kind!r}")
    if kind != "retry" and now is None:
        raise ValueError(f"listing {kind} deliveries needs now (when they are due)")


@dataclass(frozen=True, slots=True)
class ControlRecord:
    """A small JSON document the store keeps for retrybus itself (a redrive's
    progress, the queue depth history), written with compare-and-set on ``version``."""

    key: str
    version: int
    value: Mapping[str, Any]


class RetryStore(abc.ABC):
    """The hot half of a store: what publish and the workers use on every
    delivery (record failures, claim, extend, release, complete) and the sweeps
    a worker runs now and then."""

    #: the URL the store was opened with, password removed
    url: str
    #: what the store holds outlives this process (the memory store's does not):
    #: publish is durable by default on such a store
    persistent: ClassVar[bool] = True
    #: ``remove_then_record_pending`` is one step (one transaction, one round
    #: trip): a durable publisher's removals then ride on its next write
    joins_removals: ClassVar[bool] = False

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect (and create tables) now rather than on first use."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store can be used again afterwards (it reconnects)."""

    @abc.abstractmethod
    async def health(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    async def watch(self, on_change: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """Call ``on_change()`` when another process adds a retry item or a
        pending delivery, or makes one due, so that an idle worker wakes at once
        (PostgreSQL's LISTEN/NOTIFY, for example). Returns an async function that
        stops watching, or None when the engine cannot watch: workers then rely
        on their check interval."""
        return None

    async def same_database(self, connection: AppConnection) -> bool:
        """Whether ``connection`` (one of the application's) is to the database
        that holds this store, so that the outbox can write pending deliveries
        into the store's tables in the caller's transaction (``stage_pending``).
        Engines that cannot say False: the outbox then uses its own table."""
        return False

    async def stage_pending(self, connection: AppConnection, items: Sequence[RetryItem]) -> None:
        """Add first deliveries (no lease, due at ``item.next_retry``) on the
        application's ``connection``, in the transaction the caller has open
        there, skipping ids already stored; only called when ``same_database``
        said so. Sends no NOTIFY in the caller's transaction."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot stage into an application's transaction"
        )

    async def staged(self) -> None:  # noqa: B027 - a hook most engines leave empty
        """Deliveries staged on an application connection have just committed:
        wake the workers watching this store (``watch``). Engines whose watch
        sees every commit on its own do nothing."""

    @abc.abstractmethod
    async def record_pending(self, items: Sequence[RetryItem]) -> set[str]:
        """Add first deliveries not yet made (``attempt == 0``) in one step: a
        durable publish's, leased to it (``item.lease_owner`` until
        ``item.lease_until``, ``item.claims == 1``) while it runs them, or
        deferred ones (no lease, ``claims == 0``) due at ``item.next_retry``.
        Ids already stored are skipped (the same delivery recorded twice makes
        no second record). Returns the ids added. They do not count in the
        running totals (``Counters``): a first delivery is not a retry."""

    async def remove_then_record_pending(
        self,
        removals: Sequence[Succeeded],
        owner: str,
        now: datetime,
        items: Sequence[RetryItem],
    ) -> set[str]:
        """``complete(removals, owner, now)`` (first deliveries that succeeded,
        leased to ``owner``), then ``record_pending(items)``; returns what
        ``record_pending`` returns. One step where the engine says so
        (``joins_removals``); this default makes the two calls in turn."""
        if removals:
            await self.complete(removals, owner, now)
        return await self.record_pending(items)

    @abc.abstractmethod
    async def record_failures(
        self, retry_items: Sequence[RetryItem], dead_letters: Sequence[DeadLetterItem]
    ) -> None:
        """Add new retry items and new dead letters in one step. Ids already
        stored are skipped, so that a write repeated after a lost reply (the
        store answered nothing, yet committed) adds nothing twice."""

    @abc.abstractmethod
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
        """Lease up to ``limit`` items due at ``now`` (earliest first) to ``owner``,
        atomically, adding one to each one's ``claims`` (the items returned carry
        the new count). With ``service``, only items of that service (None: of any);
        with ``handlers``, only items of those handlers (a worker claims only what
        it can run); an empty collection claims nothing."""

    @abc.abstractmethod
    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        """Push to ``lease_until`` the leases ``owner`` still holds on these items;
        returns how many it still holds."""

    @abc.abstractmethod
    async def release(self, ids: Sequence[str], owner: str) -> int:
        """Give leased items back unprocessed, due as they were; the claim that
        leased them no longer counts (``claims`` goes down by one, not below 0)."""

    @abc.abstractmethod
    async def complete(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> set[str]:
        """Apply outcomes in one step: with ``owner``, only to items it still
        holds; without, only to items no live lease holds at ``now``.
        ``Rescheduled`` writes its item whole (its ``claims`` is 0 again).

        The running totals change only for retries: a ``Succeeded`` whose
        ``item.first_delivery`` is not a retry that worked; a ``Rescheduled``
        with ``first_delivery`` adds one to ``retry_added``; a ``DeadLettered``
        with ``first_delivery`` leaves ``retry_dead_lettered`` alone.

        Returns the ids of the retry items the outcomes were applied to.
        """

    @abc.abstractmethod
    async def next_due(
        self, handlers: Collection[str] | None = None, *, service: str | None = None
    ) -> datetime | None:
        """When the earliest item falls due or its lease runs out (None when
        empty); with ``handlers``, only among items of those handlers, with
        ``service``, only among items of that service (None: of any)."""

    @abc.abstractmethod
    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        """Move to the dead letter queue the items that no live lease holds at
        ``now``, were created before ``before``, and are either retries
        (``attempt`` not 0: they expire by age) or first deliveries (``attempt ==
        0``, deferred or scheduled) due since before ``before`` (``next_retry <
        before``): a first delivery expires only once it has waited that long
        due and unclaimed, never before its time. Returns the dead letters."""

    @abc.abstractmethod
    async def cleanup_dead(self, before: datetime) -> int:
        """Delete dead letters created before ``before``; return how many."""

    @abc.abstractmethod
    async def counters(self) -> Counters: ...

    # the inbox: remembered successes ------------------------------------------

    @abc.abstractmethod
    async def remember_successes(self, ids: Sequence[str], until: datetime) -> None:
        """Remember these delivery ids (``retrybus._records.delivery_id``: service,
        event and handler) as handled successfully, until ``until`` (an id
        remembered already gets the later of the two). One step."""

    async def complete_remembering(
        self,
        outcomes: Sequence[Outcome],
        owner: str | None,
        now: datetime,
        remember: Sequence[str],
        until: datetime,
    ) -> set[str]:
        """``remember_successes(remember, until)`` then ``complete(outcomes, owner,
        now)``; the SQL engines do both in one transaction (one commit). Returns
        what ``complete`` returns."""
        if remember:
            await self.remember_successes(remember, until)
        return await self.complete(outcomes, owner, now)

    @abc.abstractmethod
    async def remembered(self, ids: Collection[str], now: datetime) -> set[str]:
        """Which of ``ids`` are remembered (``remember_successes``) past ``now``:
        an entry whose ``until`` is ``now`` or earlier is forgotten, swept or not."""

    @abc.abstractmethod
    async def forget_successes(self, before: datetime) -> int:
        """Delete the remembered successes whose ``until`` is ``before`` or
        earlier (a worker's maintenance); returns how many went (engines that
        expire them on their own, MongoDB's TTL index, may say fewer)."""


class AdminStore(abc.ABC):
    """The admin half of a store: what people use to look at and act on the
    queues (the CLI, the dashboard, ``bus.dead_letters``), the control records
    that redrives and the depth history keep, and the schema's migration."""

    @abc.abstractmethod
    async def retry_count(self) -> int: ...

    @abc.abstractmethod
    async def count_due(self, before: datetime) -> int:
        """Items falling due before ``before``."""

    @abc.abstractmethod
    async def get_retry(self, item_id: str) -> RetryItem | None: ...

    @abc.abstractmethod
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
        """Items by next retry time, earliest first (``id`` among equal times); with
        ``kind``, only records of that kind at ``now`` (``RetryItem.kind``: a retry
        has ``attempt != 0``; a first delivery is pending when ``next_retry <= now``,
        scheduled after). ``now`` is needed for pending and scheduled
        (``check_retry_kind``). With ``service``, only records of that service
        (None: of any)."""

    @abc.abstractmethod
    async def count_retry_kinds(self, now: datetime) -> dict[RetryKind, int]:
        """How many records of each ``RetryKind`` the retry queue holds at ``now``
        (every kind a key; together they are ``retry_count()``)."""

    @abc.abstractmethod
    async def find_retry_ids(self, prefix: str, *, limit: int) -> list[str]:
        """Ids of retry queue records that start with ``prefix``, ascending, at most
        ``limit`` (for people who type a shortened id)."""

    @abc.abstractmethod
    async def cancel_delivery(self, item_id: str, *, now: datetime) -> bool:
        """Delete record ``item_id`` in one step if it is a first delivery
        (``attempt == 0``: pending or scheduled) that no live lease holds at ``now``
        (none, or one that ran out); returns whether it did. A retry, or a delivery
        whose handler runs, is left as it is. The running totals do not change: a
        first delivery is not in them."""

    @abc.abstractmethod
    async def delete_retry(self, item_id: str) -> bool: ...

    @abc.abstractmethod
    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        """Retry items counted per value of ``by`` (``handler_name``, ``event_type``
        or ``service``), largest first, ties by key ascending; ``first_at`` and
        ``last_at`` are the earliest and latest ``next_retry``, ``sample_id`` the id
        of the item due first (the least id among equally due ones)."""

    @abc.abstractmethod
    async def newest_failures(self, *, service: str | None = None, limit: int) -> list[RetryItem]:
        """Per (service, handler), the retry (``attempt > 0``: a failure, not a first
        delivery) written last: the greatest ``updated_at``, the greatest id among
        equal times. ``updated_at`` is the time of the item's last failure, or of a
        claim made since (a retry running, or one whose worker stopped): its error
        is still the newest that item had. Newest first (ties by service, handler),
        at most ``limit`` (the dashboard's "last error" of each handler). With
        ``service``, that service's handlers only."""

    @abc.abstractmethod
    async def list_dead(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterItem]:
        """Dead letters matching ``where``, newest first (``created_at``, then ``id``,
        both descending)."""

    @abc.abstractmethod
    async def count_dead(self, where: DeadLetterFilter) -> int:
        """How many dead letters match ``where``."""

    @abc.abstractmethod
    async def group_dead(
        self, by: DeadLetterField, where: DeadLetterFilter, *, limit: int
    ) -> list[GroupCount]:
        """The dead letters matching ``where`` counted per value of ``by`` (one of
        ``DEAD_LETTER_GROUP_FIELDS``; ``failure_group`` is
        ``DeadLetterItem.failure_group``): at most ``limit`` groups, largest first,
        ties by key ascending. ``first_at``/``last_at`` are the oldest and newest
        ``created_at``; ``sample_id`` is the id of the newest item (the greatest id
        among equally new ones)."""

    @abc.abstractmethod
    async def get_dead(self, item_id: str) -> DeadLetterItem | None: ...

    @abc.abstractmethod
    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        """Ids of dead letters that start with ``prefix``, ascending, at most ``limit``
        (for people who type a shortened id)."""

    @abc.abstractmethod
    async def update_dead(self, item: DeadLetterItem) -> bool:
        """Store a changed dead letter (error, processed, processed_at, metadata, attempt)."""

    @abc.abstractmethod
    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        """Remove dead letter ``item_id`` and add ``retry_item`` in one step."""

    @abc.abstractmethod
    async def delete_dead(self, item_id: str) -> bool: ...

    @abc.abstractmethod
    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        """Delete these dead letters (unknown ids are skipped); returns how many went."""

    @abc.abstractmethod
    async def get_control(self, key: str) -> ControlRecord | None: ...

    @abc.abstractmethod
    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        """Write ``value`` (a JSON object) under ``key`` if its stored version is
        ``version`` (0: only if there is no record yet), atomically. Returns the new
        version (``version + 1``), or None when the stored version differs."""

    @abc.abstractmethod
    async def list_control(self, prefix: str) -> list[ControlRecord]:
        """The records whose key starts with ``prefix``, by key."""

    @abc.abstractmethod
    async def delete_control(self, key: str) -> bool: ...

    async def migrate(self) -> int | None:
        """Create or upgrade the store's tables and indexes now (a store does it
        on first use anyway); returns its schema version (None: the engine keeps
        no versioned schema)."""
        await self.connect()
        return await self.schema_version()

    async def schema_version(self) -> int | None:
        """The schema version the store records (None: it keeps none)."""
        return None

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect (and create tables) now rather than on first use."""


class ServiceStore(abc.ABC):
    """The services part of a store (issue 12): the subscriptions each service
    keeps there, its workers' heartbeats, and what waits for each of its handlers.
    ``MemoryStore`` is the reference.
    """

    @abc.abstractmethod
    async def put_subscriptions(
        self,
        service: str,
        subscriptions: Sequence[StoredSubscription],
        *,
        prune: bool,
        now: datetime,
        actor: str,
    ) -> Registration:
        """Register ``service``'s handlers in one step (one transaction or script):
        store each of ``subscriptions`` (only their terms: see
        ``StoredSubscription``; each must be of ``service``, one per handler), as
        new, or back after a removal (its tombstone cleared, ``registered_at``
        now), or with its new terms; with ``prune``, tombstone the service's other
        live subscriptions (``removed_at`` now, ``removed_by`` ``actor``). What
        changes gets ``updated_at`` now and the next revision (one for the whole
        call); a call that changes nothing writes nothing and leaves the revision
        as it is. Raises ``ValueError`` for a subscription of another service or
        a handler named twice."""

    @abc.abstractmethod
    async def remove_subscriptions(
        self, service: str, handlers: Collection[str] | None, *, now: datetime, actor: str
    ) -> list[str]:
        """Tombstone ``service``'s live subscriptions of ``handlers`` (None: all of
        them) in one step, ``removed_by`` ``actor``, with the next revision;
        returns the names of the handlers removed, sorted (handlers unknown or
        removed already are skipped)."""

    @abc.abstractmethod
    async def list_subscriptions(
        self, service: str | None = None, *, removed: bool = False
    ) -> list[StoredSubscription]:
        """The live subscriptions of ``service`` (None: of every service), by
        service then handler name; with ``removed``, the tombstones too."""

    @abc.abstractmethod
    async def subscriptions_revision(self) -> int:
        """The revision of the last write of a subscription (0: none yet). It
        changes with every write that changes a subscription and never goes back
        (forgetting tombstones does not lower it): a publisher that caches the
        subscriptions reloads them only when it changed."""

    @abc.abstractmethod
    async def forget_subscriptions(self, before: datetime) -> int:
        """Delete the tombstones of subscriptions removed before ``before``; returns
        how many went. The revision does not change (what publishers route to
        does not)."""

    @abc.abstractmethod
    async def dead_letter_unsubscribed(self, *, now: datetime, limit: int) -> list[DeadLetterItem]:
        """Move to the dead letter queue up to ``limit`` retry queue records (due
        first, then by id) of handlers whose subscription is a tombstone and that
        no live lease holds at ``now`` (a leased one waits for its lease to run
        out), each with the reason ``subscription removed: SERVICE/HANDLER (by
        ACTOR)`` (``unsubscribed_reason``) and, as ``expire_retry`` makes them, the
        retries made as its ``attempt``. Counted as ``expire_retry`` counts.
        Returns the dead letters; call again until none is left."""

    @abc.abstractmethod
    async def beat(self, beat: WorkerBeat) -> None:
        """Store worker ``beat.name``'s heartbeat (in place of its last)."""

    @abc.abstractmethod
    async def forget_worker(self, name: str) -> bool:
        """Delete worker ``name``'s heartbeat (it stopped); returns whether there was one."""

    @abc.abstractmethod
    async def list_workers(self, service: str | None = None) -> list[WorkerBeat]:
        """The workers' last heartbeats (of ``service``; None: of every service), by
        service then name, live or not (``WorkerBeat.live_at``)."""

    @abc.abstractmethod
    async def prune_workers(self, before: datetime) -> int:
        """Delete the heartbeats last seen before ``before``; returns how many went."""

    @abc.abstractmethod
    async def service_loads(self, now: datetime) -> list[HandlerLoad]:
        """What waits for each ``(service, handler)`` that has records in either
        queue, by service then handler name (``HandlerLoad``): its retry queue
        records of each kind at ``now``, those a live lease holds at ``now``, its
        dead letters processed and not, and the earliest ``next_retry`` of its
        pending ones."""


class Store(RetryStore, AdminStore, ServiceStore):
    """One engine holding the retry queue and the dead letter queue.

    Use it as an async context manager, or call ``await store.close()``; it
    connects on first use (``await store.connect()`` connects eagerly and
    raises ``StoreUnavailable`` naming the URL when it cannot).
    """

    #: the URL the store was opened with, password removed
    url: str
    #: what the store holds outlives this process (the memory store's does not):
    #: publish is durable by default on such a store
    persistent: ClassVar[bool] = True
    #: ``remove_then_record_pending`` is one step (one transaction, one round
    #: trip): a durable publisher's removals then ride on its next write
    joins_removals: ClassVar[bool] = False

    @classmethod
    def from_url(cls, url: str) -> Store:
        """The store a URL of this engine names (server engines implement it;
        ``open_store`` calls it). Raises ``ValueError`` naming a malformed URL."""
        raise NotImplementedError(f"{cls.__name__} is not opened from a URL")

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    async def take_tokens(
        self, key: str, *, want: int, rate: float, burst: float, now: datetime
    ) -> int:
        """Take up to ``want`` tokens from the token bucket in control record
        ``key`` (created full), refilled at ``rate`` tokens a second up to
        ``burst`` since it was last taken from; returns how many were granted
        (0 to ``want``). Atomic across processes: whatever the takers, the grants
        since the bucket was made never exceed ``burst + rate * elapsed``.

        This default reads the record and writes it back with compare-and-set,
        trying again on a lost race (after ``_TOKEN_TRIES`` it grants nothing:
        fewer calls are always safe); an engine may do it in one step (Redis: a
        script)."""
        check_take(want, rate, burst)
        if want == 0:
            return 0
        at = now.timestamp()
        for _ in range(_TOKEN_TRIES):
            record = await self.get_control(key)
            stored = None if record is None else record.value
            granted, bucket = take_from_bucket(stored, want=want, rate=rate, burst=burst, now=at)
            if granted == 0 and record is not None:
                return 0  # the bucket as stored says the same: nothing to write
            version = 0 if record is None else record.version
            if await self.put_control(key, bucket, version=version) is not None:
                return granted
        return 0
