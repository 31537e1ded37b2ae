"""Per-handler limits: ``rate=`` (a token bucket in the store, shared by the
service) and ``max_concurrency=`` (calls at once in this process): their
settings, a worker that claims only what they allow, and publish, which leaves
a rate-limited handler's deliveries to the workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import retrybus
from conftest import fresh_store
from retrybus import Event, EventBus, FixedDelay, ManualClock, Rate, RetryWorker, Store
from retrybus._concurrency import ConcurrencyLimit
from retrybus._flow import shortfall_wait, tokens_wanted
from retrybus._rate import TokenAllowance, parse_rate


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store("sqlite", tmp_path) as opened:
        yield opened


async def nothing(event: Event) -> None:
    return None


# settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second", "capacity"),
    [("200/s", 200.0, 200.0), ("30/m", 0.5, 1.0), ("7200/h", 2.0, 2.0), (" 2.5 / s ", 2.5, 2.5)],
)
def test_rates_read_calls_a_second_minute_or_hour(
    text: str, per_second: float, capacity: float
) -> None:
    rate = parse_rate(text)
    assert (rate.per_second, rate.capacity) == (per_second, capacity)


@pytest.mark.parametrize("text", ["fast", "200", "200/d", "0/s", "-5/s", "/s", "1e3/s", ""])
def test_a_bad_rate_raises_naming_it(text: str) -> None:
    bus = EventBus(retrybus.open_store("memory://"))
    with pytest.raises(ValueError, match=repr(text).replace("\\", "\\\\")[1:-1] or "got ''"):
        bus.subscribe("x", nothing, name="h", rate=text)
    assert bus.handler_names == []


def test_bad_rate_objects_and_concurrency_limits_raise() -> None:
    with pytest.raises(ValueError, match="count"):
        Rate(0)
    with pytest.raises(ValueError, match="per_seconds"):
        Rate(5, per_seconds=-1)
    with pytest.raises(ValueError, match="burst"):
        Rate(5, burst=0.5)
    with pytest.raises(TypeError, match="rate"):
        parse_rate(200)  # type: ignore[arg-type]
    bus = EventBus(retrybus.open_store("memory://"))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(
            ValueError, match=f"max_concurrency must be an int >= 1 or None, got {bad!r}"
        ):
            bus.subscribe("x", nothing, name="h", max_concurrency=bad)  # type: ignore[arg-type]


def test_rate_objects_and_the_decorator_take_the_same_settings() -> None:
    bus = EventBus(retrybus.open_store("memory://"))

    @bus.handler("x", name="h", rate=Rate(10, 60, burst=1), max_concurrency=3)
    async def handle(event: Event) -> None:
        return None

    subscription = bus.subscription("h")
    assert subscription.rate == Rate(10, 60, burst=1)
    assert str(subscription.rate) == "10/m (burst 1)"
    assert subscription.gate is not None
    assert subscription.gate.limit == 3


def test_how_many_tokens_a_worker_asks_for_and_how_long_it_waits_when_short() -> None:
    assert tokens_wanted(parse_rate("100/s")) == 10
    assert tokens_wanted(parse_rate("10/m")) == 1
    assert shortfall_wait(parse_rate("100/s")) == pytest.approx(0.1)
    assert shortfall_wait(parse_rate("10/m")) == pytest.approx(6.0)  # a token is due then
    assert shortfall_wait(Rate(1000, burst=5)) == pytest.approx(0.005)  # full before HORIZON


def test_a_token_allowance_lapses() -> None:
    allowance = TokenAllowance()
    allowance.add(3, until=10.0)
    assert allowance.take(2, 9.0) == 2
    assert allowance.take(5, 9.5) == 1
    allowance.add(3, until=10.0)
    assert allowance.take(1, 10.0) == 0


async def test_a_concurrency_limit_hands_slots_over_in_turn_and_survives_cancellation() -> None:
    limit = ConcurrencyLimit(1)
    assert limit.try_enter()
    first = asyncio.create_task(limit.wait_enter())
    second = asyncio.create_task(limit.wait_enter())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    limit.leave()  # to `second`, `first` having left the line
    await second
    assert limit.running == 1
    assert not limit.try_enter()
    limit.leave()
    assert (limit.running, limit.try_enter()) == (0, True)


# the worker -----------------------------------------------------------------


async def test_a_worker_claims_only_the_tokens_its_bucket_grants(sqlite: Store) -> None:
    clock = ManualClock()
    bus = EventBus(sqlite, clock=clock)
    calls: list[str] = []

    async def limited(event: Event) -> None:
        calls.append(event.id)

    bus.subscribe("x", limited, name="limited", rate=Rate(5, burst=5))
    for n in range(20):
        await bus.publish(Event("x", {"n": n}), defer=True)
    worker = RetryWorker(bus)
    for _ in range(10):
        await worker.run_once()
    assert len(calls) == 5  # the burst; no time passed
    clock.advance(0.1)
    for _ in range(10):
        await worker.run_once()
    assert len(calls) == 5  # held back (0.2 s) without asking the store...
    clock.advance(1.0)
    for _ in range(10):
        await worker.run_once()
    assert len(calls) == 10  # ...then no more than the burst again
    assert await bus.retry_queue.count() == 10


async def test_a_worker_of_8_lanes_never_runs_more_than_max_concurrency_and_other_work_flows(
    sqlite: Store,
) -> None:
    bus = EventBus(sqlite)
    running = peak = 0
    ended: dict[str, float] = {}

    async def slow(event: Event) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        ended[event.id] = time.monotonic()

    async def quick(event: Event) -> None:
        ended[event.id] = time.monotonic()

    bus.subscribe("slow", slow, name="slow", max_concurrency=2)
    bus.subscribe("quick", quick, name="quick")
    slow_ids = [(await bus.publish(Event("slow"), defer=True)).event.id for _ in range(16)]
    quick_ids = [(await bus.publish(Event("quick"), defer=True)).event.id for _ in range(40)]
    async with RetryWorker(bus, concurrency=8, check_interval=0.05, batch_size=10):
        for _ in range(400):
            if await bus.retry_queue.count() == 0:
                break
            await asyncio.sleep(0.02)
    assert await bus.retry_queue.count() == 0
    assert peak == 2
    # the quick handler's records did not wait behind the slow one's
    assert max(ended[i] for i in quick_ids) < max(ended[i] for i in slow_ids)


async def test_a_held_back_worker_wakes_when_tokens_are_due_not_at_its_check_interval(
    sqlite: Store,
) -> None:
    bus = EventBus(sqlite, default_policy=FixedDelay(delay=0))
    times: list[float] = []

    async def limited(event: Event) -> None:
        times.append(time.monotonic())

    bus.subscribe("x", limited, name="limited", rate=Rate(20, burst=1))
    for _ in range(10):
        await bus.publish(Event("x"), defer=True)
    async with RetryWorker(bus, check_interval=30.0):
        for _ in range(250):  # 5 s at most; it takes about half a second
            if len(times) == 10:
                break
            await asyncio.sleep(0.02)
    assert len(times) == 10
    assert times[-1] - times[0] >= 9 / 20 * 0.95  # one call every 1/20 s at most


# publish --------------------------------------------------------------------


async def test_a_durable_publish_leaves_a_rate_limited_handler_to_the_workers(
    sqlite: Store,
) -> None:
    bus = EventBus(sqlite)
    calls: list[str] = []

    async def limited(event: Event) -> None:
        calls.append("limited")

    async def free(event: Event) -> None:
        calls.append("free")

    bus.subscribe("x", limited, name="limited", rate="100/s")
    bus.subscribe("x", free, name="free")
    result = await bus.publish(Event("x"))
    assert (result.succeeded, result.pending) == (("free",), ("limited",))
    assert calls == ["free"]
    # (the free handler's record goes soon: its removal is not waited for)
    [record] = [r for r in await bus.retry_queue.list() if r.handler_name == "limited"]
    assert (record.attempt, record.lease_owner) == (0, None)
    assert record.next_retry <= bus.clock.now()
    assert await RetryWorker(bus).run_once() == 1
    assert calls == ["free", "limited"]


async def test_a_publish_that_is_not_durable_calls_while_tokens_last_then_leaves_it_pending() -> (
    None
):
    clock = ManualClock()
    bus = EventBus(retrybus.open_store("memory://"), clock=clock)
    calls: list[int] = []

    async def limited(event: Event) -> None:
        calls.append(event.data["n"])  # type: ignore[index]

    bus.subscribe("x", limited, name="limited", rate=Rate(1, burst=2))
    results = [await bus.publish(Event("x", {"n": n})) for n in range(3)]
    assert [r.succeeded for r in results] == [("limited",), ("limited",), ()]
    assert results[2].pending == ("limited",)
    assert calls == [0, 1]
    clock.advance(1.0)
    assert (await bus.publish(Event("x", {"n": 3}))).succeeded == ("limited",)
    assert await RetryWorker(bus).run_once() == 0  # the bucket is empty again
    clock.advance(1.0)
    assert await RetryWorker(bus).run_once() == 1
    assert calls == [0, 1, 3, 2]


async def test_max_concurrency_holds_for_inline_publishes_too() -> None:
    bus = EventBus(retrybus.open_store("memory://"))
    running = peak = 0

    async def slow(event: Event) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    bus.subscribe("x", slow, name="slow", max_concurrency=3)
    results = await asyncio.gather(*(bus.publish(Event("x")) for _ in range(12)))
    assert all(r.succeeded == ("slow",) for r in results)
    assert peak == 3
