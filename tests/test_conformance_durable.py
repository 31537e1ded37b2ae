"""Durable, deferred and scheduled publish, on every store engine: a delivery is
recorded before its handler runs, so nothing is lost from the moment of publish."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from retrybus import (
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    PermanentError,
    RetryWorker,
    Store,
)


def durable_bus(store: Store, clock: ManualClock, **kwargs: object) -> EventBus:
    return EventBus(store, clock=clock, durable=True, **kwargs)  # type: ignore[arg-type]


async def test_the_record_is_written_and_leased_before_the_handler_runs(
    store: Store, clock: ManualClock
) -> None:
    bus = durable_bus(store, clock, publish_lease=30)
    seen: list[object] = []

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        (record,) = await store.list_retry(limit=10, offset=0)
        seen.append(record)

    event = Event("like.added", {"post_id": 7}, source="social")
    result = await bus.publish(event)
    assert result.succeeded == ("count",)
    assert result.pending == ()
    (record,) = seen
    assert record.attempt == 0
    assert record.claims == 1
    assert record.lease_owner == bus.core.publish_owner  # type: ignore[attr-defined]
    assert record.lease_until == clock.now() + timedelta(seconds=30)  # type: ignore[attr-defined]
    assert record.to_event() == event  # type: ignore[attr-defined]
    await bus.core.ledger.flush()
    assert await store.retry_count() == 0
    stats = await bus.stats()
    assert (stats.retry_queue_size, stats.retries_scheduled, stats.retries_succeeded) == (0, 0, 0)


async def test_a_failure_reschedules_the_record_and_counts_one_retry(
    store: Store, clock: ManualClock
) -> None:
    bus = durable_bus(store, clock, default_policy=FixedDelay(3, delay=2))

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        raise TimeoutError("db down")

    result = await bus.publish(Event("like.added", {"post_id": 7}))
    assert result.retrying == ("count",)
    (item,) = result.retry_items
    stored = await store.get_retry(item.id)
    assert stored == item
    assert (stored.attempt, stored.claims, stored.lease_owner) == (1, 0, None)
    assert stored.next_retry == clock.now() + timedelta(seconds=2)
    assert stored.error == "db down"
    assert (await store.counters()).retry_added == 1


async def test_a_non_retryable_failure_is_dead_lettered_from_the_record(
    store: Store, clock: ManualClock
) -> None:
    bus = durable_bus(store, clock)

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        raise PermanentError("bad post")

    result = await bus.publish(Event("like.added", {"post_id": 7}))
    assert result.dead_lettered == ("count",)
    assert await store.retry_count() == 0
    (dead,) = result.dead_letters
    assert (await store.get_dead(dead.id)) == dead
    assert dead.reason.startswith("non-retryable")


async def test_publishing_the_same_event_twice_makes_one_record_and_one_call(
    store: Store, clock: ManualClock
) -> None:
    bus = durable_bus(store, clock)
    started = asyncio.Event()
    release = asyncio.Event()
    calls: list[str] = []

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        calls.append(event.id)
        started.set()
        await release.wait()

    event = Event("like.added", {"post_id": 7})
    first = asyncio.create_task(bus.publish(event))
    await started.wait()
    second = await bus.publish(event)
    assert second.pending == ("count",)
    assert second.succeeded == ()
    release.set()
    assert (await first).succeeded == ("count",)
    assert calls == [event.id]
    await bus.core.ledger.flush()
    assert await store.retry_count() == 0


async def test_a_publisher_that_dies_mid_handler_leaves_the_delivery_to_a_worker(
    store: Store, clock: ManualClock
) -> None:
    bus = durable_bus(store, clock, publish_lease=20)
    started = asyncio.Event()
    calls: list[int] = []

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        calls.append(event.data["post_id"])
        if len(calls) == 1:
            started.set()
            await asyncio.Event().wait()  # the process dies here

    publishing = asyncio.create_task(bus.publish(Event("like.added", {"post_id": 7})))
    await started.wait()
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    worker = RetryWorker(bus, name="w")
    assert await worker.run_once() == 0  # still leased to the publisher
    clock.advance(21)
    assert await worker.run_once() == 1
    assert calls == [7, 7]
    assert await store.retry_count() == 0
    assert (await store.counters()).retry_succeeded == 0  # a first delivery, not a retry


async def test_defer_records_and_returns_and_a_worker_runs_it(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock)
    calls: list[str] = []

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        calls.append("count")

    @bus.handler("like.*", name="audit")
    async def audit(event: Event) -> None:
        calls.append("audit")

    result = await bus.publish(Event("like.added", {"post_id": 7}), defer=True)
    assert sorted(result.pending) == ["audit", "count"]
    assert result.succeeded == ()
    assert result.ok
    assert calls == []
    assert await RetryWorker(bus).run_once() == 2
    assert sorted(calls) == ["audit", "count"]
    assert await store.retry_count() == 0


async def test_a_scheduled_delivery_runs_at_its_time_and_not_before(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock)
    calls: list[datetime] = []

    @bus.handler("reminder.due", name="remind")
    async def remind(event: Event) -> None:
        calls.append(clock.now())

    at = clock.now() + timedelta(minutes=5)
    await bus.publish(Event("reminder.due", {}), deliver_at=at)
    await bus.publish(Event("reminder.due", {}), deliver_in=600)
    worker = RetryWorker(bus)
    assert await worker.run_once() == 0
    assert await bus.retry_queue.next_due() == at
    clock.advance(299)
    assert await worker.run_once() == 0
    clock.advance(1)
    assert await worker.run_once() == 1
    clock.advance(300)
    assert await worker.run_once() == 1
    assert calls == [at, at + timedelta(minutes=5)]


async def test_deferring_an_event_no_handler_here_matches_records_nothing(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock)
    bus.subscribe("other.thing", lambda event: None, name="other")
    result = await bus.publish(Event("like.added", {}), defer=True)
    assert result.pending == ()
    assert await store.retry_count() == 0


async def test_bad_schedules_are_refused_naming_the_value(store: Store) -> None:
    bus = EventBus(store)
    event = Event("like.added", {})
    with pytest.raises(ValueError, match="timezone-aware"):
        await bus.publish(event, deliver_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        await bus.publish(event, deliver_at=datetime(2030, 1, 1, tzinfo=UTC), deliver_in=5)
    with pytest.raises(ValueError, match=r"deliver_in.*-1"):
        await bus.publish(event, deliver_in=-1)
    with pytest.raises(TypeError, match="durable"):
        await bus.publish(event, durable="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_claims.*0"):
        EventBus(store, max_claims=0)
    with pytest.raises(ValueError, match=r"publish_lease.*0"):
        EventBus(store, publish_lease=0)


async def test_a_delivery_claimed_max_claims_times_without_an_outcome_is_dead_lettered(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock, max_claims=3)
    calls: list[int] = []

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        calls.append(1)

    await bus.publish(Event("like.added", {"post_id": 7}), defer=True)
    for _ in range(3):  # three workers claim it and die before any outcome
        assert len(await bus.retry_queue.claim_due(10, lease=30, handlers=["count"])) == 1
        clock.advance(31)
    assert await RetryWorker(bus).run_once() == 1
    assert calls == []
    (dead,) = await bus.dead_letters.list()
    assert dead.reason == "undeliverable: claimed 3 times without an outcome"
    assert (dead.handler_name, dead.attempt) == ("count", 0)
    assert await store.retry_count() == 0


async def test_workers_of_two_services_on_one_store_claim_only_their_own(
    store: Store, clock: ManualClock
) -> None:
    billing = EventBus(store, clock=clock)
    mail = EventBus(store, clock=clock)
    handled: list[str] = []

    @billing.handler("order.placed", name="billing.charge")
    async def charge(event: Event) -> None:
        handled.append("charge")

    @mail.handler("order.placed", name="mail.confirm")
    async def confirm(event: Event) -> None:
        handled.append("confirm")

    # each service defers its own delivery; the workers share the store
    await billing.publish(Event("order.placed", {"n": 1}), defer=True)
    await mail.publish(Event("order.placed", {"n": 1}), defer=True)
    assert await RetryWorker(billing).run_once() == 1
    assert handled == ["charge"]
    assert await RetryWorker(billing).run_once() == 0
    assert await RetryWorker(mail).run_once() == 1
    assert handled == ["charge", "confirm"]
    assert await billing.dead_letters.count() == 0


async def test_a_handler_longer_than_the_publish_lease_keeps_its_record(store: Store) -> None:
    bus = EventBus(store, durable=True, publish_lease=0.3)
    claimed_meanwhile: list[int] = []

    @bus.handler("like.added", name="slow")
    async def slow(event: Event) -> None:
        for _ in range(4):
            await asyncio.sleep(0.15)
            claimed = await bus.retry_queue.claim_due(10, lease=5, handlers=["slow"])
            claimed_meanwhile.append(len(claimed))

    result = await bus.publish(Event("like.added", {}))
    assert result.succeeded == ("slow",)
    assert claimed_meanwhile == [0, 0, 0, 0]
    await bus.close()
    assert await store.retry_count() == 0


async def test_concurrent_durable_publishes_share_store_writes(
    store: Store, clock: ManualClock
) -> None:
    bus = durable_bus(store, clock)
    writes: list[int] = []
    record_pending = store.record_pending

    async def counted(items):  # type: ignore[no-untyped-def]
        writes.append(len(items))
        return await record_pending(items)

    store.record_pending = counted  # type: ignore[method-assign]
    handled: list[int] = []

    @bus.handler("like.added", name="count")
    async def count(event: Event) -> None:
        handled.append(event.data["n"])

    try:
        results = await asyncio.gather(
            *(bus.publish(Event("like.added", {"n": n})) for n in range(100))
        )
    finally:
        del store.record_pending
    assert all(result.succeeded == ("count",) for result in results)
    assert sorted(handled) == list(range(100))
    assert sum(writes) == 100
    # shared: a few writes, not one each (how few depends on the machine's load)
    assert len(writes) <= 10
    await bus.close()
    await store.connect()
    assert await store.retry_count() == 0


def test_publish_is_durable_by_default_only_on_a_persistent_store(store: Store) -> None:
    assert EventBus(store).core.publishes_durably is store.persistent
    assert EventBus(store, durable=False).core.publishes_durably is False
    assert EventBus(store, durable=True).core.publishes_durably is True
