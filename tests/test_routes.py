"""Publish across services (issue 12): a service's stored subscriptions route
each event published by another service's bus to it, recorded in the same
store write as the publisher's own deliveries (durable, deferred) or before its
handlers run (not durable). Buses of different services share one store object
here; across processes and engines, see the services process tests."""

from __future__ import annotations

from typing import Any

import pytest

from retrybus import Event, EventBus, ManualClock, RetryItem, Store
from retrybus._patterns import PatternIndex
from retrybus._records import delivery_id
from retrybus._services import StoredSubscription
from retrybus._stores.memory import MemoryStore


def two_buses(store: Store | None = None, **options: Any) -> tuple[EventBus, EventBus]:
    """The social service (counting likes) and the notification service (told
    of likes and comments), on one store."""
    store = store or MemoryStore()
    clock = ManualClock()
    social = EventBus(store, service="social", clock=clock, **options)
    notifications = EventBus(store, service="notifications", clock=clock, **options)

    async def count(event: Event) -> None:
        return None

    async def notify(event: Event) -> None:
        return None

    social.subscribe("like.added", count, name="CountLikes")
    notifications.subscribe(["like.*", "comment.added"], notify, name="Notify")
    return social, notifications


async def records_of(store: Store, service: str) -> list[RetryItem]:
    return await store.list_retry(limit=1000, offset=0, service=service)


async def test_an_event_reaches_a_registered_service_as_a_pending_delivery() -> None:
    social, notifications = two_buses()
    registration = await notifications.register()
    assert registration.added == ("Notify",)
    event = Event("like.added", {"post_id": 7}, source="social")
    result = await social.publish(event)
    assert result.succeeded == ("CountLikes",)
    assert result.routed == ("notifications/Notify",)
    (record,) = await records_of(social.store, "notifications")
    assert record.id == delivery_id("social", event.id, "Notify", "notifications")
    assert (record.handler_name, record.attempt, record.lease_owner) == ("Notify", 0, None)
    assert record.to_event() == event
    assert await records_of(social.store, "social") == []  # its own: handled and removed


async def test_a_service_registered_later_receives_only_later_events() -> None:
    social, notifications = two_buses()
    before = await social.publish(Event("like.added", {"post_id": 1}))
    assert before.routed == ()
    await notifications.register()
    after = await social.publish(Event("like.added", {"post_id": 2}))
    assert after.routed == ("notifications/Notify",)
    (record,) = await records_of(social.store, "notifications")
    assert record.event_data == {"post_id": 2}


async def test_an_event_no_other_service_subscribes_to_is_not_routed() -> None:
    social, notifications = two_buses()
    await notifications.register()
    result = await social.publish(Event("post.created"))
    assert (result.succeeded, result.routed) == ((), ())
    assert await social.store.retry_count() == 0


async def test_a_services_own_stored_subscriptions_are_not_routed_to_it() -> None:
    social, notifications = two_buses()
    await social.register()  # its handlers run from its own registry
    await notifications.register()
    result = await social.publish(Event("like.added"))
    assert result.succeeded == ("CountLikes",)
    assert result.routed == ("notifications/Notify",)
    assert await records_of(social.store, "social") == []


@pytest.mark.parametrize("durable", [True, False])
async def test_the_other_services_delivery_is_recorded_before_the_handlers_run(
    durable: bool,
) -> None:
    social, notifications = two_buses()
    await notifications.register()
    seen: list[int] = []

    async def look(event: Event) -> None:
        seen.append(len(await records_of(social.store, "notifications")))

    social.subscribe("like.added", look, name="Look")
    result = await social.publish(Event("like.added"), durable=durable)
    assert seen == [1]  # a crash while it ran would not lose the other service's delivery
    assert result.routed == ("notifications/Notify",)


async def test_a_durable_publish_writes_both_services_records_at_once() -> None:
    store = MemoryStore()
    social, notifications = two_buses(store)
    await notifications.register()
    writes: list[list[str]] = []
    record_pending = store.record_pending

    async def counted(items: Any) -> set[str]:
        writes.append(sorted(f"{item.service}/{item.handler_name}" for item in items))
        return await record_pending(items)

    store.record_pending = counted  # type: ignore[method-assign]
    await social.publish(Event("like.added"), durable=True)
    assert writes == [["notifications/Notify", "social/CountLikes"]]


async def test_a_deferred_publish_leaves_both_to_the_workers() -> None:
    social, notifications = two_buses()
    await notifications.register()
    result = await social.publish(Event("comment.added"), defer=True)
    assert (result.pending, result.routed) == ((), ("notifications/Notify",))
    result = await social.publish(Event("like.added"), deliver_in=60)
    assert (result.pending, result.routed) == (("CountLikes",), ("notifications/Notify",))
    now = social.clock.now()
    kinds = sorted(
        (item.service, item.handler_name, item.kind(now))
        for item in await social.store.list_retry(limit=100, offset=0)
    )
    assert kinds == [
        ("notifications", "Notify", "pending"),
        ("notifications", "Notify", "scheduled"),
        ("social", "CountLikes", "scheduled"),
    ]


async def test_the_same_event_published_twice_is_one_delivery_to_the_other_service() -> None:
    social, notifications = two_buses()
    await notifications.register()
    event = Event("like.added", {"post_id": 3})
    first = await social.publish(event, defer=True)
    second = await social.publish(event, defer=True)
    assert first.routed == second.routed == ("notifications/Notify",)
    assert len(await records_of(social.store, "notifications")) == 1


async def test_a_pruned_or_removed_subscription_is_routed_no_more() -> None:
    social, notifications = two_buses()
    await notifications.register()
    assert (await social.publish(Event("like.added"))).routed == ("notifications/Notify",)
    notifications.unsubscribe("Notify")
    registration = await notifications.register(prune=True)
    assert registration.removed == ("Notify",)
    assert (await social.publish(Event("like.added"))).routed == ()


async def test_a_change_made_by_another_process_is_seen_at_the_next_check() -> None:
    """A write straight to the store stands for another process's: no bus of
    this process is told, so each sees it at its next check of the revision."""
    store = MemoryStore()
    clock = ManualClock()
    eager = EventBus(store, service="social", clock=clock, route_refresh=0)
    lazy = EventBus(store, service="social", clock=clock, route_refresh=3600)
    for bus in (eager, lazy):
        assert (await bus.publish(Event("like.added"))).routed == ()  # the copy is read
    now = clock.now()
    notify = StoredSubscription(
        service="notifications",
        handler_name="Notify",
        patterns=("like.*",),
        policy="ExponentialBackoff()",
        max_retries=5,
        registered_at=now,
        updated_at=now,
    )
    await store.put_subscriptions("notifications", [notify], prune=False, now=now, actor="test")
    assert (await eager.publish(Event("like.added"))).routed == ("notifications/Notify",)
    assert (await lazy.publish(Event("like.added"))).routed == ()  # within its hour
    (record,) = await records_of(store, "notifications")
    assert record.max_retries == 5  # as the subscription says, whatever the publisher's policy


def test_route_refresh_must_be_seconds() -> None:
    for value in (-1, "5", True, float("inf")):
        with pytest.raises(ValueError, match=f"route_refresh must be .* got {value!r}"):
            EventBus(MemoryStore(), route_refresh=value)  # type: ignore[arg-type]


def test_a_pattern_index_finds_each_item_once_in_the_order_added() -> None:
    index: PatternIndex[str] = PatternIndex()
    index.add("a", ["like.*", "like.added"], "A")
    index.add("b", ["like.added"], "B")
    index.add("c", ["*.added", "comment.*"], "C")
    assert index.match("like.added") == ("A", "B", "C")
    assert index.match("comment.added") == ("C",)
    assert index.match("post.created") == ()
    index.remove("a")
    assert index.match("like.added") == ("B", "C")
    with pytest.raises(ValueError, match="'b' is in the index already"):
        index.add("b", ["x"], "B2")
