"""The retry worker: attempts, targeted redelivery, what it dead-letters, and its lifecycle."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from retrybus import (
    Event,
    EventBus,
    ExponentialBackoff,
    FixedDelay,
    ManualClock,
    PermanentError,
    RetryAfter,
    RetryWorker,
    Store,
    open_store,
)


async def drain(
    worker: RetryWorker, clock: ManualClock, seconds: float = 3600, step: float = 0.5
) -> int:
    """Advance the clock in steps, running the worker after each, until ``seconds`` have passed."""
    handled = 0
    for _ in range(int(seconds / step)):
        clock.advance(step)
        handled += await worker.run_once()
    return handled


async def test_max_retries_three_means_four_calls_then_the_dlq(
    bus: EventBus, clock: ManualClock
) -> None:
    calls: list[float] = []

    @bus.handler("like.added", name="SocialStatisticsHandler")
    async def always_fails(event: Event) -> None:
        calls.append(clock.now().timestamp())
        raise TimeoutError("connection timeout")

    start = clock.now().timestamp()
    await bus.publish(Event("like.added", {"post_id": 1}))
    await drain(RetryWorker(bus), clock, seconds=60, step=0.05)
    assert len(calls) == 4
    [dead] = await bus.dead_letters.list()
    assert dead.attempt == 3
    assert dead.reason == "failed after 3 retries"
    assert dead.error == "connection timeout"
    assert await bus.retry_queue.count() == 0
    gaps = [b - a for a, b in zip([start, *calls[1:]], calls[1:], strict=False)]
    for gap, expected in zip(gaps, (1.0, 2.0, 4.0), strict=True):
        assert expected * 0.9 - 0.05 <= gap <= expected * 1.1 + 0.05


async def test_the_retry_schedule_follows_the_policy_exactly(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe(
        "x", _failing(TimeoutError("t")), name="h", policy=ExponentialBackoff(randomization=0)
    )
    first = clock.now()
    await bus.publish(Event("x"))
    worker = RetryWorker(bus)
    expected_due = first + timedelta(seconds=1)
    for attempt, delay in ((1, 2.0), (2, 4.0)):
        [item] = await bus.retry_queue.list()
        assert (item.attempt, item.next_retry) == (attempt, expected_due)
        clock.set(expected_due - timedelta(microseconds=1))
        assert await worker.run_once() == 0
        clock.set(expected_due)
        assert await worker.run_once() == 1
        expected_due = expected_due + timedelta(seconds=delay)


async def test_only_the_failed_handler_is_called_again(bus: EventBus, clock: ManualClock) -> None:
    calls: dict[str, int] = {"ok": 0, "flaky": 0}

    @bus.handler("like.added", name="ok")
    async def ok(event: Event) -> None:
        calls["ok"] += 1

    @bus.handler("like.added", name="flaky")
    async def flaky(event: Event) -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise TimeoutError("connection timeout")

    await bus.publish(Event("like.added"))
    clock.advance(5)
    assert await RetryWorker(bus).run_once() == 1
    assert calls == {"ok": 1, "flaky": 2}
    assert await bus.retry_queue.count() == 0
    stats = await bus.stats()
    assert (stats.retries_succeeded, stats.retry_success_rate, stats.average_attempts) == (
        1,
        1.0,
        1.0,
    )


async def test_the_handler_gets_the_event_exactly_as_published(
    bus: EventBus, clock: ManualClock
) -> None:
    seen: list[Event] = []

    async def handler(event: Event) -> None:
        seen.append(event)
        if len(seen) == 1:
            raise TimeoutError()

    bus.subscribe("x", handler, name="h")
    event = Event(
        "x",
        {"a": [1, {"b": None}]},
        source="svc",
        subject="s",
        extensions={"traceparent": "00-a-b-01"},
    )
    await bus.publish(event)
    clock.advance(5)
    await RetryWorker(bus).run_once()
    assert seen == [event, event]


async def test_a_permanent_error_on_retry_dead_letters_at_once(
    bus: EventBus, clock: ManualClock
) -> None:
    errors = iter([TimeoutError("slow"), PermanentError("user deleted")])

    async def handler(event: Event) -> None:
        raise next(errors)

    bus.subscribe("x", handler, name="h")
    await bus.publish(Event("x"))
    clock.advance(5)
    await RetryWorker(bus).run_once()
    [dead] = await bus.dead_letters.list()
    assert (dead.reason, dead.attempt, dead.error) == (
        "non-retryable: PermanentError",
        1,
        "user deleted",
    )


async def test_retry_after_on_retry_uses_that_delay(bus: EventBus, clock: ManualClock) -> None:
    errors = iter([TimeoutError("slow"), RetryAfter(30)])

    async def handler(event: Event) -> None:
        raise next(errors)

    bus.subscribe("x", handler, name="h")
    await bus.publish(Event("x"))
    clock.advance(5)
    await RetryWorker(bus).run_once()
    [item] = await bus.retry_queue.list()
    assert item.attempt == 2
    assert item.next_retry == clock.now() + timedelta(seconds=30)


async def test_max_elapsed_dead_letters_past_the_time_budget(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe(
        "x",
        _failing(TimeoutError()),
        name="h",
        policy=FixedDelay(max_retries=100, delay=10, max_elapsed=25),
    )
    await bus.publish(Event("x"))
    handled = await drain(RetryWorker(bus), clock, seconds=60, step=1)
    assert handled == 2
    [dead] = await bus.dead_letters.list()
    assert dead.reason == "retry time budget of 25s exhausted"


async def test_a_worker_leaves_records_of_handlers_it_does_not_have(
    bus: EventBus, clock: ManualClock
) -> None:
    calls: list[str] = []
    bus.subscribe("x", lambda e: calls.append(e.id), name="alive")
    other = await bus.retry_queue.add(Event("x"), "OtherService", "boom", next_retry=clock.now())
    known = await bus.retry_queue.add(Event("x"), "alive", "boom", next_retry=clock.now())
    assert await RetryWorker(bus).run_once() == 1
    assert calls == [known.event_id]
    assert await RetryWorker(bus).run_once() == 0
    assert await bus.dead_letters.count() == 0
    left = await bus.retry_queue.get(other.id)
    assert (left.attempt, left.claims, left.lease_owner) == (1, 0, None)
    # the service that has the handler runs it
    theirs = EventBus(bus.store, clock=clock)
    theirs.subscribe("x", lambda e: calls.append("theirs"), name="OtherService")
    assert await RetryWorker(theirs).run_once() == 1
    assert calls == [known.event_id, "theirs"]


async def test_the_worker_moves_expired_items_to_the_dlq(store: Store, clock: ManualClock) -> None:
    bus = EventBus(store, clock=clock, retry_retention=3600)
    await bus.retry_queue.add(Event("x"), "h", "boom", next_retry=clock.now() + timedelta(days=1))
    clock.advance(3601)
    async with RetryWorker(bus, check_interval=0.01):
        for _ in range(200):
            if await bus.dead_letters.count():
                break
            await asyncio.sleep(0.01)
    [dead] = await bus.dead_letters.list()
    assert dead.reason == "expired in retry queue"
    assert await bus.retry_queue.count() == 0


async def test_the_worker_deletes_dead_letters_past_their_retention(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock, dead_letter_retention=60)
    bus.subscribe("x", _failing(PermanentError()), name="h")
    await bus.publish(Event("x"))
    clock.advance(61)
    async with RetryWorker(bus, check_interval=0.01):
        for _ in range(200):
            if not await bus.dead_letters.count():
                break
            await asyncio.sleep(0.01)
    assert await bus.dead_letters.count() == 0


async def test_a_started_worker_retries_in_the_background(tmp_path: object) -> None:
    bus = EventBus(open_store("memory://"), default_policy=FixedDelay(delay=0.05))
    done = asyncio.Event()
    calls = 0

    @bus.handler("x")
    async def flaky(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError()
        done.set()

    async with RetryWorker(bus, check_interval=30):
        await bus.publish(Event("x"))
        # the worker wakes for the new item long before its 30 s check interval
        await asyncio.wait_for(done.wait(), 5)
    assert calls == 2


async def test_the_worker_wakes_when_an_item_falls_due_before_its_check_interval() -> None:
    bus = EventBus(default_policy=FixedDelay(delay=0.2))
    done = asyncio.Event()
    attempts = 0

    @bus.handler("x")
    async def flaky(event: Event) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise TimeoutError()
        done.set()

    async with RetryWorker(bus, check_interval=60):
        await bus.publish(Event("x"))
        await asyncio.wait_for(done.wait(), 5)


async def test_stop_finishes_in_flight_work_and_releases_the_rest() -> None:
    bus = EventBus(default_policy=FixedDelay(delay=0))
    started = asyncio.Event()
    release = asyncio.Event()
    finished: list[str] = []

    @bus.handler("x", name="slow")
    async def slow(event: Event) -> None:
        started.set()
        await release.wait()
        finished.append(event.id)

    for n in range(5):
        await bus.retry_queue.add(Event("x", {"n": n}), "slow", "boom", next_retry=bus.clock.now())
    worker = RetryWorker(bus, concurrency=1, batch_size=5, check_interval=0.01)
    await worker.start()
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert len(finished) == 1
    assert await bus.retry_queue.count() == 4
    items = await bus.retry_queue.claim_due(10, owner="next-worker")
    assert len(items) == 4


async def test_plain_handlers_are_retried_in_threads(bus: EventBus, clock: ManualClock) -> None:
    calls: list[int] = []

    def plain(event: Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk busy")

    bus.subscribe("x", plain, name="plain")
    await bus.publish(Event("x"))
    clock.advance(5)
    assert await RetryWorker(bus).run_once() == 1
    assert len(calls) == 2


async def test_run_once_handles_a_batch_concurrently(bus: EventBus, clock: ManualClock) -> None:
    running = 0
    peak = 0

    async def handler(event: Event) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    bus.subscribe("x", handler, name="h")
    for n in range(20):
        await bus.retry_queue.add(Event("x", {"n": n}), "h", "boom", next_retry=clock.now())
    assert await RetryWorker(bus, concurrency=4, batch_size=100).run_once() == 20
    assert peak == 4


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"check_interval": 0}, "check_interval"),
        ({"batch_size": 0}, "batch_size"),
        ({"concurrency": -1}, "concurrency"),
        ({"lease": 0}, "lease"),
    ],
)
def test_bad_worker_settings_raise_naming_them(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RetryWorker(EventBus(), **kwargs)  # type: ignore[arg-type]


def _failing(error: BaseException):  # type: ignore[no-untyped-def]
    async def handler(event: Event) -> None:
        raise error

    return handler
