"""The queue depth history the dashboard charts: recorded by workers (and the
dashboard) into one control record of the store, one sample per interval."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from retrybus import DepthHistory, Event, EventBus, ManualClock, RetryWorker


async def test_a_sample_counts_both_queues(bus: EventBus, clock: ManualClock) -> None:
    bus.subscribe("x", lambda event: None, name="h")
    await bus.retry_queue.add(Event("x", {}), "h", "boom")
    item = await bus.retry_queue.add(Event("x", {}), "h", "boom")
    dead = await bus.retry_queue.mark_failed(item)
    assert dead is not None
    await bus.retry_queue.mark_failed(await bus.retry_queue.add(Event("x", {}), "h", "boom"))
    await bus.dead_letters.reprocess(dead.id)
    sample = await DepthHistory(bus).record()
    assert sample is not None
    assert (sample.at, sample.retry_queue, sample.dead_unprocessed, sample.dead_processed) == (
        clock.now(),
        1,
        1,
        1,
    )
    assert await DepthHistory(bus).samples() == [sample]


async def test_recorders_add_one_sample_per_interval_between_them(
    bus: EventBus, clock: ManualClock
) -> None:
    first, second = DepthHistory(bus, interval=60), DepthHistory(bus, interval=60)
    assert await first.record() is not None
    assert await second.record() is None  # the newest sample is younger than the interval
    clock.advance(30)
    assert await first.record() is None
    clock.advance(30)
    assert await second.record() is not None
    assert len(await first.samples()) == 2


async def test_the_history_keeps_only_the_newest_samples(bus: EventBus, clock: ManualClock) -> None:
    history = DepthHistory(bus, interval=1, keep=3)
    for _ in range(5):
        await history.record()
        clock.advance(1)
    samples = await history.samples()
    assert len(samples) == 3
    assert [s.at for s in samples] == [clock.now() - timedelta(seconds=n) for n in (3, 2, 1)]


async def test_a_running_worker_records_the_depth(bus: EventBus, clock: ManualClock) -> None:
    bus.subscribe("x", lambda event: None, name="h")
    await bus.retry_queue.add(Event("x", {}), "h", "boom", next_retry=clock.now())
    worker = RetryWorker(bus, depth_sample_interval=60)
    async with worker:
        for _ in range(200):
            if await DepthHistory(bus).samples():
                break
            await asyncio.sleep(0.01)
    samples = await DepthHistory(bus).samples()
    assert len(samples) == 1


def test_history_arguments_are_checked() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="-1"):
        DepthHistory(bus, interval=-1)
    with pytest.raises(ValueError, match="keep"):
        DepthHistory(bus, keep=1)
    with pytest.raises(ValueError, match="depth_sample_interval"):
        RetryWorker(bus, depth_sample_interval=0)
