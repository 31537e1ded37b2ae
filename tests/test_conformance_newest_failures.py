"""``Store.newest_failures``, as every engine must answer it: per (service, handler),
the retry written last (the dashboard's "last error" of each handler), pending first
deliveries left out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from retrybus import Event, ManualClock, RetryItem, Store
from retrybus._outcomes import Rescheduled
from retrybus._records import ErrorInfo

# a time inside a millisecond (MongoDB keeps the microseconds beside it)
START = datetime(2025, 1, 7, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def failure(
    clock: ManualClock,
    n: int,
    handler: str,
    *,
    service: str = "default",
    error: str | None = None,
    due_in: float = 30.0,
    item_id: str | None = None,
) -> RetryItem:
    """Event ``n``'s delivery to ``handler`` of ``service``, failed now."""
    now = clock.now()
    return RetryItem.for_failure(
        Event("like.added", {"n": n}, source="svc", id=f"event-{n}", time=START),
        handler,
        ErrorInfo(error or f"boom {n}", "RuntimeError"),
        attempt=1,
        max_retries=5,
        next_retry=now + timedelta(seconds=due_in),
        now=now,
        service=service,
        id=item_id,
    )


def pending(clock: ManualClock, n: int, handler: str, *, due_in: float = 0.0) -> RetryItem:
    """Event ``n``'s first delivery to ``handler``, not made yet, due in ``due_in``."""
    now = clock.now()
    event = Event("like.added", {"n": n}, source="svc", id=f"pending-{n}", time=START)
    due = now + timedelta(seconds=due_in)
    return RetryItem.pending(event, handler, max_retries=5, due=due, now=now)


async def fail_at(store: Store, clock: ManualClock, seconds: float, *items: RetryItem) -> None:
    await store.record_failures(list(items), [])
    clock.advance(seconds)


def keyed(items: list[RetryItem]) -> list[tuple[str, str, str]]:
    return [(item.service, item.handler_name, item.error) for item in items]


async def test_each_handler_of_each_service_shows_its_newest_failure(
    store: Store, clock: ManualClock
) -> None:
    # failures at different times, the newest of each handler not the one due first
    await fail_at(store, clock, 1, failure(clock, 1, "a", due_in=5))
    await fail_at(store, clock, 1, failure(clock, 2, "b", service="billing", due_in=5))
    await fail_at(store, clock, 1, failure(clock, 3, "a", due_in=60))
    await fail_at(store, clock, 1, failure(clock, 4, "a", service="billing"))
    await fail_at(store, clock, 1, failure(clock, 5, "b", service="billing", due_in=600))
    await fail_at(store, clock, 1, failure(clock, 6, "b", due_in=1))
    found = await store.newest_failures(limit=10)
    assert keyed(found) == [
        ("default", "b", "boom 6"),
        ("billing", "b", "boom 5"),
        ("billing", "a", "boom 4"),
        ("default", "a", "boom 3"),
    ]


async def test_the_item_returned_is_whole_with_its_failure_time(
    store: Store, clock: ManualClock
) -> None:
    await fail_at(store, clock, 2, failure(clock, 1, "a"))
    newest = failure(clock, 2, "a")
    await fail_at(store, clock, 2, newest)
    [found] = await store.newest_failures(limit=10)
    assert found == newest
    assert found.updated_at == START + timedelta(seconds=2)


async def test_pending_first_deliveries_are_not_failures(store: Store, clock: ManualClock) -> None:
    await fail_at(store, clock, 1, failure(clock, 1, "a"))
    # newer than the failure, of its handler and of a handler with no failure
    await store.record_pending(
        [pending(clock, 2, "a"), pending(clock, 3, "c"), pending(clock, 4, "a", due_in=3600)]
    )
    assert keyed(await store.newest_failures(limit=10)) == [("default", "a", "boom 1")]


async def test_a_queue_of_pending_deliveries_only_has_no_failures(
    store: Store, clock: ManualClock
) -> None:
    await store.record_pending([pending(clock, 1, "a"), pending(clock, 2, "b")])
    assert await store.newest_failures(limit=10) == []


async def test_a_later_failure_of_an_older_item_makes_it_the_newest(
    store: Store, clock: ManualClock
) -> None:
    first = failure(clock, 1, "a", due_in=1)
    await fail_at(store, clock, 1, first)
    await fail_at(store, clock, 1, failure(clock, 2, "a", error="second"))
    [claimed] = await store.claim_due(
        now=clock.now(), limit=1, owner="w", lease_until=clock.now() + timedelta(seconds=60)
    )
    assert isinstance(claimed, RetryItem)
    assert claimed.id == first.id
    clock.advance(1)
    again = claimed.rescheduled(
        attempt=2,
        next_retry=clock.now() + timedelta(seconds=30),
        error=ErrorInfo("third", "TimeoutError"),
        now=clock.now(),
    )
    await store.complete([Rescheduled(again)], "w", clock.now())
    [found] = await store.newest_failures(limit=10)
    assert (found.id, found.error, found.attempt) == (first.id, "third", 2)
    assert found.updated_at == clock.now()


async def test_equal_times_are_decided_by_the_greater_id(store: Store, clock: ManualClock) -> None:
    await store.record_failures(
        [
            failure(clock, 1, "a", item_id="item-b"),
            failure(clock, 2, "a", item_id="item-c"),
            failure(clock, 3, "a", item_id="item-a"),
        ],
        [],
    )
    assert [item.id for item in await store.newest_failures(limit=10)] == ["item-c"]


async def test_handlers_failing_at_the_same_time_are_ordered_by_service_then_handler(
    store: Store, clock: ManualClock
) -> None:
    await store.record_failures(
        [
            failure(clock, 1, "b", service="zeta"),
            failure(clock, 2, "a", service="zeta"),
            failure(clock, 3, "b"),
        ],
        [],
    )
    found = await store.newest_failures(limit=10)
    assert [(item.service, item.handler_name) for item in found] == [
        ("default", "b"),
        ("zeta", "a"),
        ("zeta", "b"),
    ]


async def test_service_keeps_to_that_services_handlers(store: Store, clock: ManualClock) -> None:
    await fail_at(store, clock, 1, failure(clock, 1, "a", service="billing"))
    await fail_at(store, clock, 1, failure(clock, 2, "a"))
    await fail_at(store, clock, 1, failure(clock, 3, "b", service="billing"))
    billing = await store.newest_failures(service="billing", limit=10)
    assert keyed(billing) == [("billing", "b", "boom 3"), ("billing", "a", "boom 1")]
    assert keyed(await store.newest_failures(service="default", limit=10)) == [
        ("default", "a", "boom 2")
    ]
    assert await store.newest_failures(service="nobody", limit=10) == []


async def test_limit_keeps_the_newest_handlers(store: Store, clock: ManualClock) -> None:
    for n, handler in enumerate(["a", "b", "c", "d"]):
        await fail_at(store, clock, 1, failure(clock, n, handler))
    assert [item.handler_name for item in await store.newest_failures(limit=2)] == ["d", "c"]
    assert await store.newest_failures(limit=0) == []


async def test_a_claim_since_the_failure_counts_as_its_last_write(
    store: Store, clock: ManualClock
) -> None:
    # updated_at is also a claim's time: the claimed item's error is still its newest
    older = failure(clock, 1, "a", due_in=0)
    await fail_at(store, clock, 1, older)
    await fail_at(store, clock, 1, failure(clock, 2, "a", due_in=60))
    await store.claim_due(
        now=clock.now(), limit=1, owner="w", lease_until=clock.now() + timedelta(seconds=60)
    )
    [found] = await store.newest_failures(limit=10)
    assert (found.id, found.error, found.updated_at) == (older.id, "boom 1", clock.now())


@pytest.mark.parametrize("limit", [-1, 1.5, True])
async def test_a_bad_limit_is_refused_naming_it(store: Store, limit: object) -> None:
    with pytest.raises(ValueError, match=f"got {limit!r}"):
        await store.newest_failures(limit=limit)  # type: ignore[arg-type]


async def test_an_events_own_updated_at_field_is_not_the_records(
    store: Store, clock: ManualClock
) -> None:
    now = clock.now()
    event = Event("like.added", {"updated_at": "2099-01-01T00:00:00.000000+00:00"}, source="s")
    odd = RetryItem.for_failure(
        event, "a", ErrorInfo("odd", ""), attempt=1, max_retries=5, next_retry=now, now=now
    )
    await fail_at(store, clock, 1, odd)
    await fail_at(store, clock, 1, failure(clock, 2, "a"))
    assert keyed(await store.newest_failures(limit=10)) == [("default", "a", "boom 2")]
