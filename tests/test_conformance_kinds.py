"""The three kinds of record in the retry queue, as every engine must tell them apart:
a retry (``attempt >= 1``), a pending first delivery (``attempt == 0``, due) and a
scheduled one (``attempt == 0``, due later); listing and counting by kind, finding ids
by their start, and cancelling a pending or scheduled delivery that no worker holds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from retrybus import (
    RETRY_KINDS,
    AmbiguousId,
    Event,
    EventBus,
    ItemNotFound,
    ManualClock,
    NotCancellable,
    RetryItem,
    Store,
)
from retrybus._outcomes import Counters
from retrybus._records import ErrorInfo, delivery_id
from retrybus._stores.memory import MemoryStore

# a time inside a millisecond (MongoDB keeps the microseconds beside it)
START = datetime(2025, 1, 7, 10, 0, 0, 123456, tzinfo=UTC)


def first_delivery(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    *,
    due_in: float = 0.0,
    owner: str | None = None,
    lease: float = 60.0,
) -> RetryItem:
    """A first delivery not yet made: due in ``due_in`` seconds, leased to ``owner``
    (a durable publish running its handler) when given."""
    now = clock.now()
    event = Event("like.added", {"n": n}, source="svc", id=f"event-{n}", time=START)
    item = RetryItem.for_failure(
        event,
        handler,
        ErrorInfo("", ""),
        attempt=0,
        max_retries=3,
        next_retry=now + timedelta(seconds=due_in),
        now=now,
    )
    item = replace(item, id=delivery_id(event.source, event.id, handler))
    if owner is None:
        return item
    return replace(item, lease_owner=owner, lease_until=now + timedelta(seconds=lease), claims=1)


def retry(clock: ManualClock, n: int, handler: str = "h", *, due_in: float = 0.0) -> RetryItem:
    now = clock.now()
    return RetryItem.for_failure(
        Event("like.added", {"n": n}, source="svc", id=f"retry-{n}", time=START),
        handler,
        ErrorInfo("boom", "RuntimeError"),
        attempt=1 + n % 3,
        max_retries=3,
        next_retry=now + timedelta(seconds=due_in),
        now=now,
    )


class Queue:
    """One of each kind, and a second of some: what the tests below look at."""

    def __init__(self, clock: ManualClock) -> None:
        self.retry_due = retry(clock, 1, "a", due_in=-10)
        self.retry_later = retry(clock, 2, "b", due_in=30)
        self.running = first_delivery(clock, 3, "a", due_in=-1, owner="publisher")
        self.deferred = first_delivery(clock, 4, "b", due_in=-5)
        # due a microsecond after a whole minute from now: the edge the tests move to
        self.scheduled = first_delivery(clock, 5, "a", due_in=60.000001)
        self.scheduled_later = first_delivery(clock, 6, "b", due_in=3600)

    async def store_in(self, store: Store) -> None:
        await store.record_failures([self.retry_due, self.retry_later], [])
        await store.record_pending(
            [self.running, self.deferred, self.scheduled, self.scheduled_later]
        )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def queue(store: Store, clock: ManualClock) -> Queue:
    made = Queue(clock)
    await made.store_in(store)
    return made


def ids(items: list[RetryItem]) -> list[str]:
    return [item.id for item in items]


# the kind of a record --------------------------------------------------------------


def test_the_kind_of_a_record_is_its_attempt_and_whether_it_is_due(clock: ManualClock) -> None:
    made = Queue(clock)
    now = clock.now()
    assert RETRY_KINDS == ("retry", "pending", "scheduled")
    assert [made.retry_due.kind(now), made.retry_later.kind(now)] == ["retry", "retry"]
    assert [made.running.kind(now), made.deferred.kind(now)] == ["pending", "pending"]
    assert made.scheduled.kind(now) == "scheduled"
    assert made.scheduled.kind(made.scheduled.next_retry) == "pending"
    assert made.scheduled.kind(made.scheduled.next_retry - timedelta(microseconds=1)) == (
        "scheduled"
    )


# listing and counting ----------------------------------------------------------------


async def test_count_retry_kinds_counts_each_kind_at_now(
    store: Store, clock: ManualClock, queue: Queue
) -> None:
    assert await store.count_retry_kinds(clock.now()) == {
        "retry": 2,
        "pending": 2,
        "scheduled": 2,
    }
    assert await store.count_retry_kinds(clock.now() + timedelta(hours=2)) == {
        "retry": 2,
        "pending": 4,
        "scheduled": 0,
    }


async def test_count_retry_kinds_of_an_empty_queue_names_every_kind(
    store: Store, clock: ManualClock
) -> None:
    assert await store.count_retry_kinds(clock.now()) == dict.fromkeys(RETRY_KINDS, 0)


async def test_a_scheduled_delivery_is_pending_from_the_microsecond_it_falls_due(
    store: Store, clock: ManualClock, queue: Queue
) -> None:
    due = queue.scheduled.next_retry
    before = due - timedelta(microseconds=1)
    assert (await store.count_retry_kinds(before))["scheduled"] == 2
    assert (await store.count_retry_kinds(due))["scheduled"] == 1
    assert (await store.count_retry_kinds(due))["pending"] == 3
    pending_before = await store.list_retry(limit=10, offset=0, kind="pending", now=before)
    assert queue.scheduled.id not in ids(pending_before)
    scheduled_before = await store.list_retry(limit=10, offset=0, kind="scheduled", now=before)
    assert ids(scheduled_before) == [queue.scheduled.id, queue.scheduled_later.id]
    pending_at = await store.list_retry(limit=10, offset=0, kind="pending", now=due)
    assert ids(pending_at) == [queue.deferred.id, queue.running.id, queue.scheduled.id]
    scheduled_at = await store.list_retry(limit=10, offset=0, kind="scheduled", now=due)
    assert ids(scheduled_at) == [queue.scheduled_later.id]


async def test_list_retry_by_kind_keeps_the_next_retry_order(
    store: Store, clock: ManualClock, queue: Queue
) -> None:
    now = clock.now()

    async def listed(**options: object) -> list[str]:
        return ids(await store.list_retry(limit=10, offset=0, now=now, **options))  # type: ignore[arg-type]

    assert await listed(kind="retry") == [queue.retry_due.id, queue.retry_later.id]
    assert await listed(kind="pending") == [queue.deferred.id, queue.running.id]
    assert await listed(kind="scheduled") == [queue.scheduled.id, queue.scheduled_later.id]
    assert await listed() == [
        queue.retry_due.id,
        queue.deferred.id,
        queue.running.id,
        queue.retry_later.id,
        queue.scheduled.id,
        queue.scheduled_later.id,
    ]
    # a retry needs no now
    retries = await store.list_retry(limit=10, offset=0, kind="retry")
    assert ids(retries) == [queue.retry_due.id, queue.retry_later.id]
    # the kind narrows the other filters
    assert await listed(kind="pending", handler_name="a") == [queue.running.id]
    assert await listed(kind="scheduled", handler_name="b") == [queue.scheduled_later.id]
    assert await listed(kind="retry", handler_name="b") == [queue.retry_later.id]
    assert await listed(kind="scheduled", event_type="other.type") == []
    # the records come back whole
    (running,) = await store.list_retry(limit=1, offset=1, kind="pending", now=now)
    assert running == queue.running


async def test_list_retry_by_kind_pages(store: Store, clock: ManualClock) -> None:
    made = [first_delivery(clock, n, due_in=100 + n) for n in range(7)]
    made += [first_delivery(clock, 100 + n, due_in=-n) for n in range(3)]
    await store.record_pending(made)
    await store.record_failures([retry(clock, n, due_in=n * 50) for n in range(5)], [])
    now = clock.now()
    scheduled = made[:7]
    for offset, limit in ((0, 3), (3, 3), (6, 3), (7, 3), (2, 0), (0, 100)):
        page = await store.list_retry(limit=limit, offset=offset, kind="scheduled", now=now)
        assert ids(page) == ids(scheduled[offset : offset + limit]), (offset, limit)
    pending = await store.list_retry(limit=2, offset=1, kind="pending", now=now)
    assert ids(pending) == [made[8].id, made[7].id]


async def test_an_unknown_kind_or_one_without_now_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="kind must be one of retry, pending, scheduled"):
        await store.list_retry(limit=10, offset=0, kind="failed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs now"):
        await store.list_retry(limit=10, offset=0, kind="scheduled")


async def test_the_kinds_match_the_memory_store_on_a_mixed_queue(
    store: Store, clock: ManualClock
) -> None:
    reference = MemoryStore()
    firsts = [
        first_delivery(
            clock, n, f"h{n % 3}", due_in=(n % 9 - 4) * 7.5, owner="p" if n % 4 else None
        )
        for n in range(30)
    ]
    retries = [retry(clock, n, f"h{n % 2}", due_in=(n % 7 - 3) * 11.0) for n in range(25)]
    for target in (store, reference):
        await target.record_pending(firsts)
        await target.record_failures(retries, [])
    for seconds in (-40, 0, 7.5, 25, 40):
        now = clock.now() + timedelta(seconds=seconds)
        assert await store.count_retry_kinds(now) == await reference.count_retry_kinds(now)
        for kind in RETRY_KINDS:
            for handler in (None, "h1"):
                got = await store.list_retry(
                    limit=6, offset=2, kind=kind, now=now, handler_name=handler
                )
                want = await reference.list_retry(
                    limit=6, offset=2, kind=kind, now=now, handler_name=handler
                )
                assert ids(got) == ids(want), (seconds, kind, handler)
    counts = await store.count_retry_kinds(clock.now())
    assert sum(counts.values()) == await store.retry_count()


async def test_bus_retry_queue_lists_and_counts_by_kind_at_the_bus_clock(
    bus: EventBus, clock: ManualClock, queue: Queue
) -> None:
    assert await bus.retry_queue.count_kinds() == {"retry": 2, "pending": 2, "scheduled": 2}
    scheduled = await bus.retry_queue.list(kind="scheduled")
    assert ids(scheduled) == [queue.scheduled.id, queue.scheduled_later.id]
    clock.advance(60.000001)
    assert await bus.retry_queue.count_kinds() == {"retry": 2, "pending": 3, "scheduled": 1}
    assert ids(await bus.retry_queue.list(kind="scheduled")) == [queue.scheduled_later.id]
    stats = await bus.stats()
    assert stats.retry_queue_size == 6
    assert (stats.retry_queue_retries, stats.retry_queue_pending) == (2, 3)
    assert stats.to_dict()["retry_queue_scheduled"] == 1
    with pytest.raises(ValueError, match="kind must be one of"):
        await bus.retry_queue.list(kind="dead")  # type: ignore[arg-type]


async def test_publish_with_deliver_in_and_defer_makes_scheduled_and_pending_records(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("reminder.due", lambda event: None, name="Reminder")
    await bus.publish(Event("reminder.due", {"n": 1}), deliver_in=600)
    await bus.publish(Event("reminder.due", {"n": 2}), defer=True)
    assert await bus.retry_queue.count_kinds() == {"retry": 0, "pending": 1, "scheduled": 1}
    (scheduled,) = await bus.retry_queue.list(kind="scheduled")
    assert scheduled.event_data == {"n": 1}


# finding ids by their start --------------------------------------------------------------


async def test_find_retry_ids_and_resolve_id(bus: EventBus, store: Store, queue: Queue) -> None:
    made = (queue.retry_due, queue.retry_later, queue.running, queue.deferred)
    every = sorted(item.id for item in (*made, queue.scheduled, queue.scheduled_later))
    assert await store.find_retry_ids("retry_", limit=100) == every
    assert await store.find_retry_ids("retry_", limit=2) == every[:2]
    assert await store.find_retry_ids("dlq_", limit=10) == []
    target = queue.scheduled.id
    start = next(
        target[:n]
        for n in range(7, len(target))
        if sum(other.startswith(target[:n]) for other in every) == 1
    )
    assert await store.find_retry_ids(start, limit=10) == [target]
    assert await bus.retry_queue.resolve_id(start) == target
    assert await bus.retry_queue.resolve_id(target) == target
    with pytest.raises(AmbiguousId, match="retry_"):
        await bus.retry_queue.resolve_id("retry_")
    with pytest.raises(ItemNotFound, match="retry_zzz"):
        await bus.retry_queue.resolve_id("retry_zzz")
    # a glob character is not a pattern (Redis's HSCAN MATCH)
    assert await store.find_retry_ids("retry_*", limit=10) == []


# cancelling ----------------------------------------------------------------------------


async def test_cancel_removes_a_scheduled_delivery_and_nothing_else(
    bus: EventBus, store: Store, clock: ManualClock, queue: Queue
) -> None:
    cancelled = await bus.retry_queue.cancel(queue.scheduled.id)
    assert cancelled == queue.scheduled
    with pytest.raises(ItemNotFound):
        await bus.retry_queue.get(queue.scheduled.id)
    assert await bus.retry_queue.count_kinds() == {"retry": 2, "pending": 2, "scheduled": 1}
    assert await bus.dead_letters.count() == 0
    assert await store.counters() == Counters(retry_added=2)
    # it is gone for good: a worker never gets it
    clock.advance(7200)
    claimed = await bus.retry_queue.claim_due(100)
    assert queue.scheduled.id not in ids(claimed)
    assert len(claimed) == 5


async def test_cancel_removes_a_deferred_delivery_no_worker_holds(
    bus: EventBus, queue: Queue
) -> None:
    assert (await bus.retry_queue.cancel(queue.deferred.id)).id == queue.deferred.id
    assert await bus.retry_queue.count_kinds() == {"retry": 2, "pending": 1, "scheduled": 2}


async def test_cancel_refuses_a_retry_naming_it(bus: EventBus, queue: Queue) -> None:
    for item in (queue.retry_due, queue.retry_later):
        with pytest.raises(NotCancellable, match=f"{item.id} cannot be cancelled: it is a retry"):
            await bus.retry_queue.cancel(item.id)
        assert await bus.retry_queue.get(item.id) == item


async def test_cancel_refuses_a_delivery_whose_handler_runs_until_its_lease_ends(
    bus: EventBus, clock: ManualClock, queue: Queue
) -> None:
    with pytest.raises(NotCancellable, match=f"{queue.running.id} .*handler is running") as info:
        await bus.retry_queue.cancel(queue.running.id)
    assert info.value.kind == "pending"
    assert await bus.retry_queue.get(queue.running.id) == queue.running
    # a scheduled delivery claimed by a worker once due: running too
    clock.advance(61)
    (claimed,) = [
        item for item in await bus.retry_queue.claim_due(100) if item.id == queue.scheduled.id
    ]
    with pytest.raises(NotCancellable, match="handler is running"):
        await bus.retry_queue.cancel(claimed.id)
    # a lease that ran out holds nothing (its worker died): cancelled
    clock.advance(61)
    assert (await bus.retry_queue.cancel(claimed.id)).id == claimed.id


async def test_cancel_of_an_unknown_id_raises_item_not_found(bus: EventBus) -> None:
    with pytest.raises(ItemNotFound, match="retry_missing"):
        await bus.retry_queue.cancel("retry_missing")


async def test_the_store_itself_cancels_only_an_unleased_first_delivery(
    store: Store, clock: ManualClock, queue: Queue
) -> None:
    """The store's check is its own (one step), not the queue's look before it."""
    now = clock.now()
    assert await store.cancel_delivery(queue.retry_due.id, now=now) is False
    assert await store.cancel_delivery(queue.retry_later.id, now=now) is False
    assert await store.cancel_delivery(queue.running.id, now=now) is False
    assert await store.cancel_delivery("retry_missing", now=now) is False
    assert await store.retry_count() == 6
    assert await store.cancel_delivery(queue.scheduled.id, now=now) is True
    assert await store.cancel_delivery(queue.scheduled.id, now=now) is False
    # the lease's last microsecond still holds it; the next one does not
    lease_end = queue.running.lease_until
    assert lease_end is not None
    before_end = lease_end - timedelta(microseconds=1)
    assert await store.cancel_delivery(queue.running.id, now=before_end) is False
    assert await store.cancel_delivery(queue.running.id, now=lease_end) is True
    assert await store.get_retry(queue.running.id) is None
    assert await store.counters() == Counters(retry_added=2)
