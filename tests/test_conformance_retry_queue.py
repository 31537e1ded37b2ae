"""The retry queue conformance suite: every store engine must pass all of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from retrybus import DeadLetterItem, Event, EventBus, ItemNotFound, ManualClock, RetryItem, Store
from retrybus._records import ErrorInfo


def make_event(n: int = 1, **kwargs: object) -> Event:
    return Event(
        "like.added",
        {"post_id": n, "tags": ["a", "b"], "nested": {"x": 1.5, "ok": True, "none": None}},
        source="social-service",
        time=datetime(2025, 1, 7, 9, 59, 59, 123456, tzinfo=UTC),
        subject=f"post/{n}",
        extensions={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        **kwargs,  # type: ignore[arg-type]
    )


async def test_added_item_reads_back_with_every_field(bus: EventBus, clock: ManualClock) -> None:
    event = make_event()
    added = await bus.retry_queue.add(
        event, "SocialStatisticsHandler", TimeoutError("connection timeout"), next_retry=clock.now()
    )
    got = await bus.retry_queue.get(added.id)
    assert got == added
    assert got.id.startswith("retry_")
    assert got.to_event() == event
    assert got.to_event().to_dict() == event.to_dict()
    assert (got.error, got.error_type, got.attempt, got.max_retries) == (
        "connection timeout",
        "TimeoutError",
        1,
        3,
    )
    assert "TimeoutError" in got.traceback or got.traceback == ""
    assert got.created_at == got.updated_at == clock.now()


async def test_add_schedules_by_the_handlers_policy(bus: EventBus, clock: ManualClock) -> None:
    item = await bus.retry_queue.add(make_event(), "h", "boom")
    delay = (item.next_retry - clock.now()).total_seconds()
    assert 0.9 <= delay <= 1.1


async def test_count_counts_every_item(bus: EventBus) -> None:
    for n in range(5):
        await bus.retry_queue.add(make_event(n), "h", "boom")
    assert await bus.retry_queue.count() == 5


async def test_claim_due_returns_only_due_items_earliest_first(
    bus: EventBus, clock: ManualClock
) -> None:
    now = clock.now()
    late = await bus.retry_queue.add(make_event(1), "h", "e", next_retry=now - timedelta(seconds=1))
    early = await bus.retry_queue.add(
        make_event(2), "h", "e", next_retry=now - timedelta(seconds=5)
    )
    await bus.retry_queue.add(make_event(3), "h", "e", next_retry=now + timedelta(seconds=5))
    claimed = await bus.retry_queue.claim_due(10)
    assert sorted(item.id for item in claimed) == sorted([early.id, late.id])
    one = await bus.retry_queue.claim_due(1)
    assert one == []


async def test_claim_due_respects_the_limit_and_takes_the_earliest(
    bus: EventBus, clock: ManualClock
) -> None:
    now = clock.now()
    items = [
        await bus.retry_queue.add(make_event(n), "h", "e", next_retry=now - timedelta(seconds=n))
        for n in range(1, 6)
    ]
    claimed = await bus.retry_queue.claim_due(2)
    assert {item.id for item in claimed} == {items[4].id, items[3].id}


async def test_claimed_items_carry_their_lease(bus: EventBus, clock: ManualClock) -> None:
    await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    [item] = await bus.retry_queue.claim_due(1, lease=30, owner="worker-a")
    assert item.lease_owner == "worker-a"
    assert item.lease_until == clock.now() + timedelta(seconds=30)


async def test_a_leased_item_is_not_claimed_again_until_the_lease_runs_out(
    bus: EventBus, clock: ManualClock
) -> None:
    await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    first = await bus.retry_queue.claim_due(10, lease=30, owner="a")
    assert len(first) == 1
    assert await bus.retry_queue.claim_due(10, owner="b") == []
    clock.advance(29)
    assert await bus.retry_queue.claim_due(10, owner="b") == []
    clock.advance(1)
    second = await bus.retry_queue.claim_due(10, owner="b")
    assert [item.id for item in second] == [first[0].id]
    assert second[0].lease_owner == "b"


async def test_mark_success_removes_the_item(bus: EventBus, clock: ManualClock) -> None:
    await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    [item] = await bus.retry_queue.claim_due(1)
    assert await bus.retry_queue.mark_success(item) is True
    assert await bus.retry_queue.count() == 0
    assert await bus.retry_queue.mark_success(item) is False


async def test_mark_success_by_id_needs_no_lease(bus: EventBus, clock: ManualClock) -> None:
    item = await bus.retry_queue.add(make_event(), "h", "e")
    assert await bus.retry_queue.mark_success(item.id) is True
    assert await bus.retry_queue.count() == 0


async def test_update_attempt_reschedules_and_releases_the_lease(
    bus: EventBus, clock: ManualClock
) -> None:
    await bus.retry_queue.add(make_event(), "h", "first", next_retry=clock.now())
    [item] = await bus.retry_queue.claim_due(1)
    later = clock.now() + timedelta(seconds=2)
    assert (
        await bus.retry_queue.update_attempt(item, later, 2, error=ConnectionError("second"))
        is True
    )
    got = await bus.retry_queue.get(item.id)
    assert (got.attempt, got.next_retry, got.error, got.error_type) == (
        2,
        later,
        "second",
        "ConnectionError",
    )
    assert got.lease_owner is None
    assert got.lease_until is None
    assert await bus.retry_queue.claim_due(1) == []
    clock.advance(2)
    assert [i.id for i in await bus.retry_queue.claim_due(1)] == [item.id]


async def test_mark_failed_moves_the_item_to_the_dead_letter_queue(
    bus: EventBus, clock: ManualClock
) -> None:
    event = make_event()
    await bus.retry_queue.add(event, "h", "e", next_retry=clock.now())
    [item] = await bus.retry_queue.claim_due(1)
    dead = await bus.retry_queue.mark_failed(
        item, error=TimeoutError("still down"), reason="failed after 3 retries"
    )
    assert dead is not None
    assert await bus.retry_queue.count() == 0
    stored = await bus.dead_letters.get(dead.id)
    assert stored == dead
    assert stored.reason == "failed after 3 retries"
    assert stored.error == "still down"
    assert stored.to_event() == event
    assert stored.first_failed_at == item.created_at
    assert await bus.retry_queue.mark_failed(item) is None
    assert await bus.dead_letters.count() == 1


async def test_release_gives_items_back_due_as_they_were(bus: EventBus, clock: ManualClock) -> None:
    added = await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    [item] = await bus.retry_queue.claim_due(1, owner="a")
    assert await bus.store.release([item.id], "someone-else") == 0
    assert await bus.store.release([item.id], "a") == 1
    [again] = await bus.retry_queue.claim_due(1, owner="b")
    assert again.next_retry == added.next_retry


async def test_extend_leases_pushes_the_lease_of_an_owner(
    bus: EventBus, clock: ManualClock
) -> None:
    await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    [item] = await bus.retry_queue.claim_due(1, lease=10, owner="a")
    assert await bus.store.extend_leases([item.id], "a", clock.now() + timedelta(seconds=100)) == 1
    assert await bus.store.extend_leases([item.id], "b", clock.now() + timedelta(seconds=900)) == 0
    clock.advance(50)
    assert await bus.retry_queue.claim_due(1, owner="b") == []
    clock.advance(51)
    assert len(await bus.retry_queue.claim_due(1, owner="b")) == 1


async def test_next_due_and_count_due(bus: EventBus, clock: ManualClock) -> None:
    assert await bus.retry_queue.next_due() is None
    now = clock.now()
    await bus.retry_queue.add(make_event(1), "h", "e", next_retry=now + timedelta(seconds=30))
    await bus.retry_queue.add(make_event(2), "h", "e", next_retry=now + timedelta(seconds=90))
    assert await bus.retry_queue.next_due() == now + timedelta(seconds=30)
    assert await bus.retry_queue.count_due(within=60) == 1
    assert await bus.retry_queue.count_due(within=3600) == 2


async def test_next_due_of_a_leased_item_is_its_lease_end(
    bus: EventBus, clock: ManualClock
) -> None:
    await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    await bus.retry_queue.claim_due(1, lease=20)
    assert await bus.retry_queue.next_due() == clock.now() + timedelta(seconds=20)


async def test_list_orders_by_next_retry_and_filters(bus: EventBus, clock: ManualClock) -> None:
    now = clock.now()
    b = await bus.retry_queue.add(make_event(1), "B", "e", next_retry=now + timedelta(seconds=2))
    a = await bus.retry_queue.add(make_event(2), "A", "e", next_retry=now + timedelta(seconds=1))
    c = await bus.retry_queue.add(
        Event("comment.created", {}), "A", "e", next_retry=now + timedelta(seconds=3)
    )
    assert [i.id for i in await bus.retry_queue.list()] == [a.id, b.id, c.id]
    assert [i.id for i in await bus.retry_queue.list(handler_name="A")] == [a.id, c.id]
    assert [i.id for i in await bus.retry_queue.list(event_type="comment.created")] == [c.id]
    assert [i.id for i in await bus.retry_queue.list(limit=1, offset=1)] == [b.id]


async def test_delete_and_unknown_ids(bus: EventBus) -> None:
    item = await bus.retry_queue.add(make_event(), "h", "e")
    await bus.retry_queue.delete(item.id)
    with pytest.raises(ItemNotFound, match=item.id):
        await bus.retry_queue.get(item.id)
    with pytest.raises(ItemNotFound, match="retry_nope"):
        await bus.retry_queue.delete("retry_nope")


async def test_cleanup_moves_old_items_to_the_dlq_and_deletes_nothing(
    bus: EventBus, clock: ManualClock
) -> None:
    old = await bus.retry_queue.add(
        make_event(1), "h", "e", next_retry=clock.now() + timedelta(days=30)
    )
    clock.advance(3600)
    young = await bus.retry_queue.add(
        make_event(2), "h", "e", next_retry=clock.now() + timedelta(days=30)
    )
    moved = await bus.retry_queue.cleanup(before=clock.now() - timedelta(seconds=60))
    assert moved == 1
    assert [i.id for i in await bus.retry_queue.list()] == [young.id]
    [dead] = await bus.dead_letters.list()
    assert dead.reason == "expired in retry queue"
    assert dead.event_id == old.event_id
    assert dead.attempt == 0


async def test_cleanup_by_default_expires_items_older_than_seven_days(
    bus: EventBus, clock: ManualClock
) -> None:
    await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now() + timedelta(days=30))
    clock.advance(7 * 24 * 3600 - 1)
    assert await bus.retry_queue.cleanup() == 0
    clock.advance(2)
    assert await bus.retry_queue.cleanup() == 1
    assert await bus.dead_letters.count() == 1


async def test_cleanup_leaves_leased_items_to_their_worker(
    bus: EventBus, clock: ManualClock
) -> None:
    await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    await bus.retry_queue.claim_due(1, lease=60)
    clock.advance(30)
    assert await bus.retry_queue.cleanup(before=clock.now()) == 0
    assert await bus.retry_queue.count() == 1


async def test_health_passes_on_a_working_store(bus: EventBus) -> None:
    await bus.retry_queue.health()
    await bus.dead_letters.health()


async def test_stats_count_retries_and_their_outcomes(bus: EventBus, clock: ManualClock) -> None:
    for n in range(4):
        await bus.retry_queue.add(make_event(n), "h", "e", next_retry=clock.now())
    items = await bus.retry_queue.claim_due(10)
    assert await bus.retry_queue.mark_success(items[0])
    assert await bus.retry_queue.update_attempt(items[1], clock.now(), 2)
    [again] = await bus.retry_queue.claim_due(10)
    assert await bus.retry_queue.mark_success(again)
    assert await bus.retry_queue.mark_failed(items[2]) is not None
    stats = await bus.stats()
    assert stats.retry_queue_size == 1
    assert stats.dead_letter_queue_size == 1
    assert stats.retries_scheduled == 4
    assert stats.retries_succeeded == 2
    assert stats.retries_dead_lettered == 1
    assert stats.retry_success_rate == pytest.approx(2 / 3)
    assert stats.average_attempts == pytest.approx(1.5)


async def test_claim_needs_a_sane_limit_and_lease(bus: EventBus) -> None:
    with pytest.raises(ValueError, match="limit"):
        await bus.retry_queue.claim_due(-1)
    with pytest.raises(ValueError, match="lease"):
        await bus.retry_queue.claim_due(1, lease=0)


async def test_items_are_typed_records(bus: EventBus) -> None:
    item = await bus.retry_queue.add(make_event(), "h", "e")
    assert isinstance(item, RetryItem)
    with pytest.raises(AttributeError):
        item.attempt = 5  # type: ignore[misc]


async def test_finishing_by_id_leaves_an_item_a_worker_holds_alone(
    bus: EventBus, clock: ManualClock
) -> None:
    item = await bus.retry_queue.add(make_event(), "h", "e", next_retry=clock.now())
    await bus.retry_queue.claim_due(1, lease=30, owner="worker")
    assert await bus.retry_queue.mark_success(item.id) is False
    assert await bus.retry_queue.mark_failed(item.id) is None
    assert await bus.retry_queue.update_attempt(item.id, clock.now(), 2) is False
    assert await bus.retry_queue.count() == 1
    clock.advance(30)
    assert await bus.retry_queue.mark_success(item.id) is True


async def test_stats_count_what_falls_due_within_a_minute_and_an_hour(
    bus: EventBus, clock: ManualClock
) -> None:
    now = clock.now()
    for seconds in (-5, 30, 600, 7200):
        await bus.retry_queue.add(
            Event("x", {}), "h", "boom", next_retry=now + timedelta(seconds=seconds)
        )
    stats = await bus.stats()
    assert (stats.due_within_minute, stats.due_within_hour) == (2, 3)
    assert stats.to_dict()["due_within_hour"] == 3


async def test_recording_the_same_failures_twice_adds_them_once(
    store: Store, clock: ManualClock
) -> None:
    """A write repeated after a lost reply (publish retries through an outage)."""
    bus = EventBus(store, clock=clock)
    event = Event("x", {"n": 1})
    item = RetryItem.for_failure(
        event,
        "h",
        ErrorInfo("boom", "TimeoutError"),
        attempt=1,
        max_retries=3,
        next_retry=clock.now(),
        now=clock.now(),
    )
    dead = DeadLetterItem.for_failure(
        event,
        "g",
        ErrorInfo("bad", "ValueError"),
        reason="non-retryable: ValueError",
        attempt=0,
        max_retries=3,
        now=clock.now(),
    )
    before = (await store.counters()).retry_added
    await store.record_failures([item], [dead])
    await store.record_failures([item], [dead])
    assert [i.id for i in await bus.retry_queue.list()] == [item.id]
    assert [d.id for d in await bus.dead_letters.list()] == [dead.id]
    assert (await store.counters()).retry_added == before + 1


async def test_migrate_is_idempotent_and_reports_the_schema_version(store: Store) -> None:
    version = await store.migrate()
    assert version == await store.schema_version()
    assert await store.migrate() == version
    assert version is None or (isinstance(version, int) and version >= 1)
