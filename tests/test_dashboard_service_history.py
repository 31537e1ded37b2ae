"""Each service's queue depth history, which the dashboard's overview charts for
``?service=``: a bus (its workers, a dashboard of its app) records the depth of
its own service's records next to the whole store's, on every engine."""

from __future__ import annotations

import asyncio

import pytest

from dashboard_support import dead
from retrybus import DepthHistory, Event, EventBus, ManualClock, RetryWorker, Store


async def test_a_bus_records_the_depth_of_its_own_service_too(
    store: Store, clock: ManualClock
) -> None:
    billing = EventBus(store, service="billing", clock=clock)
    shipping = EventBus(store, service="shipping", clock=clock)
    await billing.retry_queue.add(Event("x", {}), "Ledger", "boom")
    await dead(billing, 1, handler="Ledger")
    for n in range(3):
        await shipping.retry_queue.add(Event("x", {"n": n}), "Ship", "boom")
    sample = await DepthHistory(billing).record()
    assert sample is not None
    assert (sample.retry_queue, sample.dead_unprocessed) == (4, 1)  # the whole store
    history = DepthHistory(shipping)
    (own,) = await history.samples("billing")
    assert (own.at, own.retry_queue, own.dead_unprocessed, own.dead_processed) == (
        clock.now(),
        1,
        1,
        0,
    )
    assert await history.samples("shipping") == []  # nothing of shipping recorded one
    assert await history.record() is None  # the store's newest sample is too young …
    (shipped,) = await history.samples("shipping")  # … its own service's was not there
    assert (shipped.retry_queue, shipped.dead_unprocessed) == (3, 0)
    assert len(await history.samples()) == 1


async def test_a_worker_records_the_depth_of_its_service(store: Store, clock: ManualClock) -> None:
    billing = EventBus(store, service="billing", clock=clock)
    billing.subscribe("x", lambda event: None, name="Ledger")
    await dead(billing, 1, handler="Ledger")
    async with RetryWorker(billing, depth_sample_interval=60, check_interval=0.02):
        for _ in range(200):
            if await DepthHistory(billing).samples("billing"):
                break
            await asyncio.sleep(0.01)
    (sample,) = await DepthHistory(billing).samples("billing")
    assert (sample.retry_queue, sample.dead_unprocessed) == (0, 1)


def test_a_service_history_needs_a_service_name() -> None:
    with pytest.raises(ValueError, match="'no/such'"):
        asyncio.run(DepthHistory(EventBus()).samples("no/such"))
