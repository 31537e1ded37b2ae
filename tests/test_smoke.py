from __future__ import annotations

import retrybus
from retrybus import Event, EventBus, ManualClock, RetryWorker


async def test_a_failing_handler_is_retried_until_it_succeeds(bus: EventBus, clock: ManualClock) -> None:
    calls: list[str] = []

    @bus.handler("like.added")
    async def count_like(event: Event) -> None:
        calls.append(event.id)
        if len(calls) == 1:
            raise TimeoutError("connection timeout")

    result = await bus.publish(Event("like.added", {"post_id": 1}))
    assert result.retrying == ("test_a_failing_handler_is_retried_until_it_succeeds.<locals>.count_like",)
    clock.advance(2)
    assert await RetryWorker(bus).run_once() == 1
    assert len(calls) == 2
    assert await bus.retry_queue.count() == 0
    assert retrybus.__version__
