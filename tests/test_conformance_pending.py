"""Pending deliveries in the store, as every engine must keep them: a durable
publish's records leased to it, deferred and scheduled ones due later, claims
counted on each record, claims restricted to a worker's handlers, and the
running totals left to retries."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from retrybus import Event, ManualClock, RetryItem, Store
from retrybus._outcomes import Counters, DeadLettered, Rescheduled, Succeeded
from retrybus._records import ErrorInfo, delivery_id


def make_event(n: int = 1) -> Event:
    return Event(
        "like.added",
        {"post_id": n, "nested": {"x": 1.5, "none": None}},
        source="social-service",
        time=datetime(2025, 1, 7, 9, 59, 59, 123456, tzinfo=UTC),
        subject=f"post/{n}",
        id=f"event-{n}",
        extensions={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


def pending(
    clock: ManualClock,
    n: int = 1,
    handler: str = "h",
    *,
    owner: str | None = None,
    lease: float = 60.0,
    due_in: float = 0.0,
) -> RetryItem:
    """A first delivery not yet made: leased to ``owner`` (a durable publish) or,
    without one, due in ``due_in`` seconds (deferred, scheduled)."""
    now = clock.now()
    event = make_event(n)
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


async def claim(
    store: Store, clock: ManualClock, owner: str = "w", handlers: list[str] | None = None
) -> list[RetryItem]:
    now = clock.now()
    claimed = await store.claim_due(
        now=now,
        limit=100,
        owner=owner,
        lease_until=now + timedelta(seconds=30),
        handlers=handlers,
    )
    items = [record for record in claimed if isinstance(record, RetryItem)]
    assert len(items) == len(claimed)
    return items


def test_a_delivery_id_depends_on_the_source_the_event_id_and_the_handler_only() -> None:
    assert delivery_id("svc", "e1", "h") == delivery_id("svc", "e1", "h")
    ids = {
        delivery_id("svc", "e1", "h"),
        delivery_id("svc2", "e1", "h"),
        delivery_id("svc", "e2", "h"),
        delivery_id("svc", "e1", "h2"),
        delivery_id("sv", "ce1", "h"),
    }
    assert len(ids) == 5
    assert all(item_id.startswith("retry_") and len(item_id) == 38 for item_id in ids)


async def test_a_pending_record_reads_back_whole(store: Store, clock: ManualClock) -> None:
    item = pending(clock, owner="publisher")
    assert await store.record_pending([item]) == {item.id}
    got = await store.get_retry(item.id)
    assert got == item
    assert (got.attempt, got.claims, got.lease_owner) == (0, 1, "publisher")
    assert got.to_event() == make_event()


async def test_recording_a_delivery_again_adds_nothing(store: Store, clock: ManualClock) -> None:
    first = pending(clock, 1, owner="publisher")
    assert await store.record_pending([first]) == {first.id}
    again = replace(pending(clock, 1), next_retry=clock.now() + timedelta(hours=1))
    other = pending(clock, 2)
    assert await store.record_pending([again, other]) == {other.id}
    assert await store.get_retry(first.id) == first
    assert await store.retry_count() == 2


async def test_a_leased_pending_record_waits_for_its_lease(
    store: Store, clock: ManualClock
) -> None:
    item = pending(clock, owner="publisher", lease=60)
    await store.record_pending([item])
    assert await claim(store, clock) == []
    assert await store.next_due() == item.lease_until
    clock.advance(61)
    (claimed,) = await claim(store, clock, owner="w")
    assert (claimed.id, claimed.lease_owner, claimed.claims) == (item.id, "w", 2)
    assert (await store.get_retry(item.id)) == claimed


async def test_a_deferred_record_is_claimed_when_due_and_not_before(
    store: Store, clock: ManualClock
) -> None:
    now_item = pending(clock, 1)
    later = pending(clock, 2, due_in=30)
    await store.record_pending([now_item, later])
    assert await store.next_due() == now_item.next_retry
    (claimed,) = await claim(store, clock)
    assert (claimed.id, claimed.claims, claimed.attempt) == (now_item.id, 1, 0)
    assert await store.complete([Succeeded(claimed)], "w", clock.now()) == {now_item.id}
    clock.advance(29)
    assert await claim(store, clock) == []
    clock.advance(1)
    (claimed_later,) = await claim(store, clock)
    assert claimed_later.id == later.id


async def test_every_claim_is_counted_and_a_release_takes_one_back(
    store: Store, clock: ManualClock
) -> None:
    item = pending(clock)
    await store.record_pending([item])
    for expected in (1, 2, 3):
        (claimed,) = await claim(store, clock)
        assert claimed.claims == expected
        clock.advance(31)  # the lease runs out: the worker died
    (claimed,) = await claim(store, clock, owner="w2")
    assert claimed.claims == 4
    assert await store.release([item.id], "w2") == 1
    released = await store.get_retry(item.id)
    assert released is not None
    assert (released.claims, released.lease_owner) == (3, None)


async def test_an_unleased_pending_record_keeps_its_claims(
    store: Store, clock: ManualClock
) -> None:
    """A delivery a broker made twice without an outcome becomes a pending record
    that counts those deliveries: the next claim is its third."""
    event = make_event()
    now = clock.now()
    item = RetryItem.pending(event, "h", max_retries=3, due=now, now=now, claims=2)
    assert await store.record_pending([item]) == {item.id}
    stored = await store.get_retry(item.id)
    assert stored is not None
    assert (stored.claims, stored.lease_owner) == (2, None)
    (claimed,) = await claim(store, clock)
    assert claimed.claims == 3


async def test_claims_are_restricted_to_the_workers_handlers(
    store: Store, clock: ManualClock
) -> None:
    mine = pending(clock, 1, "billing.charge")
    theirs = pending(clock, 2, "mail.send", due_in=-5)
    await store.record_pending([mine, theirs])
    assert await store.next_due(["billing.charge"]) == mine.next_retry
    assert await store.next_due(["mail.send"]) == theirs.next_retry
    assert await store.next_due(["nobody"]) is None
    assert await claim(store, clock, handlers=[]) == []
    assert [i.id for i in await claim(store, clock, handlers=["billing.charge"])] == [mine.id]
    assert await claim(store, clock, handlers=["billing.charge"]) == []
    assert [i.id for i in await claim(store, clock, handlers=["mail.send", "x"])] == [theirs.id]


async def test_a_first_delivery_that_works_leaves_the_totals_alone(
    store: Store, clock: ManualClock
) -> None:
    item = pending(clock, owner="publisher")
    await store.record_pending([item])
    assert await store.complete([Succeeded(item)], "publisher", clock.now()) == {item.id}
    assert await store.get_retry(item.id) is None
    assert await store.counters() == Counters()


async def test_only_the_lease_holder_finishes_a_pending_record(
    store: Store, clock: ManualClock
) -> None:
    item = pending(clock, owner="publisher", lease=10)
    await store.record_pending([item])
    clock.advance(11)
    (taken,) = await claim(store, clock, owner="w")
    assert await store.complete([Succeeded(item)], "publisher", clock.now()) == set()
    assert await store.get_retry(item.id) == taken


async def test_a_first_failure_rescheduled_counts_as_a_retry_added(
    store: Store, clock: ManualClock
) -> None:
    item = pending(clock, owner="publisher")
    await store.record_pending([item])
    clock.advance(1)
    retry = item.rescheduled(
        attempt=1,
        next_retry=clock.now() + timedelta(seconds=5),
        error=ErrorInfo("boom", "RuntimeError", "tb"),
        now=clock.now(),
    )
    outcome = Rescheduled(retry, first_delivery=True)
    assert await store.complete([outcome], "publisher", clock.now()) == {item.id}
    stored = await store.get_retry(item.id)
    assert stored == retry
    assert (stored.attempt, stored.claims, stored.lease_owner, stored.lease_until) == (
        1,
        0,
        None,
        None,
    )
    assert await store.counters() == Counters(retry_added=1)
    clock.advance(5)
    (claimed,) = await claim(store, clock)
    assert (claimed.attempt, claimed.claims) == (1, 1)
    assert await store.complete([Succeeded(claimed)], "w", clock.now()) == {item.id}
    assert await store.counters() == Counters(
        retry_added=1, retry_succeeded=1, retry_succeeded_attempts=1
    )


async def test_a_first_failure_dead_lettered_leaves_the_retry_totals_alone(
    store: Store, clock: ManualClock
) -> None:
    item = pending(clock, owner="publisher")
    await store.record_pending([item])
    dead = item.to_dead_letter(
        reason="non-retryable: ValueError",
        now=clock.now(),
        error=ErrorInfo("bad", "ValueError"),
        attempt=0,
    )
    outcome = DeadLettered(item.id, dead, first_delivery=True)
    assert await store.complete([outcome], "publisher", clock.now()) == {item.id}
    assert await store.get_retry(item.id) is None
    assert await store.get_dead(dead.id) == dead
    assert await store.counters() == Counters()


async def test_many_pending_records_in_one_step(store: Store, clock: ManualClock) -> None:
    items = [pending(clock, n, owner="publisher") for n in range(250)]
    assert await store.record_pending(items) == {item.id for item in items}
    assert await store.retry_count() == 250
    applied = await store.complete([Succeeded(item) for item in items], "publisher", clock.now())
    assert applied == {item.id for item in items}
    assert await store.retry_count() == 0


async def test_a_publishers_removals_and_its_next_records_in_one_call(
    store: Store, clock: ManualClock
) -> None:
    done = [pending(clock, n, owner="publisher", lease=10 if n == 0 else 60) for n in range(3)]
    await store.record_pending(done)
    clock.advance(11)
    (taken,) = await claim(store, clock, owner="w")  # its lease ran out: a worker has it
    still_mine = done[1:]
    again = pending(clock, 7, owner="publisher")
    await store.record_pending([again])
    new = [pending(clock, 10 + n, owner="publisher") for n in range(2)]
    added = await store.remove_then_record_pending(
        [Succeeded(item) for item in done], "publisher", clock.now(), [*new, again]
    )
    assert added == {item.id for item in new}  # the delivery recorded before is not added again
    for item in still_mine:
        assert await store.get_retry(item.id) is None
    assert await store.get_retry(taken.id) == taken  # the worker's lease holds it
    assert await store.retry_count() == 4
    assert await store.counters() == Counters()
