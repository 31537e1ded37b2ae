"""The dead letter queue conformance suite: every store engine must pass all of it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from retrybus import (
    AmbiguousId,
    DeadLetterItem,
    Event,
    EventBus,
    FixedDelay,
    ItemNotFound,
    ManualClock,
    UnknownHandler,
)


async def dead_letter(
    bus: EventBus,
    n: int = 1,
    *,
    handler: str = "h",
    event_type: str = "like.added",
    reason: str = "failed after 3 retries",
) -> DeadLetterItem:
    item = await bus.retry_queue.add(
        Event(event_type, {"n": n}, source="svc"), handler, TimeoutError("connection timeout")
    )
    dead = await bus.retry_queue.mark_failed(item, reason=reason)
    assert dead is not None
    return dead


async def test_add_records_a_retry_item_as_a_dead_letter(bus: EventBus) -> None:
    item = await bus.retry_queue.add(Event("like.added", {"n": 1}), "h", "boom")
    dead = await bus.dead_letters.add(
        item, reason="non-retryable: ValueError", error=ValueError("bad")
    )
    assert dead.id.startswith("dlq_")
    assert (dead.reason, dead.error, dead.error_type, dead.processed) == (
        "non-retryable: ValueError",
        "bad",
        "ValueError",
        False,
    )
    assert await bus.dead_letters.get(dead.id) == dead
    assert await bus.retry_queue.count() == 1


async def test_list_is_newest_first_with_paging(bus: EventBus, clock: ManualClock) -> None:
    ids = []
    for n in range(5):
        ids.append((await dead_letter(bus, n)).id)
        clock.advance(1)
    listed = await bus.dead_letters.list()
    assert [d.id for d in listed] == ids[::-1]
    assert [d.id for d in await bus.dead_letters.list(limit=2, offset=1)] == ids[::-1][1:3]


async def test_list_filters_by_type_handler_and_processed(
    bus: EventBus, clock: ManualClock
) -> None:
    a = await dead_letter(bus, 1, handler="A", event_type="like.added")
    b = await dead_letter(bus, 2, handler="B", event_type="comment.created")
    bus.subscribe("*", lambda event: None, name="A")
    await bus.dead_letters.reprocess(a.id)
    assert [d.id for d in await bus.dead_letters.list(event_type="comment.created")] == [b.id]
    assert [d.id for d in await bus.dead_letters.list(handler_name="A")] == [a.id]
    assert [d.id for d in await bus.dead_letters.list(processed=True)] == [a.id]
    assert [d.id for d in await bus.dead_letters.list(processed=False)] == [b.id]
    assert await bus.dead_letters.list(handler_name="A", processed=False) == []


async def test_count_counts_all_or_by_processed(bus: EventBus) -> None:
    first = await dead_letter(bus, 1, handler="A")
    await dead_letter(bus, 2, handler="B")
    bus.subscribe("*", lambda event: None, name="A")
    await bus.dead_letters.reprocess(first.id)
    assert await bus.dead_letters.count() == 2
    assert await bus.dead_letters.count(processed=True) == 1
    assert await bus.dead_letters.count(processed=False) == 1


async def test_get_and_delete_unknown_ids_raise_item_not_found(bus: EventBus) -> None:
    with pytest.raises(ItemNotFound, match="dlq_missing"):
        await bus.dead_letters.get("dlq_missing")
    with pytest.raises(ItemNotFound):
        await bus.dead_letters.delete("dlq_missing")
    with pytest.raises(ItemNotFound):
        await bus.dead_letters.requeue("dlq_missing")
    with pytest.raises(ItemNotFound):
        await bus.dead_letters.reprocess("dlq_missing")


async def test_delete_removes_one_dead_letter(bus: EventBus) -> None:
    keep = await dead_letter(bus, 1)
    drop = await dead_letter(bus, 2)
    await bus.dead_letters.delete(drop.id)
    assert [d.id for d in await bus.dead_letters.list()] == [keep.id]


async def test_reprocess_success_marks_the_item_processed(
    bus: EventBus, clock: ManualClock
) -> None:
    seen: list[Event] = []

    async def handler(event: Event) -> None:
        seen.append(event)

    bus.subscribe("like.added", handler, name="h")
    dead = await dead_letter(bus)
    clock.advance(5)
    done = await bus.dead_letters.reprocess(dead.id)
    assert seen == [dead.to_event()]
    assert done.processed is True
    assert done.processed_at == clock.now()
    stored = await bus.dead_letters.get(dead.id)
    assert stored.processed is True
    assert stored.processed_at == clock.now()
    assert stored.metadata["reprocess_count"] == 1


async def test_reprocess_failure_keeps_the_item_with_the_new_error(bus: EventBus) -> None:
    def handler(event: Event) -> None:
        raise ConnectionError("email service unavailable")

    bus.subscribe("like.added", handler, name="h")
    dead = await dead_letter(bus)
    after = await bus.dead_letters.reprocess(dead.id)
    assert after.processed is False
    stored = await bus.dead_letters.get(dead.id)
    assert (stored.error, stored.error_type, stored.processed) == (
        "email service unavailable",
        "ConnectionError",
        False,
    )
    assert "email service unavailable" in stored.traceback


async def test_reprocess_needs_the_handler_on_this_bus(bus: EventBus) -> None:
    dead = await dead_letter(bus, handler="GoneHandler")
    with pytest.raises(UnknownHandler, match="GoneHandler"):
        await bus.dead_letters.reprocess(dead.id)


async def test_requeue_moves_the_item_back_due_now_with_fresh_retries(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h", policy=FixedDelay(max_retries=5))
    dead = await dead_letter(bus)
    retry = await bus.dead_letters.requeue(dead.id)
    assert await bus.dead_letters.count() == 0
    stored = await bus.retry_queue.get(retry.id)
    assert (stored.attempt, stored.max_retries, stored.next_retry) == (1, 5, clock.now())
    assert stored.to_event() == dead.to_event()
    assert stored.metadata["requeued_from"] == dead.id
    assert [i.id for i in await bus.retry_queue.claim_due(10)] == [retry.id]


async def test_cleanup_deletes_dead_letters_created_before_a_time(
    bus: EventBus, clock: ManualClock
) -> None:
    await dead_letter(bus, 1)
    clock.advance(100)
    young = await dead_letter(bus, 2)
    assert await bus.dead_letters.cleanup(before=clock.now() - timedelta(seconds=50)) == 1
    assert [d.id for d in await bus.dead_letters.list()] == [young.id]


async def test_cleanup_by_default_deletes_dead_letters_older_than_thirty_days(
    bus: EventBus, clock: ManualClock
) -> None:
    await dead_letter(bus)
    clock.advance(30 * 24 * 3600 - 1)
    assert await bus.dead_letters.cleanup() == 0
    clock.advance(2)
    assert await bus.dead_letters.cleanup() == 1
    assert await bus.dead_letters.count() == 0


async def test_dead_letters_keep_the_whole_event(bus: EventBus) -> None:
    event = Event(
        "comment.created",
        {"text": "héllo <b>", "ids": [1, 2]},
        source="svc",
        subject="post/1",
        extensions={"correlationid": "c-1"},
    )
    item = await bus.retry_queue.add(event, "h", "boom")
    dead = await bus.retry_queue.mark_failed(item)
    assert dead is not None
    stored = await bus.dead_letters.get(dead.id)
    assert stored.to_event() == event
    assert stored.to_event().to_dict() == event.to_dict()


async def test_count_groups_and_delete_take_filter_fields_as_keywords(bus: EventBus) -> None:
    await dead_letter(bus, 1, handler="A", event_type="x")
    await dead_letter(bus, 2, handler="B", event_type="x")
    await dead_letter(bus, 3, handler="B", event_type="y")
    queue = bus.dead_letters
    assert await queue.count(event_type="x") == 2
    assert await queue.count(handler_name="B", event_type="y") == 1
    assert await queue.count(False, handler_name="A") == 1
    assert [g.count for g in await queue.groups(event_type="x")] == [1, 1]
    assert [(c.key, c.count) for c in await queue.counts_by("handler_name", event_type="x")] == [
        ("A", 1),
        ("B", 1),
    ]
    with pytest.raises(TypeError, match="'handler'"):
        await queue.count(handler="A")  # type: ignore[call-arg]
    assert await queue.delete_matching(handler_name="B", event_type="x") == 1
    assert await queue.count() == 2


async def test_a_dead_letter_is_found_by_a_unique_start_of_its_id(bus: EventBus) -> None:
    first = await dead_letter(bus, 1)
    second = await dead_letter(bus, 2)
    common = next(i for i, (a, b) in enumerate(zip(first.id, second.id, strict=True)) if a != b)
    assert await bus.dead_letters.resolve_id(first.id) == first.id
    assert await bus.dead_letters.resolve_id(first.id[: common + 1]) == first.id
    assert await bus.dead_letters.resolve_id(second.id[: common + 1]) == second.id
    assert await bus.store.find_dead_ids("dlq_", limit=10) == sorted([first.id, second.id])
    assert await bus.store.find_dead_ids("dlq_", limit=1) == [min(first.id, second.id)]
    with pytest.raises(AmbiguousId) as ambiguous:
        await bus.dead_letters.resolve_id(first.id[:common])
    assert sorted(ambiguous.value.matches) == sorted([first.id, second.id])
    assert first.id in str(ambiguous.value)
    with pytest.raises(ItemNotFound):
        await bus.dead_letters.resolve_id("dlq_zz")
    # characters special to a glob, LIKE or a regex are plain characters here
    for odd in ("dlq_*", "dlq_%", "dlq_.", "dlq_[0-9]", "dlq_\\"):
        with pytest.raises(ItemNotFound):
            await bus.dead_letters.resolve_id(odd)
