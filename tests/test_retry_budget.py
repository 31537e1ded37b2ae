"""Retry budgets: the counting on the manual clock, and a worker whose handler's
dependency is down (memory, SQLite and PostgreSQL): the calls stay within the
budget's share of the first deliveries, the retries over it wait with their
attempt unused, and every event is delivered once the dependency is back."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import fresh_store
from retrybus import (
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    RetryBudget,
    RetryItem,
    RetryWorker,
    Store,
)
from retrybus._budget import WAITS_KEY, RetryBudgets


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"percent": -1}, ValueError, "percent must be a finite number >= 0, got -1"),
        ({"min_per_second": float("nan")}, ValueError, "min_per_second"),
        ({"window": 0}, ValueError, "window must be a finite number > 0, got 0"),
        ({"percent": "20"}, TypeError, "percent must be a number, got '20'"),
        ({"percent": 0, "min_per_second": 0}, ValueError, "never lets a retry through"),
    ],
)
def test_bad_settings_raise_naming_the_value(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RetryBudget(**options)  # type: ignore[arg-type]


def test_retries_stay_within_the_share_of_first_deliveries(clock: ManualClock) -> None:
    budgets = RetryBudgets(RetryBudget(percent=20, min_per_second=1, window=10), clock)
    for _ in range(100):
        budgets.first_delivery("save")
    allowed = sum(budgets.try_retry("save") for _ in range(50))
    assert allowed == 20  # 20 % of 100, above the floor of 1/s x 10 s
    assert budgets.usage("save") == (100, 20)
    assert budgets.try_retry("other")  # another handler has its own budget


def test_the_floor_lets_min_per_second_through_without_first_deliveries(
    clock: ManualClock,
) -> None:
    budgets = RetryBudgets(RetryBudget(percent=20, min_per_second=2, window=10), clock)
    assert sum(budgets.try_retry("save") for _ in range(50)) == 20
    clock.advance(5)
    assert not budgets.try_retry("save")
    clock.advance(5)  # the first retries leave the window
    assert sum(budgets.try_retry("save") for _ in range(50)) == 20


def test_retries_that_succeed_no_longer_count(clock: ManualClock) -> None:
    budgets = RetryBudgets(RetryBudget(percent=20, min_per_second=1, window=10), clock)
    assert sum(budgets.try_retry("save") for _ in range(50)) == 10  # the floor
    for _ in range(4):
        budgets.retry_succeeded("save")  # the dependency answers again
    assert budgets.usage("save") == (0, 6)
    assert sum(budgets.try_retry("save") for _ in range(50)) == 4
    clock.advance(10)  # all of them leave the window
    assert budgets.usage("save") == (0, 0)


def test_a_retry_claimed_again_without_an_outcome_is_not_asked_again(
    clock: ManualClock,
) -> None:
    """Its worker died mid-call: the budget let it through once; postponing it now
    would reset the claims that dead-letter a record killing its workers."""
    budgets = RetryBudgets(RetryBudget(percent=20, min_per_second=0.1, window=10), clock)
    assert budgets.try_retry("save")  # the floor's one retry is used up
    now = clock.now()
    item = RetryItem(
        id="r1",
        event_id="e1",
        event_type="order.paid",
        event_data={},
        event_source="test",
        event_timestamp=now,
        handler_name="save",
        error="ConnectionError: down",
        attempt=2,
        max_retries=5,
        next_retry=now,
        created_at=now,
        updated_at=now,
        claims=2,
    )
    run, postponed = budgets.sort_claimed([item, replace(item, id="r2", claims=1)])
    assert [i.id for i in run] == ["r1"]
    assert [p.item.id for p in postponed] == ["r2"]
    assert budgets.usage("save") == (0, 1)  # not counted twice


def test_refused_retries_come_back_spread_at_the_allowed_rate(clock: ManualClock) -> None:
    budgets = RetryBudgets(RetryBudget(percent=50, min_per_second=1, window=10), clock)
    for _ in range(100):
        budgets.first_delivery("save")
    assert budgets.retries_per_second("save") == 5.0  # 50 % of 100 first deliveries in 10 s
    now = clock.now()
    delays = [(budgets.postpone_until("save", n) - now).total_seconds() for n in (1, 2, 10)]
    assert delays == [0.2, 0.4, 2.0]


class Dependency:
    """A handler whose database is down until ``up``; counts its calls by event."""

    def __init__(self) -> None:
        self.up = False
        self.calls: Counter[str] = Counter()

    async def __call__(self, event: Event) -> None:
        self.calls[event.id] += 1
        if not self.up:
            raise ConnectionError("database unreachable")


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def budget_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


@pytest.mark.parametrize("defer", [False, True], ids=["published-inline", "deferred"])
async def test_an_outage_costs_at_most_the_budget_and_loses_nothing(
    budget_store: Store, clock: ManualClock, defer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    dependency = Dependency()
    bus = EventBus(budget_store, clock=clock, default_policy=FixedDelay(delay=1.0, max_retries=100))
    bus.subscribe("order.paid", dependency, name="save_order")
    worker = RetryWorker(
        bus, batch_size=500, retry_budget=RetryBudget(percent=20, min_per_second=1, window=10)
    )
    events = [Event("order.paid", {"n": n}) for n in range(200)]
    for event in events:
        await bus.publish(event, defer=defer)
    if defer:  # the worker makes the first deliveries (and counts them)
        assert await worker.run_once() == 200
    assert sum(dependency.calls.values()) == 200

    with caplog.at_level(logging.INFO, logger="retrybus.worker"):
        for _ in range(10):  # ten seconds of outage, a claim each second
            clock.advance(1)
            await worker.run_once()
    told = [
        r.getMessage() for r in caplog.records if "retry budget of save_order" in r.getMessage()
    ]
    assert 1 <= len(told) <= 2, told  # a line per window at most, never one per retry
    assert "retries wait, their attempts unused" in told[0]
    calls = sum(dependency.calls.values())
    assert 200 < calls <= 1.2 * 200  # the retries: 20 % of the first deliveries
    items = await budget_store.list_retry(limit=500, offset=0)
    assert len(items) == 200
    # a retry waiting over the budget has its attempt unused: attempts == calls made
    assert all(item.attempt == dependency.calls[item.event_id] for item in items)
    assert await bus.dead_letters.count() == 0

    dependency.up = True  # the dependency is back: everything goes through, once
    for _ in range(200):
        clock.advance(1)
        await worker.run_once()
        if not await budget_store.retry_count():
            break
    assert await budget_store.retry_count() == 0
    assert await bus.dead_letters.count() == 0
    assert set(dependency.calls) == {event.id for event in events}
    await bus.close()


async def test_first_deliveries_made_elsewhere_count_through_their_first_retries(
    budget_store: Store, clock: ManualClock
) -> None:
    """A web process publishes inline (no budget there); the worker's budget counts
    each failed first delivery once, as its first retry is first claimed."""
    policy = FixedDelay(delay=1.0, max_retries=100)
    web, calls_in_web = EventBus(budget_store, clock=clock, default_policy=policy), Dependency()
    web.subscribe("order.paid", calls_in_web, name="save_order")
    workers, calls_in_worker = (
        EventBus(budget_store, clock=clock, default_policy=policy),
        Dependency(),
    )
    workers.subscribe("order.paid", calls_in_worker, name="save_order")
    worker = RetryWorker(
        workers, batch_size=500, retry_budget=RetryBudget(percent=20, min_per_second=0.1, window=10)
    )
    for n in range(100):
        await web.publish(Event("order.paid", {"n": n}))
    assert sum(calls_in_web.calls.values()) == 100

    clock.advance(1)
    await worker.run_once()
    assert sum(calls_in_worker.calls.values()) == 20  # 20 % of the 100 first deliveries
    waiting = [i for i in await budget_store.list_retry(limit=500, offset=0) if i.attempt == 1]
    assert len(waiting) == 80
    assert {i.metadata.get(WAITS_KEY) for i in waiting} == {1}

    clock.advance(10)  # those first deliveries leave the window; a waiting retry is no new one
    await worker.run_once()
    assert sum(calls_in_worker.calls.values()) == 21  # the floor: 0.1 a second over 10 s
    await web.close()
    await workers.close()


def test_workers_of_one_bus_share_one_budget() -> None:
    bus = EventBus()
    budget = RetryBudget(percent=10)
    first = RetryWorker(bus, retry_budget=budget)
    second = RetryWorker(bus, retry_budget=RetryBudget(percent=10))
    assert first.retry_budget == second.retry_budget
    with pytest.raises(ValueError, match="share one retry budget"):
        RetryWorker(bus, retry_budget=RetryBudget(percent=30))


def test_the_worker_command_takes_a_retry_budget() -> None:
    from retrybus._cli.worker import build_parser

    parse = build_parser().parse_args
    assert parse(["app:bus"]).retry_budget is None
    assert parse(["app:bus", "--retry-budget", "20"]).retry_budget == RetryBudget(percent=20)
    assert parse(["app:bus", "--retry-budget", "5,2,30"]).retry_budget == RetryBudget(5, 2, 30)


@pytest.mark.parametrize("text", ["lots", "20,1,2,3", "-5", "0,0"])
def test_the_worker_command_refuses_a_bad_retry_budget(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from retrybus._cli.worker import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["app:bus", "--retry-budget", text])
    assert f"expected PERCENT[,MIN_PER_SECOND[,WINDOW]], got {text!r}" in capsys.readouterr().err
