"""A handler that raises ``CancelledError`` (or another ``BaseException``) fails
its delivery like any other error; only a real cancellation of the worker or of
``publish`` cancels."""

from __future__ import annotations

import asyncio
import logging

import pytest

from retrybus import (
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    RetryWorker,
    open_store,
)


class Aborted(BaseException):
    """A BaseException that is neither a cancellation nor an interpreter exit."""


async def cancels(event: Event) -> None:
    raise asyncio.CancelledError("a timeout inside the handler leaked")


def cancels_in_a_thread(event: Event) -> None:
    raise asyncio.CancelledError("leaked from a plain handler")


async def fails(event: Event) -> None:
    raise ValueError("plain failure")


async def test_publish_records_a_handlers_cancelled_error_and_its_siblings_failure(
    bus: EventBus,
) -> None:
    bus.subscribe("x", cancels, name="cancels")
    bus.subscribe("x", cancels_in_a_thread, name="cancels_in_a_thread")
    bus.subscribe("x", fails, name="fails")
    result = await bus.publish(Event("x"))
    assert sorted(result.retrying) == ["cancels", "cancels_in_a_thread", "fails"]
    items = {item.handler_name: item for item in await bus.retry_queue.list()}
    assert items["cancels"].error_type.endswith("CancelledError")
    assert items["cancels"].error == "a timeout inside the handler leaked"
    assert items["fails"].error == "plain failure"


async def test_a_single_handlers_cancelled_error_is_recorded_on_publish() -> None:
    bus = EventBus()
    bus.subscribe("x", cancels, name="cancels")
    result = await bus.publish(Event("x"))
    assert result.retrying == ("cancels",)


async def test_other_base_exceptions_are_failures_but_keyboard_interrupt_propagates() -> None:
    bus = EventBus()

    async def aborts(event: Event) -> None:
        raise Aborted("odd")

    async def interrupted(event: Event) -> None:
        raise KeyboardInterrupt

    bus.subscribe("aborts", aborts, name="aborts")
    bus.subscribe("interrupted", interrupted, name="interrupted")
    assert (await bus.publish(Event("aborts"))).retrying == ("aborts",)
    with pytest.raises(KeyboardInterrupt):
        await bus.publish(Event("interrupted"))


async def test_cancelling_publish_still_cancels_and_records_nothing() -> None:
    bus = EventBus()
    started = asyncio.Event()

    async def slow(event: Event) -> None:
        started.set()
        await asyncio.sleep(60)

    bus.subscribe("x", slow, name="slow")
    bus.subscribe("x", fails, name="fails")
    task = asyncio.create_task(bus.publish(Event("x")))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await bus.retry_queue.count() == 0


async def test_the_observed_publish_records_a_cancelled_error_too() -> None:
    from prometheus_client import CollectorRegistry

    from retrybus.prometheus import PrometheusMetrics

    bus = EventBus(metrics=PrometheusMetrics(CollectorRegistry()))
    bus.subscribe("x", cancels, name="cancels")
    bus.subscribe("x", fails, name="fails")
    result = await bus.publish(Event("x"))
    assert sorted(result.retrying) == ["cancels", "fails"]


async def test_a_worker_retries_a_cancelled_error_and_goes_on_with_the_rest(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("c", cancels, name="cancels", policy=FixedDelay(max_retries=2, delay=0))
    bus.subscribe("f", fails, name="fails")
    await bus.retry_queue.add(Event("c"), "cancels", "first", next_retry=clock.now())
    for n in range(3):
        await bus.retry_queue.add(Event("f", {"n": n}), "fails", "first", next_retry=clock.now())
    worker = RetryWorker(bus, concurrency=1)
    assert await worker.run_once() == 4
    items = {item.handler_name: item for item in await bus.retry_queue.list()}
    assert items["cancels"].attempt == 2
    assert items["cancels"].error == "a timeout inside the handler leaked"
    assert items["fails"].attempt == 2
    assert await worker.run_once() == 1  # the other three wait for their delay
    [dead] = await bus.dead_letters.list(handler_name="cancels")
    assert dead.reason == "failed after 2 retries"


async def test_a_running_worker_survives_a_handler_that_raises_cancelled_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(open_store("memory://"), default_policy=FixedDelay(max_retries=1, delay=0))
    bus.subscribe("c", cancels, name="cancels")
    bus.subscribe("t", cancels_in_a_thread, name="thread")
    for kind, name in (("c", "cancels"), ("t", "thread")):
        await bus.retry_queue.add(Event(kind), name, "first")
    worker = RetryWorker(bus, check_interval=0.05, concurrency=1)
    async with worker:
        for _ in range(200):
            if await bus.dead_letters.count() == 2:
                break
            await asyncio.sleep(0.01)
        assert worker.running
    assert await bus.dead_letters.count() == 2
    assert await bus.retry_queue.count() == 0
    assert "claim loop" not in caplog.text


async def test_stopping_a_worker_still_cancels_its_handlers(clock: ManualClock) -> None:
    bus = EventBus(clock=clock)
    started = asyncio.Event()

    async def slow(event: Event) -> None:
        started.set()
        await asyncio.sleep(60)

    bus.subscribe("x", slow, name="slow")
    item = await bus.retry_queue.add(Event("x"), "slow", "first", next_retry=clock.now())
    worker = RetryWorker(bus, lease=30)
    await worker.start()
    await started.wait()
    await worker.stop(timeout=0)
    [kept] = await bus.retry_queue.list()
    assert kept.id == item.id
    assert kept.attempt == 1
    assert kept.lease_owner is not None


async def test_reprocess_records_a_cancelled_error_as_a_failure(bus: EventBus) -> None:
    item = await bus.retry_queue.add(Event("x"), "cancels", "first")
    dead = await bus.retry_queue.mark_failed(item, reason="failed after 3 retries")
    assert dead is not None
    bus.subscribe("x", cancels, name="cancels")
    after = await bus.dead_letters.reprocess(dead.id)
    assert not after.processed
    assert after.error == "a timeout inside the handler leaked"


async def test_a_claim_loop_that_dies_is_logged_and_join_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    worker = RetryWorker(bus, check_interval=0.01)

    async def broken_claim(*args: object, **kwargs: object) -> list[object]:
        raise Aborted("the loop itself broke")

    bus.retry_queue.claim_due = broken_claim  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="retrybus.worker"):
        await worker.start()
        with pytest.raises(Aborted):
            await worker.join()
    assert "its claim loop failed; it claims nothing more" in caplog.text
    await worker.stop()
