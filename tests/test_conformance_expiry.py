"""Expiry of the retry queue on every store engine: the cleanup (a worker's hourly
sweep, ``retry_retention`` 7 days by default) moves retries to the dead letter queue
by their age, but a deferred or scheduled first delivery only once it has been due,
unclaimed, for that long: never before its time."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from retrybus import Event, EventBus, ManualClock, RetryAfter, RetryWorker, Store

DAY = 24 * 3600
EXPIRED = "expired in retry queue"


def recording_bus(store: Store, clock: ManualClock, calls: list[datetime]) -> EventBus:
    bus = EventBus(store, clock=clock)

    @bus.handler("reminder.due", name="remind")
    async def remind(event: Event) -> None:
        calls.append(clock.now())

    return bus


async def test_a_delivery_scheduled_past_the_retention_survives_cleanup_and_runs_when_due(
    store: Store, clock: ManualClock
) -> None:
    calls: list[datetime] = []
    bus = recording_bus(store, clock, calls)
    due = clock.now() + timedelta(days=10)
    result = await bus.publish(Event("reminder.due", {"n": 1}), deliver_in=10 * DAY)
    assert result.pending == ("remind",)
    worker = RetryWorker(bus)
    clock.advance(8 * DAY)  # created more than the retention (7 days) ago, not due yet
    assert await bus.retry_queue.cleanup() == 0
    assert await worker.run_once() == 0
    clock.advance(2 * DAY)
    assert await bus.retry_queue.cleanup() == 0  # due this instant
    assert await worker.run_once() == 1
    assert calls == [due]
    assert await bus.retry_queue.count() == 0
    assert await bus.dead_letters.count() == 0


async def test_a_scheduled_delivery_that_fails_is_retried_not_expired(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock)
    calls: list[datetime] = []

    @bus.handler("reminder.due", name="remind")
    async def remind(event: Event) -> None:
        calls.append(clock.now())
        if len(calls) == 1:
            raise RetryAfter(3600)

    due = clock.now() + timedelta(days=10)
    await bus.publish(Event("reminder.due", {"n": 1}), deliver_in=10 * DAY)
    worker = RetryWorker(bus)
    clock.advance(10 * DAY)
    assert await worker.run_once() == 1  # its first call fails: a retry in an hour
    clock.advance(1800)
    assert await bus.retry_queue.cleanup() == 0  # the retry is half an hour old, not 10 days
    (retry,) = await bus.retry_queue.list()
    assert (retry.attempt, retry.created_at) == (1, due)
    clock.advance(1800)
    assert await worker.run_once() == 1
    assert calls == [due, due + timedelta(hours=1)]
    assert await bus.dead_letters.count() == 0


async def test_a_scheduled_delivery_nobody_takes_expires_a_retention_after_its_time(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock)
    bus.subscribe("reminder.due", lambda event: None, name="remind")
    await bus.publish(Event("reminder.due", {"n": 1}), deliver_in=10 * DAY)
    clock.advance(17 * DAY)  # no worker ran: due for exactly the retention, not longer
    assert await bus.retry_queue.cleanup() == 0
    clock.advance(1)
    assert await bus.retry_queue.cleanup() == 1
    (dead,) = await bus.dead_letters.list()
    assert (dead.reason, dead.handler_name, dead.attempt) == (EXPIRED, "remind", 0)
    assert await bus.retry_queue.count() == 0


async def test_a_deferred_delivery_left_unclaimed_past_the_retention_expires(
    store: Store, clock: ManualClock
) -> None:
    calls: list[datetime] = []
    bus = recording_bus(store, clock, calls)
    event = Event("reminder.due", {"n": 1})
    assert (await bus.publish(event, defer=True)).pending == ("remind",)
    clock.advance(7 * DAY)  # due (and unclaimed) for exactly the retention
    assert await bus.retry_queue.cleanup() == 0
    clock.advance(DAY)
    assert await bus.retry_queue.cleanup() == 1
    (dead,) = await bus.dead_letters.list()
    assert (dead.reason, dead.handler_name, dead.event_id, dead.attempt) == (
        EXPIRED,
        "remind",
        event.id,
        0,
    )
    assert await bus.retry_queue.count() == 0
    assert await RetryWorker(bus).run_once() == 0
    assert calls == []


async def test_a_retry_older_than_the_retention_expires_though_due_later(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock, durable=True)

    @bus.handler("reminder.due", name="remind")
    async def remind(event: Event) -> None:
        raise RetryAfter(30 * DAY)

    result = await bus.publish(Event("reminder.due", {"n": 1}))
    (item,) = result.retry_items
    assert (item.attempt, item.next_retry) == (1, clock.now() + timedelta(days=30))
    clock.advance(7 * DAY)
    assert await bus.retry_queue.cleanup() == 0
    clock.advance(1)
    assert await bus.retry_queue.cleanup() == 1  # by its age alone
    (dead,) = await bus.dead_letters.list()
    assert (dead.reason, dead.handler_name, dead.event_id) == (EXPIRED, "remind", item.event_id)
    assert await bus.retry_queue.count() == 0


async def test_leased_records_never_expire(store: Store, clock: ManualClock) -> None:
    bus = EventBus(store, clock=clock)
    bus.subscribe("reminder.due", lambda event: None, name="remind")
    await bus.publish(Event("reminder.due", {"n": 1}), defer=True)  # a first delivery
    await bus.retry_queue.add(  # and a retry
        Event("reminder.due", {"n": 2}), "remind", "boom", next_retry=clock.now()
    )
    clock.advance(30 * DAY)  # both long past the retention, and due
    claimed = await bus.retry_queue.claim_due(10, lease=60, handlers=["remind"])
    assert sorted(item.attempt for item in claimed) == [0, 1]
    clock.advance(59)
    assert await bus.retry_queue.cleanup() == 0
    assert await bus.retry_queue.cleanup(before=clock.now()) == 0
    assert await bus.retry_queue.count() == 2
    clock.advance(1)  # the leases ran out: the worker that held them is gone
    assert await bus.retry_queue.cleanup() == 2
    assert await bus.dead_letters.count() == 2


async def test_a_running_worker_expires_only_what_is_due_past_the_retention(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock, retry_retention=3600)
    bus.subscribe("reminder.due", lambda event: None, name="remind")
    scheduled = await bus.publish(Event("reminder.due", {"n": 1}), deliver_in=7200)
    # a retry and a deferred delivery of handlers no process has any more
    await bus.retry_queue.add(Event("reminder.due", {"n": 2}), "gone", "e", next_retry=clock.now())
    abandoned = EventBus(store, clock=clock)
    abandoned.subscribe("reminder.due", lambda event: None, name="gone.deferred")
    await abandoned.publish(Event("reminder.due", {"n": 3}), defer=True)
    clock.advance(3601)
    async with RetryWorker(bus, check_interval=0.01):
        for _ in range(300):
            if await bus.dead_letters.count() >= 2:
                break
            await asyncio.sleep(0.01)
    expired = sorted(dead.handler_name for dead in await bus.dead_letters.list())
    assert expired == ["gone", "gone.deferred"]
    (left,) = await bus.retry_queue.list()
    assert (left.handler_name, left.attempt, left.event_id) == (
        "remind",
        0,
        scheduled.event.id,
    )
