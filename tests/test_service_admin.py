"""``bus.services`` (issue 12): the services sharing a store, their subscriptions,
workers and loads, and the removal of a subscription, which dead-letters what
waited for it (never drops it) and is refused while a live worker runs the
handler; and a dead letter of another service, which is requeued, never
reprocessed, from here. On every engine."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest

from retrybus import (
    DeadLetterFilter,
    DeadLetterItem,
    Event,
    EventBus,
    ManualClock,
    OtherService,
    RetryItem,
    RetryWorker,
    Store,
    SubscriptionInUse,
    UnknownSubscription,
    WorkerBeat,
)
from retrybus._records import ErrorInfo


def social_and_notifications(
    store: Store, clock: ManualClock
) -> tuple[EventBus, EventBus, list[Event]]:
    """The social service (publishing likes) and the notification service, with
    two handlers; what the notification handlers were called with."""
    social = EventBus(store, service="social", clock=clock, route_refresh=0)
    notifications = EventBus(store, service="notifications", clock=clock, route_refresh=0)
    seen: list[Event] = []

    async def notify(event: Event) -> None:
        seen.append(event)

    notifications.subscribe("like.*", notify, name="Notify")
    notifications.subscribe("like.added", notify, name="Digest")
    return social, notifications, seen


async def waiting(store: Store, service: str, handler: str) -> list[RetryItem]:
    return await store.list_retry(limit=1000, offset=0, service=service, handler_name=handler)


# looking -----------------------------------------------------------------------------


async def test_services_lists_subscriptions_workers_and_loads(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, _seen = social_and_notifications(store, clock)
    await notifications.register()
    await social.publish(Event("like.added"), defer=True)
    await social.publish(Event("like.removed"), defer=True)
    assert [(s.service, s.handler_name) for s in await social.services.list()] == [
        ("notifications", "Digest"),
        ("notifications", "Notify"),
    ]
    assert await social.services.list("social") == []
    loads = {(load.service, load.handler_name): load for load in await social.services.loads()}
    assert (loads["notifications", "Notify"].pending, loads["notifications", "Digest"].pending) == (
        2,
        1,
    )
    assert await social.services.workers() == []
    async with RetryWorker(notifications, check_interval=0.02, name="n-1"):
        (beat,) = await social.services.workers()
        assert (beat.name, beat.service) == ("n-1", "notifications")
        assert [b.name for b in await social.services.workers("notifications")] == ["n-1"]
        assert await social.services.workers("social") == []


async def test_the_overview_shows_each_service_its_handlers_workers_and_a_warning(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, _seen = social_and_notifications(store, clock)
    await notifications.register()
    await social.publish(Event("like.added"), defer=True)
    clock.advance(4)
    (summary,) = await social.services.overview()
    assert summary.service == "notifications"
    assert [h.handler_name for h in summary.handlers] == ["Digest", "Notify"]
    digest = summary.handlers[0]
    assert digest.subscription is not None
    assert digest.subscription.patterns == ("like.added",)
    assert (digest.load.pending, summary.waiting, summary.workers) == (1, 2, ())
    assert summary.oldest_pending_age == pytest.approx(4, abs=0.01)
    assert summary.warning == "no live worker"
    await store.beat(
        WorkerBeat(
            name="n-1",
            service="notifications",
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=clock.now(),
            last_seen=clock.now(),
            interval=10.0,
            lanes=8,
            lanes_busy=1,
            handlers=("Notify", "Digest"),
        )
    )
    (summary,) = await social.services.overview("notifications")
    assert ([w.name for w in summary.workers], summary.warning) == (["n-1"], None)
    clock.advance(31)
    (summary,) = await social.services.overview()
    assert (summary.workers, summary.stale_workers, summary.warning) == (
        (),
        1,
        "no live worker",
    )
    await social.services.remove("notifications", "Digest", actor="alice")
    (summary,) = await social.services.overview()
    assert [h.handler_name for h in summary.handlers] == ["Digest", "Notify"]
    assert summary.handlers[0].removed
    assert summary.handlers[0].load.dead_unprocessed == 1
    assert await social.services.overview("social") == []


# removing ----------------------------------------------------------------------------


async def test_removing_a_subscription_dead_letters_what_waited_for_it_with_the_reason(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, _seen = social_and_notifications(store, clock)
    await notifications.register()
    announced: list[DeadLetterItem] = []
    social.on_dead_letter(announced.append)
    events = [Event("like.added", {"post": n}) for n in range(3)]
    for event in events:
        assert (await social.publish(event)).routed == (
            "notifications/Digest",
            "notifications/Notify",
        )

    removal = await social.services.remove("notifications", "Notify", actor="alice")
    assert (removal.service, removal.removed, removal.dead_lettered, removal.leased) == (
        "notifications",
        ("Notify",),
        3,
        0,
    )
    assert await waiting(store, "notifications", "Notify") == []
    assert len(await waiting(store, "notifications", "Digest")) == 3  # not removed
    dead = await store.list_dead(DeadLetterFilter(service="notifications"), limit=10, offset=0)
    assert sorted(d.event_id for d in dead) == sorted(e.id for e in events)
    assert {(d.handler_name, d.reason) for d in dead} == {
        ("Notify", "subscription removed: notifications/Notify (by alice)")
    }
    assert sorted(d.id for d in announced) == sorted(d.id for d in dead)  # hooks, metrics, log
    # routed no more, at once in this process
    assert (await social.publish(Event("like.added"))).routed == ("notifications/Digest",)
    (tombstone,) = [
        s for s in await social.services.list(removed=True) if s.handler_name == "Notify"
    ]
    assert (tombstone.removed, tombstone.removed_by) == (True, "alice")


async def test_removing_every_handler_of_a_service_and_removing_again(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, _seen = social_and_notifications(store, clock)
    await notifications.register()
    await social.publish(Event("like.added"))
    removal = await social.services.remove("notifications", actor="bob")
    assert (removal.removed, removal.dead_lettered) == (("Digest", "Notify"), 2)
    assert (await social.publish(Event("like.added"))).routed == ()
    # a publisher whose copy of the routes was stale wrote one since: removing again sweeps it
    now = clock.now()
    stale = RetryItem.pending(
        Event("like.added"), "Notify", max_retries=3, due=now, now=now, service="notifications"
    )
    await store.record_pending([stale])
    again = await social.services.remove("notifications", "Notify", actor="bob")
    assert (again.removed, again.dead_lettered) == ((), 1)
    with pytest.raises(UnknownSubscription, match="no subscription notifications/Nope is stored"):
        await social.services.remove("notifications", "Nope", actor="bob")
    with pytest.raises(UnknownSubscription, match="no subscription of service nobody"):
        await social.services.remove("nobody", actor="bob")
    for actor in ("", None):
        with pytest.raises(ValueError, match="actor must be a non-empty string"):
            await social.services.remove("notifications", actor=actor)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a service name is"):
        await social.services.remove("no/slash", actor="bob")


async def test_a_leased_delivery_is_dead_lettered_once_its_lease_ran_out(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, _seen = social_and_notifications(store, clock)
    await notifications.register()
    now = clock.now()
    running = RetryItem.pending(
        Event("like.added"),
        "Notify",
        max_retries=3,
        due=now,
        now=now,
        lease_owner="worker-elsewhere",
        lease_until=now + timedelta(seconds=60),
        service="notifications",
    )
    await store.record_pending([running])
    removal = await social.services.remove("notifications", "Notify", actor="alice")
    assert (removal.dead_lettered, removal.leased) == (0, 1)
    assert [item.id for item in await waiting(store, "notifications", "Notify")] == [running.id]
    clock.advance(61)
    assert await social.services.sweep() == 1
    assert await waiting(store, "notifications", "Notify") == []
    (dead,) = await store.list_dead(DeadLetterFilter(handler_name="Notify"), limit=5, offset=0)
    assert dead.reason == "subscription removed: notifications/Notify (by alice)"


async def test_a_removal_is_refused_while_a_live_worker_runs_the_handler(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, _seen = social_and_notifications(store, clock)
    worker = RetryWorker(notifications, check_interval=0.02, name="notifications-1")
    await worker.start()
    try:
        with pytest.raises(SubscriptionInUse) as refused:
            await social.services.remove("notifications", "Notify", actor="alice")
        message = str(refused.value)
        assert "cannot remove notifications/Notify" in message
        assert "notifications-1" in message
        assert "force" in message
        assert refused.value.workers == [
            f"notifications-1 (pid {os.getpid()} on {socket.gethostname()})"
        ]
        with pytest.raises(SubscriptionInUse, match="notifications/Digest, notifications/Notify"):
            await social.services.remove("notifications", actor="alice")
        assert len(await social.services.list("notifications")) == 2  # nothing removed
        forced = await social.services.remove("notifications", "Notify", actor="alice", force=True)
        assert forced.removed == ("Notify",)
    finally:
        await worker.stop()
    # the worker stopped (its beat is gone): nothing refuses now
    assert (await social.services.remove("notifications", actor="alice")).removed == ("Digest",)


async def test_a_worker_not_seen_for_three_intervals_refuses_nothing(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, _seen = social_and_notifications(store, clock)
    await notifications.register()
    await store.beat(
        WorkerBeat(
            name="died",
            service="notifications",
            host="elsewhere",
            pid=7,
            started_at=clock.now(),
            last_seen=clock.now(),
            interval=10.0,
            lanes=16,
            handlers=("Notify", "Digest"),
        )
    )
    with pytest.raises(SubscriptionInUse, match=r"died \(pid 7 on elsewhere\)"):
        await social.services.remove("notifications", "Notify", actor="alice")
    clock.advance(31)
    assert (await social.services.remove("notifications", "Notify", actor="alice")).removed == (
        "Notify",
    )


# a dead letter of another service ------------------------------------------------


async def test_a_dead_letter_of_another_service_is_requeued_not_reprocessed(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, seen = social_and_notifications(store, clock)
    mine: list[Event] = []

    async def social_notify(event: Event) -> None:  # a handler of the same name in social
        mine.append(event)

    social.subscribe("like.added", social_notify, name="Notify")
    await notifications.register()
    event = Event("like.added", {"post": 1})
    letter = DeadLetterItem.for_failure(
        event,
        "Notify",
        ErrorInfo("smtp down", "ConnectionError"),
        reason="failed after 3 retries",
        attempt=3,
        max_retries=3,
        now=clock.now(),
        service="notifications",
    )
    await store.record_failures([], [letter])

    with pytest.raises(OtherService) as refused:
        await social.dead_letters.reprocess(letter.id)
    assert str(refused.value) == (
        f"dead letter {letter.id} belongs to service notifications: requeue it, or "
        "reprocess it from that service's app"
    )
    result = await social.dead_letters.reprocess_many([letter.id])
    assert result.failed == {letter.id: str(refused.value)}
    assert mine == []
    assert seen == []
    assert not (await store.get_dead(letter.id)).processed  # type: ignore[union-attr]

    retry = await social.dead_letters.requeue(letter.id, actor="alice")
    assert (retry.service, retry.handler_name, retry.max_retries) == ("notifications", "Notify", 3)
    assert await RetryWorker(social).run_once() == 0  # not social's to run
    assert await RetryWorker(notifications).run_once() == 1
    assert [e.id for e in seen] == [event.id]
    assert mine == []

    # its own service's app reprocesses it
    other = DeadLetterItem.for_failure(
        Event("like.added", {"post": 2}),
        "Notify",
        ErrorInfo("smtp down", "ConnectionError"),
        reason="failed after 3 retries",
        attempt=3,
        max_retries=3,
        now=clock.now(),
        service="notifications",
    )
    await store.record_failures([], [other])
    assert (await notifications.dead_letters.reprocess(other.id)).processed


async def test_a_reprocess_redrive_takes_only_its_own_services_dead_letters(
    store: Store, clock: ManualClock
) -> None:
    social, notifications, seen = social_and_notifications(store, clock)
    mine: list[Event] = []

    async def social_notify(event: Event) -> None:
        mine.append(event)

    social.subscribe("like.added", social_notify, name="Notify")
    letters = [
        DeadLetterItem.for_failure(
            Event("like.added", {"n": n}),
            "Notify",
            ErrorInfo("down", "ConnectionError"),
            reason="failed after 3 retries",
            attempt=3,
            max_retries=3,
            now=clock.now(),
            service=service,
        )
        for n, service in enumerate(["social", "notifications", "social"])
    ]
    await store.record_failures([], letters)

    with pytest.raises(OtherService, match="those dead letters belong to service notifications"):
        await social.redrives.start(action="reprocess", service="notifications")

    redrive = await social.redrives.start(action="reprocess")
    assert (redrive.where.service, redrive.total) == ("social", 2)
    assert social.redrives.can_drive(redrive)
    assert not notifications.redrives.can_drive(redrive)
    done = await social.redrives.run(redrive.id, interval=0.01)
    assert (done.state, done.done, done.failed) == ("completed", 2, 0)
    assert len(mine) == 2
    assert seen == []
    unprocessed = await store.list_dead(DeadLetterFilter(processed=False), limit=10, offset=0)
    assert [(d.service, d.id) for d in unprocessed] == [("notifications", letters[1].id)]
