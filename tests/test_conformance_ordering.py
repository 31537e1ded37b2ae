"""Ordering keys in the store, as every engine must keep them: a keyed record is
claimed only while no earlier record of its (service, handler, key) is in the
retry queue; other keys, other handlers and unkeyed records are not held up; a
retry of the head holds the key, its success or dead letter frees it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from retrybus import Event, ManualClock, RetryItem, Store
from retrybus._ordering import PARTITION_KEY, keyed
from retrybus._outcomes import DeadLettered, Rescheduled, Succeeded
from retrybus._records import ErrorInfo
from test_conformance_services import ADMIN_START, subscription


def keyed_pending(
    clock: ManualClock,
    n: int,
    key: str | None,
    handler: str = "h",
    *,
    service: str = "default",
) -> RetryItem:
    event = keyed(Event("order.changed", {"n": n}, source="shop", id=f"e{n}"), key)
    now = clock.now()
    return RetryItem.pending(event, handler, max_retries=3, due=now, now=now, service=service)


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


def ns(items: list[RetryItem]) -> list[int]:
    return sorted(item.event_data["n"] for item in items)


def test_the_key_rides_on_the_event_as_partitionkey() -> None:
    event = keyed(Event("x", {}), "order-1")
    assert event.extensions[PARTITION_KEY] == "order-1"
    item = RetryItem.pending(event, "h", max_retries=1, due=event.time, now=event.time)
    assert item.ordering_key == "order-1"
    assert item.to_event().extensions[PARTITION_KEY] == "order-1"


@pytest.mark.parametrize("bad", ["", "k" * 201, 5, b"k"])
def test_a_bad_ordering_key_is_refused_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match="ordering_key"):
        keyed(Event("x", {}), bad)  # type: ignore[arg-type]


async def test_only_the_earliest_record_of_a_key_is_claimed(
    store: Store, clock: ManualClock
) -> None:
    await store.record_pending(
        [
            keyed_pending(clock, 1, "a"),
            keyed_pending(clock, 2, "a"),
            keyed_pending(clock, 3, "b"),
            keyed_pending(clock, 4, None),
            keyed_pending(clock, 5, None),
            keyed_pending(clock, 6, "a", handler="other"),
            keyed_pending(clock, 7, "a", service="billing"),
        ]
    )
    await store.record_pending([keyed_pending(clock, 8, "a"), keyed_pending(clock, 9, "b")])
    first = await claim(store, clock)
    assert ns(first) == [1, 3, 4, 5, 6, 7]
    assert await claim(store, clock, owner="w2") == []  # the heads are leased
    head = next(item for item in first if item.event_data["n"] == 1)
    assert await store.complete([Succeeded(head)], "w", clock.now()) == {head.id}
    assert ns(await claim(store, clock, owner="w2")) == [2]
    assert await claim(store, clock, owner="w3") == []


async def test_a_keyed_record_waits_for_the_time_of_its_head(
    store: Store, clock: ManualClock
) -> None:
    await store.record_pending([keyed_pending(clock, 1, "a"), keyed_pending(clock, 2, "a")])
    (head,) = await claim(store, clock)
    retry = head.rescheduled(
        attempt=1,
        next_retry=clock.now() + timedelta(seconds=60),
        error=ErrorInfo("boom", "RuntimeError"),
        now=clock.now(),
    )
    assert await store.complete([Rescheduled(retry, first_delivery=True)], "w", clock.now())
    # the head waits for its retry: the key waits with it, and no one is woken for it
    assert await claim(store, clock) == []
    assert await store.next_due() == clock.now() + timedelta(seconds=60)
    clock.advance(61)
    (again,) = await claim(store, clock)
    assert again.id == head.id
    assert again.attempt == 1
    dead = again.to_dead_letter(reason="failed after 1 retries", now=clock.now())
    assert await store.complete(
        [DeadLettered(again.id, dead, first_delivery=False)], "w", clock.now()
    )
    assert ns(await claim(store, clock)) == [2]


async def test_a_released_head_is_claimed_again_before_the_rest(
    store: Store, clock: ManualClock
) -> None:
    await store.record_pending([keyed_pending(clock, n, "a") for n in range(1, 4)])
    (head,) = await claim(store, clock, handlers=["h"])
    assert await store.release([head.id], "w") == 1
    assert ns(await claim(store, clock, handlers=["h"])) == [1]


async def test_a_head_deleted_or_expired_frees_its_key_and_next_due_sees_the_next(
    store: Store, clock: ManualClock
) -> None:
    await store.record_pending([keyed_pending(clock, n, "a") for n in range(1, 4)])
    (head,) = await claim(store, clock)
    assert await store.release([head.id], "w") == 1
    assert await store.delete_retry(head.id)
    assert await store.next_due() == clock.now()
    (second,) = await claim(store, clock)
    assert second.event_data["n"] == 2
    assert await store.release([second.id], "w") == 1
    clock.advance(10)
    expired = await store.expire_retry(before=clock.now(), now=clock.now(), reason="expired")
    assert sorted(letter.event_data["n"] for letter in expired) == [2, 3]
    assert await store.next_due() is None
    assert await store.retry_count() == 0


async def test_a_parked_record_deleted_leaves_the_order_of_the_rest(
    store: Store, clock: ManualClock
) -> None:
    items = [keyed_pending(clock, n, "a") for n in range(1, 4)]
    await store.record_pending(items)
    assert await store.delete_retry(items[1].id)  # the middle one, held back
    (head,) = await claim(store, clock)
    assert await store.complete([Succeeded(head)], "w", clock.now()) == {head.id}
    assert ns(await claim(store, clock)) == [3]


async def test_a_requeued_dead_letter_goes_behind_the_records_of_its_key(
    store: Store, clock: ManualClock
) -> None:
    await store.record_pending([keyed_pending(clock, 1, "a")])
    (head,) = await claim(store, clock)
    dead = head.to_dead_letter(reason="non-retryable: KeyError", now=clock.now())
    assert await store.complete(
        [DeadLettered(head.id, dead, first_delivery=True)], "w", clock.now()
    )
    await store.record_pending([keyed_pending(clock, 2, "a")])
    again = dead.to_retry_item(max_retries=3, now=clock.now())
    assert again.ordering_key == "a"
    assert await store.requeue_dead(dead.id, again)
    (second,) = await claim(store, clock)
    assert second.event_data["n"] == 2  # the requeued one waits behind it
    assert await store.complete([Succeeded(second)], "w", clock.now()) == {second.id}
    (third,) = await claim(store, clock)
    assert third.id == again.id


async def test_removing_a_handler_dead_letters_its_held_back_records_too(
    store: Store, clock: ManualClock
) -> None:
    await store.record_pending(
        [keyed_pending(clock, n, "a", service="billing") for n in range(1, 4)]
        + [keyed_pending(clock, 4, "a", service="billing", handler="g")]
    )
    await store.put_subscriptions(
        "billing",
        [subscription("billing", "h"), subscription("billing", "g")],
        prune=False,
        now=ADMIN_START,
        actor="w",
    )
    await store.remove_subscriptions("billing", ["h"], now=clock.now(), actor="alice")
    moved: list[int] = []
    for _ in range(5):  # a sweep moves what it can see; a few rounds move every one
        letters = await store.dead_letter_unsubscribed(now=clock.now(), limit=100)
        moved += [letter.event_data["n"] for letter in letters]
        if not letters:
            break
    assert sorted(moved) == [1, 2, 3]
    assert ns(await claim(store, clock)) == [4]
