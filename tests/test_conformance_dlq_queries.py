"""Conformance suite, part three: filtering, counting and grouping dead letters, bulk
deletes, retry queue breakdowns and control records. Every store engine passes it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from retrybus import (
    DeadLetterFilter,
    DeadLetterItem,
    Event,
    EventBus,
    ManualClock,
    Store,
    failure_group_key,
)
from seeding import dead_letter as dead


def ids(items: list[DeadLetterItem]) -> list[str]:
    return [item.id for item in items]


# filters -------------------------------------------------------------------


async def test_list_and_count_filter_by_reason(bus: EventBus) -> None:
    a = await dead(bus, 1, reason="failed after 3 retries")
    b = await dead(bus, 2, reason="non-retryable: ValueError")
    where = DeadLetterFilter(reason="non-retryable: ValueError")
    assert ids(await bus.dead_letters.list(where=where)) == [b.id]
    assert await bus.dead_letters.count(where=where) == 1
    assert ids(await bus.dead_letters.list(reason="failed after 3 retries")) == [a.id]


async def test_list_filters_by_event_id(bus: EventBus) -> None:
    await dead(bus, 1)
    b = await dead(bus, 2)
    await dead(bus, 3)
    assert ids(await bus.dead_letters.list(event_id=b.event_id)) == [b.id]
    assert await bus.dead_letters.count(where=DeadLetterFilter(event_id="no-such-event")) == 0


async def test_time_range_includes_its_start_and_excludes_its_end(
    bus: EventBus, clock: ManualClock
) -> None:
    first = await dead(bus, 1)
    clock.advance(10)
    second = await dead(bus, 2)
    clock.advance(10)
    third = await dead(bus, 3)
    where = DeadLetterFilter(created_after=second.created_at, created_before=third.created_at)
    assert ids(await bus.dead_letters.list(where=where)) == [second.id]
    assert await bus.dead_letters.count(where=where) == 1
    since_first = DeadLetterFilter(created_after=first.created_at)
    assert ids(await bus.dead_letters.list(where=since_first)) == [third.id, second.id, first.id]
    until_second = DeadLetterFilter(created_before=second.created_at + timedelta(microseconds=1))
    assert ids(await bus.dead_letters.list(where=until_second)) == [second.id, first.id]


async def test_every_filter_field_combines_with_the_others(
    bus: EventBus, clock: ManualClock
) -> None:
    target = await dead(bus, 1, handler="A", event_type="comment.created", reason="r1")
    await dead(bus, 2, handler="A", event_type="like.added", reason="r1")
    await dead(bus, 3, handler="B", event_type="comment.created", reason="r1")
    await dead(bus, 4, handler="A", event_type="comment.created", reason="r2")
    where = DeadLetterFilter(
        handler_name="A",
        event_type="comment.created",
        reason="r1",
        processed=False,
        created_after=target.created_at - timedelta(seconds=1),
        created_before=target.created_at + timedelta(seconds=1),
        failure_group=target.failure_group,
        event_id=target.event_id,
    )
    assert ids(await bus.dead_letters.list(where=where)) == [target.id]
    assert await bus.dead_letters.count(where=where) == 1


async def test_filtered_paging_is_newest_first(bus: EventBus, clock: ManualClock) -> None:
    wanted = []
    for n in range(7):
        letter = await dead(bus, n, handler="A" if n % 2 == 0 else "B")
        if n % 2 == 0:
            wanted.append(letter.id)
        clock.advance(1)
    where = DeadLetterFilter(handler_name="A")
    assert ids(await bus.dead_letters.list(where=where)) == wanted[::-1]
    assert ids(await bus.dead_letters.list(2, 1, where=where)) == wanted[::-1][1:3]
    assert await bus.dead_letters.count(where=where) == 4


async def test_equally_old_dead_letters_list_by_id_descending(bus: EventBus) -> None:
    letters = [await dead(bus, n) for n in range(4)]  # the clock does not move
    assert ids(await bus.dead_letters.list()) == sorted(ids(letters), reverse=True)


# failure groups --------------------------------------------------------------


async def test_failure_group_filters_the_dead_letters_of_one_shape(bus: EventBus) -> None:
    a1 = await dead(bus, 1, handler="A", error=KeyError("order 17 not found"))
    a2 = await dead(bus, 2, handler="A", error=KeyError("order 8812 not found"))
    await dead(bus, 3, handler="B", error=KeyError("order 17 not found"))
    await dead(bus, 4, handler="A", error=ValueError("order 17 not found"))
    assert a1.failure_group == a2.failure_group
    listed = await bus.dead_letters.list(failure_group=a1.failure_group)
    assert set(ids(listed)) == {a1.id, a2.id}


async def test_group_dead_counts_per_field_largest_first(
    bus: EventBus, store: Store, clock: ManualClock
) -> None:
    for n in range(3):
        await dead(bus, n, handler="Mailer", event_type="comment.created")
        clock.advance(1)
    newest_mailer = await dead(bus, 9, handler="Mailer", event_type="like.added")
    await dead(bus, 10, handler="Counter", event_type="like.added")
    by_handler = await store.group_dead("handler_name", DeadLetterFilter(), limit=10)
    assert [(g.key, g.count) for g in by_handler] == [("Mailer", 4), ("Counter", 1)]
    mailer = by_handler[0]
    assert mailer.sample_id == newest_mailer.id
    assert mailer.last_at == newest_mailer.created_at
    assert mailer.first_at == newest_mailer.created_at - timedelta(seconds=3)
    by_type = await store.group_dead("event_type", DeadLetterFilter(), limit=10)
    assert [(g.key, g.count) for g in by_type] == [("comment.created", 3), ("like.added", 2)]
    by_reason = await store.group_dead("reason", DeadLetterFilter(), limit=10)
    assert [(g.key, g.count) for g in by_reason] == [("failed after 3 retries", 5)]


async def test_group_dead_breaks_ties_by_key_and_honours_limit_and_filter(
    bus: EventBus, store: Store
) -> None:
    for handler in ("C", "A", "B"):
        await dead(bus, 1, handler=handler)
    await dead(bus, 2, handler="C", event_type="other")
    groups = await store.group_dead("handler_name", DeadLetterFilter(), limit=10)
    assert [(g.key, g.count) for g in groups] == [("C", 2), ("A", 1), ("B", 1)]
    limited = await store.group_dead("handler_name", DeadLetterFilter(), limit=2)
    assert [g.key for g in limited] == ["C", "A"]
    filtered = await store.group_dead(
        "handler_name", DeadLetterFilter(event_type="like.added"), limit=10
    )
    assert [(g.key, g.count) for g in filtered] == [("A", 1), ("B", 1), ("C", 1)]
    assert await store.group_dead("handler_name", DeadLetterFilter(event_type="x"), limit=5) == []


async def test_group_dead_by_failure_group_uses_the_message_shape(
    bus: EventBus, store: Store
) -> None:
    for n in range(5):
        await dead(bus, n, handler="Mailer", error=ConnectionError(f"smtp 10.0.0.{n}:25 refused"))
    other = await dead(bus, 9, handler="Mailer", error=ValueError("bad address 'x@'"))
    groups = await store.group_dead("failure_group", DeadLetterFilter(), limit=10)
    assert [g.count for g in groups] == [5, 1]
    assert (
        groups[1].key
        == other.failure_group
        == failure_group_key("Mailer", "ValueError", "bad address 'y@z'")
    )


async def test_a_dead_letter_changes_group_when_its_error_changes(bus: EventBus) -> None:
    letter = await dead(bus, 1, handler="h", error=TimeoutError("connection timeout"))

    def handler(event: Event) -> None:
        raise PermissionError("token expired")

    bus.subscribe("like.added", handler, name="h")
    after = await bus.dead_letters.reprocess(letter.id)
    assert after.failure_group != letter.failure_group
    assert (
        await bus.dead_letters.count(where=DeadLetterFilter(failure_group=letter.failure_group))
        == 0
    )
    assert ids(await bus.dead_letters.list(failure_group=after.failure_group)) == [letter.id]


# bulk deletes ----------------------------------------------------------------


async def test_delete_dead_many_deletes_the_ids_it_finds(bus: EventBus, store: Store) -> None:
    letters = [await dead(bus, n) for n in range(4)]
    gone = await store.delete_dead_many([letters[0].id, letters[2].id, "dlq_missing"])
    assert gone == 2
    assert set(ids(await bus.dead_letters.list())) == {letters[1].id, letters[3].id}
    assert await store.delete_dead_many([letters[0].id]) == 0
    assert await store.delete_dead_many([]) == 0
    assert await store.count_dead(DeadLetterFilter(handler_name="h")) == 2


# retry queue breakdowns ------------------------------------------------------


async def test_group_retry_counts_items_per_handler_and_type(
    bus: EventBus, store: Store, clock: ManualClock
) -> None:
    due = clock.now() + timedelta(seconds=1)
    first = await bus.retry_queue.add(Event("a.x", {}), "Mailer", "boom", next_retry=due)
    await bus.retry_queue.add(
        Event("a.x", {}), "Mailer", "boom", next_retry=due + timedelta(seconds=5)
    )
    await bus.retry_queue.add(Event("b.y", {}), "Counter", "boom", next_retry=due)
    by_handler = await store.group_retry("handler_name", limit=10)
    assert [(g.key, g.count) for g in by_handler] == [("Mailer", 2), ("Counter", 1)]
    assert by_handler[0].sample_id == first.id
    assert by_handler[0].first_at == first.next_retry
    assert by_handler[0].last_at == first.next_retry + timedelta(seconds=5)
    by_type = await store.group_retry("event_type", limit=1)
    assert [(g.key, g.count) for g in by_type] == [("a.x", 2)]


# control records -------------------------------------------------------------


async def test_put_control_creates_only_when_absent(store: Store) -> None:
    assert await store.get_control("redrive:one") is None
    assert await store.put_control("redrive:one", {"state": "running"}, version=0) == 1
    assert await store.put_control("redrive:one", {"state": "other"}, version=0) is None
    record = await store.get_control("redrive:one")
    assert record is not None
    assert (record.key, record.version, dict(record.value)) == (
        "redrive:one",
        1,
        {"state": "running"},
    )


async def test_put_control_is_compare_and_set_on_the_version(store: Store) -> None:
    await store.put_control("k", {"n": 1}, version=0)
    assert await store.put_control("k", {"n": 2}, version=1) == 2
    assert await store.put_control("k", {"n": 3}, version=1) is None
    assert await store.put_control("k", {"n": 3}, version=5) is None
    record = await store.get_control("k")
    assert record is not None
    assert (record.version, dict(record.value)) == (2, {"n": 2})


async def test_control_values_round_trip_as_json(store: Store) -> None:
    value = {"text": "héllo <b> \u2603", "nested": {"list": [1, 2.5, None, True]}, "empty": {}}
    await store.put_control("doc", value, version=0)
    record = await store.get_control("doc")
    assert record is not None
    assert dict(record.value) == value


async def test_list_control_by_prefix_in_key_order(store: Store) -> None:
    for key in ("redrive:b", "redrive:a", "depth_history", "redrive:c"):
        await store.put_control(key, {"key": key}, version=0)
    listed = await store.list_control("redrive:")
    assert [r.key for r in listed] == ["redrive:a", "redrive:b", "redrive:c"]
    assert [dict(r.value)["key"] for r in listed] == ["redrive:a", "redrive:b", "redrive:c"]
    assert await store.list_control("nothing:") == []


async def test_delete_control(store: Store) -> None:
    await store.put_control("k", {}, version=0)
    assert await store.delete_control("k") is True
    assert await store.delete_control("k") is False
    assert await store.get_control("k") is None
    assert await store.put_control("k", {"again": True}, version=0) == 1


async def test_concurrent_writers_of_one_version_have_exactly_one_winner(store: Store) -> None:
    await store.put_control("race", {"n": 0}, version=0)
    results = await asyncio.gather(
        *(store.put_control("race", {"n": n}, version=1) for n in range(1, 9))
    )
    assert [r for r in results if r is not None] == [2]


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": object()}])
async def test_put_control_refuses_what_is_not_json(store: Store, bad: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        await store.put_control("bad", bad, version=0)
    assert await store.get_control("bad") is None


# keyset paging ---------------------------------------------------------------


async def test_a_cursor_pages_newest_first_through_equally_old_dead_letters(
    bus: EventBus, clock: ManualClock
) -> None:
    same_time = [await dead(bus, n) for n in range(3)]  # one created_at
    clock.advance(1)
    newer = await dead(bus, 9)
    clock.advance(1)
    newest = await dead(bus, 10)
    expected = [newest.id, newer.id, *sorted(ids(same_time), reverse=True)]
    seen: list[str] = []
    where = DeadLetterFilter(handler_name="h")
    while True:
        page = await bus.dead_letters.list(2, where=where)
        if not page:
            break
        seen += ids(page)
        last = page[-1]
        where = DeadLetterFilter(handler_name="h", cursor=(last.created_at, last.id))
    assert seen == expected
    middle = ids(
        await bus.dead_letters.list(where=DeadLetterFilter(cursor=(newer.created_at, newer.id)))
    )
    assert middle == expected[2:]
    assert (
        await bus.dead_letters.count(where=DeadLetterFilter(cursor=(newer.created_at, newer.id)))
        == 3
    )


async def test_a_cursor_combines_with_other_fields_and_groups(
    bus: EventBus, store: Store, clock: ManualClock
) -> None:
    letters = []
    for n in range(4):
        letters.append(await dead(bus, n, handler="A" if n % 2 else "B"))
        clock.advance(1)
    cursor = (letters[2].created_at, letters[2].id)
    assert ids(
        await bus.dead_letters.list(where=DeadLetterFilter(handler_name="A", cursor=cursor))
    ) == [letters[1].id]
    groups = await store.group_dead("handler_name", DeadLetterFilter(cursor=cursor), limit=5)
    assert [(g.key, g.count) for g in groups] == [("A", 1), ("B", 1)]


def test_a_cursor_needs_an_aware_time_and_an_id() -> None:
    with pytest.raises(ValueError, match="cursor"):
        DeadLetterFilter(cursor=(datetime(2026, 1, 1), "dlq_x"))
    with pytest.raises(ValueError, match="cursor"):
        DeadLetterFilter(cursor=("2026-01-01", "dlq_x"))  # type: ignore[arg-type]
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    where = DeadLetterFilter(cursor=(moment, "dlq_x"), processed=False)
    assert DeadLetterFilter.from_dict(where.to_dict()) == where
    assert "cursor" not in where.to_query()
