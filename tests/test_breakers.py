"""Circuit breakers: the state machine on the manual clock, and a bus whose
handler's dependency fails (SQLite and PostgreSQL), alone and shared by two
buses (two processes' worth) on one store."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import fresh_store
from retrybus import (
    CircuitBreaker,
    Event,
    EventBus,
    ExponentialBackoff,
    FixedDelay,
    ManualClock,
    PermanentError,
    RetryWorker,
    Store,
    VersionError,
)
from retrybus._breaker import BreakerMachine, BreakerStatus, CallWindow, counts_as_failure

# the state machine ----------------------------------------------------------


def breaker_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the breakers logged (the handlers' failures are logged by others,
    whose level another test may have lowered)."""
    return [r.getMessage() for r in caplog.records if r.name == "retrybus.breakers"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": ""}, "breaker name"),
        ({"name": "a b"}, "breaker name"),
        ({"name": "db", "failure_ratio": 0}, "failure_ratio"),
        ({"name": "db", "failure_ratio": 1.5}, "failure_ratio"),
        ({"name": "db", "min_calls": 0}, "min_calls"),
        ({"name": "db", "probes": 0}, "probes"),
        ({"name": "db", "window": 0}, "window"),
        ({"name": "db", "open_for": -1}, "open_for"),
        ({"name": "db", "open_for": 60, "max_open_for": 30}, "max_open_for"),
    ],
)
def test_bad_settings_raise_naming_the_value(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(**options)  # type: ignore[arg-type]


def test_bad_setting_types_raise() -> None:
    with pytest.raises(TypeError, match="failure_ratio"):
        CircuitBreaker("db", failure_ratio="half")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="window"):
        CircuitBreaker("db", window="30")  # type: ignore[arg-type]


def machine(clock: ManualClock, **options: object) -> BreakerMachine:
    settings_ = {"min_calls": 4, "window": 10.0, "open_for": 30.0, "probes": 2, **options}
    return BreakerMachine(CircuitBreaker("db", **settings_), clock)  # type: ignore[arg-type]


def test_opens_once_min_calls_are_reached_at_the_failure_ratio(clock: ManualClock) -> None:
    m = machine(clock)
    for _ in range(3):
        assert m.record(True) is None
    assert m.state == "closed"
    opened = m.record(True)
    assert opened is not None
    assert opened.state == "open"
    assert m.state == "open"
    assert not m.allows()
    assert m.status.reason == "4 of 4 calls failed in 10s"
    assert m.status.trips == 1


def test_successes_count_as_calls_below_the_ratio(clock: ManualClock) -> None:
    m = machine(clock, failure_ratio=0.5)
    for _ in range(3):
        m.record(False)
    for _ in range(2):
        m.record(True)
    assert m.state == "closed"  # 2 of 5 failed
    m.record(True)  # 3 of 6: at the ratio
    assert m.state == "open"


def test_failures_older_than_the_window_do_not_count(clock: ManualClock) -> None:
    m = machine(clock)
    for _ in range(3):
        m.record(True)
    clock.advance(11)
    m.record(True)
    assert m.state == "closed"
    assert m.window.calls == 1


def test_half_opens_after_open_for_and_closes_when_every_probe_succeeds(
    clock: ManualClock,
) -> None:
    m = machine(clock)
    for _ in range(4):
        m.record(True)
    clock.advance(29.9)
    assert m.state == "open"
    assert not m.allows()
    clock.advance(0.1)
    assert m.state == "half_open"
    assert m.allows()
    assert m.allows()
    assert not m.allows()  # two probes at most
    m.record(False)
    assert m.state == "half_open"
    closed = m.record(False)
    assert closed is not None
    assert closed.state == "closed"
    assert m.allows()
    assert m.window.calls == 0


def test_a_failed_probe_reopens_for_twice_as_long_up_to_max_open_for(
    clock: ManualClock,
) -> None:
    m = machine(clock, open_for=30.0, max_open_for=100.0)
    for _ in range(4):
        m.record(True)
    periods = []
    for _ in range(4):
        clock.advance(m.status.open_for)
        assert m.allows()
        m.record(True, "ConnectionError: refused")
        assert m.state == "open"
        periods.append(m.status.open_for)
    assert periods == [60.0, 100.0, 100.0, 100.0]
    assert m.status.reason == "a probe failed: ConnectionError: refused"
    # closing starts the doubling over
    clock.advance(100)
    for _ in range(2):
        assert m.allows()
        m.record(False)
    assert m.state == "closed"
    assert m.status.open_for == 30.0
    for _ in range(4):
        m.record(True)
    assert m.status.half_open_at == clock.now() + timedelta(seconds=30)


def test_calls_ending_while_open_are_ignored(clock: ManualClock) -> None:
    m = machine(clock)
    for _ in range(4):
        m.record(True)
    before = m.status
    assert m.record(True) is None
    assert m.record(False) is None
    assert m.status == before


def test_only_retryable_failures_count() -> None:
    policy = ExponentialBackoff(give_up_on=KeyError)
    assert counts_as_failure(ConnectionError("down"), policy)
    assert not counts_as_failure(PermanentError("bad data"), policy)
    assert not counts_as_failure(VersionError("v9", "order.paid", "9"), policy)
    assert not counts_as_failure(KeyError("x"), policy)


def test_stuck_probes_are_taken_again_after_the_probe_timeout(clock: ManualClock) -> None:
    breaker = CircuitBreaker("db", open_for=30.0, probes=1)
    status = BreakerStatus.initial(breaker).trip(clock.now(), breaker, 20, 20)
    assert status is not None
    clock.advance(30)
    taken = status.take_probe(clock.now(), breaker)
    assert taken is not None
    assert taken.take_probe(clock.now(), breaker) is None
    clock.advance(breaker.probe_timeout)  # that probe's process never said
    assert taken.take_probe(clock.now(), breaker) is not None


def test_status_round_trips_through_json(clock: ManualClock) -> None:
    breaker = CircuitBreaker("db")
    status = BreakerStatus.initial(breaker).trip(clock.now(), breaker, 20, 12)
    assert status is not None
    assert BreakerStatus.from_json(status.to_json()) == status
    with pytest.raises(ValueError, match="unreadable breaker status"):
        BreakerStatus.from_json({"state": "ajar", "open_for": 1})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["ok", "fail", "call", "wait"]), st.floats(0, 40)),
        max_size=120,
    )
)
def test_state_machine_invariants(steps: list[tuple[str, float]]) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("db", min_calls=3, window=10.0, open_for=5.0, max_open_for=40.0)
    m = BreakerMachine(breaker, clock)
    in_flight_probes = 0
    for action, seconds in steps:
        before = m.status
        if action == "wait":
            clock.advance(seconds)
        elif action == "call":
            state = m.state
            allowed = m.allows()
            assert allowed == (state == "closed" or (state == "half_open" and in_flight_probes < 3))
            if allowed and state == "half_open":
                in_flight_probes += 1
        else:
            m.record(action == "fail")
            # a verdict recorded while half-open is a probe that was out
            in_flight_probes = max(in_flight_probes, m.status.probes_passed)
        status = m.status
        assert breaker.open_for <= status.open_for <= breaker.max_open_for
        assert status.probes_passed <= status.probes_taken <= breaker.probes or (
            status.probes_taken == 0
        )
        if status.trips != before.trips:  # it just opened
            assert status.state == "open"
            assert status.opened_at == clock.now()
            assert status.half_open_at == clock.now() + timedelta(seconds=status.open_for)
        if status.state != "open" or status.trips != before.trips:
            in_flight_probes = 0
        if status.state == "closed" and before.state != "closed":
            assert status.open_for == breaker.open_for


def test_window_counts_the_last_slices() -> None:
    window = CallWindow(10.0)
    window.add(0.0, True)
    window.add(5.0, False)
    assert (window.calls, window.failures) == (2, 1)
    window.add(10.5, False)  # the slice of 0.0 left the window
    assert (window.calls, window.failures) == (2, 0)
    window.add(100.0, True)
    assert (window.calls, window.failures) == (1, 1)


# a bus ------------------------------------------------------------------------

BREAKER = CircuitBreaker("db", min_calls=4, failure_ratio=0.5, window=30, open_for=30, probes=2)


@pytest.fixture(params=["sqlite", "postgresql"])
async def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


class Dependency:
    """A handler whose database is down until ``up``; counts its calls."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[str] = []

    async def __call__(self, event: Event) -> None:
        self.calls.append(event.id)
        if not self.up:
            raise ConnectionError("database unreachable")


def bus_on(store: Store, clock: ManualClock, dependency: Dependency) -> EventBus:
    bus = EventBus(store, clock=clock, default_policy=FixedDelay(delay=1.0, max_retries=3))
    bus.subscribe("order.paid", dependency, name="save_order", breaker=BREAKER)
    return bus


async def trip(bus: EventBus, dependency: Dependency) -> None:
    for n in range(4):
        await bus.publish(Event("order.paid", {"n": n}))
    assert len(dependency.calls) == 4
    assert (await bus.breakers.get("db")).state == "open"


async def test_an_open_breaker_pauses_deliveries_without_using_attempts(
    shared_store: Store, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    dependency = Dependency()
    bus = bus_on(shared_store, clock, dependency)
    worker = RetryWorker(bus)
    with caplog.at_level(logging.INFO, logger="retrybus.breakers"):
        await trip(bus, dependency)
        opened = [m for m in breaker_lines(caplog) if "opened" in m]
        assert opened == [
            "breaker db opened: 4 of 4 calls failed in 30s; half-open at 2025-01-07T10:00:30Z"
        ]
        # published while open: recorded pending, due when it half-opens, not called
        result = await bus.publish(Event("order.paid", {"n": 4}))
        assert result.pending == ("save_order",)
        assert not result.retrying
        assert len(dependency.calls) == 4
        clock.advance(5)  # the first failures' retries fall due: not claimed
        assert await worker.run_once() == 0
        assert len(dependency.calls) == 4
        items = await shared_store.list_retry(limit=10, offset=0)
        assert sorted(item.attempt for item in items) == [0, 1, 1, 1, 1]
        half_open_at = (await bus.breakers.get("db")).half_open_at
        assert [i.next_retry for i in items if i.attempt == 0] == [half_open_at]
        assert await bus.dead_letters.count() == 0

        # half-open: the probes run, succeed, and close it; then the rest go through
        dependency.up = True
        clock.advance(25)
        assert (await bus.breakers.get("db")).state == "half_open"
        assert await worker.run_once() == 2
        assert len(dependency.calls) == 6
        assert (await bus.breakers.get("db")).state == "closed"
        assert await worker.run_once() == 3
    assert await shared_store.retry_count() == 0
    assert await bus.dead_letters.count() == 0
    assert sorted(dependency.calls[4:]) == sorted(set(dependency.calls[4:]))
    messages = breaker_lines(caplog)
    assert "breaker db half-open: letting 2 probe(s) through" in messages
    assert "breaker db closed: 2 probes succeeded" in messages
    assert len(messages) == 3  # one line per transition, none per call
    await bus.close()


async def test_a_failed_probe_reopens_for_twice_as_long(
    shared_store: Store, clock: ManualClock
) -> None:
    dependency = Dependency()
    bus = bus_on(shared_store, clock, dependency)
    worker = RetryWorker(bus)
    await trip(bus, dependency)
    clock.advance(30)
    assert await worker.run_once() == 2  # both probes fail
    assert len(dependency.calls) == 6
    info = await bus.breakers.get("db")
    assert info.state == "open"
    assert info.open_for == 60
    assert info.trips == 2
    clock.advance(59)
    assert await worker.run_once() == 0
    assert len(dependency.calls) == 6
    assert await bus.dead_letters.count() == 0
    await bus.close()


async def test_items_claimed_before_it_opened_are_given_back_uncalled(
    shared_store: Store, clock: ManualClock
) -> None:
    dependency = Dependency()
    bus = EventBus(shared_store, clock=clock, default_policy=FixedDelay(delay=1.0, max_retries=3))
    bus.subscribe("order.paid", dependency, name="save_order", breaker=BREAKER)
    for n in range(10):
        await bus.publish(Event("order.paid", {"n": n}), defer=True)
    worker = RetryWorker(bus, concurrency=1)
    assert await worker.run_once() == 10  # four calls trip it; six are given back
    assert len(dependency.calls) == 4
    items = await shared_store.list_retry(limit=20, offset=0)
    assert sorted(item.attempt for item in items) == [0] * 6 + [1] * 4
    assert all(item.lease_owner is None and item.claims == 0 for item in items)
    await bus.close()


async def test_two_buses_share_one_breaker_through_the_store(
    shared_store: Store, clock: ManualClock
) -> None:
    first, second = Dependency(), Dependency()
    one = bus_on(shared_store, clock, first)
    other = bus_on(shared_store, clock, second)
    assert (await other.breakers.get("db")).state == "closed"
    await trip(one, first)
    # the other process reads the shared state at its next refresh (5 s)
    clock.advance(5)
    other_worker = RetryWorker(other)
    assert await other_worker.run_once() == 0
    assert second.calls == []
    result = await other.publish(Event("order.paid", {"n": 9}))
    assert result.pending == ("save_order",)
    assert second.calls == []
    # half-open: probes are shared, two in all
    first.up = second.up = True
    clock.advance(25)
    one_worker = RetryWorker(one, batch_size=1)
    assert await one_worker.run_once() == 1  # takes one probe
    assert (await one.breakers.get("db")).state == "half_open"
    assert await other_worker.run_once() == 1  # only one probe is left for it
    assert (len(first.calls), len(second.calls)) == (5, 1)
    assert (await one.breakers.get("db")).state == "closed"
    assert await other_worker.run_once() == 3  # the rest, closed
    assert await shared_store.retry_count() == 0
    assert await one.dead_letters.count() == 0
    await one.close()
    await other.close()


async def test_a_process_whose_calls_fail_learns_of_an_opening_within_half_a_second(
    shared_store: Store, clock: ManualClock
) -> None:
    first, second = Dependency(), Dependency()
    one = bus_on(shared_store, clock, first)
    other = bus_on(shared_store, clock, second)
    await other.publish(Event("order.paid", {"n": 0}))  # reads the state; its call fails
    assert len(second.calls) == 1
    await trip(one, first)  # the other process has not tripped it: one failure of 4 calls
    clock.advance(0.5)  # not the 5 s refresh: its failing call asked for a read sooner
    result = await other.publish(Event("order.paid", {"n": 1}))
    assert result.pending == ("save_order",)
    assert len(second.calls) == 1
    # a process whose calls succeed reads it at the usual refresh only
    third = Dependency()
    third.up = True
    quiet = bus_on(shared_store, clock, third)
    await one.breakers.reset("db")
    await quiet.publish(Event("order.paid", {"n": 2}))
    fourth = Dependency()
    tripping = bus_on(shared_store, clock, fourth)
    await trip(tripping, fourth)
    clock.advance(0.5)
    await quiet.publish(Event("order.paid", {"n": 3}))
    assert len(third.calls) == 2  # it still knew the breaker closed
    for bus in (one, other, quiet, tripping):
        await bus.close()


async def test_isolate_holds_it_open_until_reset_in_every_process(
    shared_store: Store, clock: ManualClock
) -> None:
    first, second = Dependency(), Dependency()
    first.up = second.up = True
    one = bus_on(shared_store, clock, first)
    other = bus_on(shared_store, clock, second)
    info = await one.breakers.isolate("db", actor="alice")
    assert info.state == "isolated"
    assert info.reason == "isolated by alice"
    await other.breakers.refresh()
    await other.publish(Event("order.paid", {"n": 1}))
    clock.advance(3600)
    assert await RetryWorker(other).run_once() == 0
    assert second.calls == []
    await other.breakers.reset("db", actor="bob")
    await one.breakers.refresh()
    assert (await one.breakers.get("db")).state == "closed"
    assert await RetryWorker(one).run_once() == 1
    assert len(first.calls) == 1
    await one.close()
    await other.close()


def test_handlers_share_a_breaker_by_name() -> None:
    bus = EventBus()
    bus.subscribe("a", Dependency(), name="one", breaker=CircuitBreaker("db"))
    bus.subscribe("b", Dependency(), name="two", breaker="db")
    assert bus.breakers.of("one") is bus.breakers.of("two")
    with pytest.raises(ValueError, match="no breaker named 'cache'"):
        bus.subscribe("c", Dependency(), name="three", breaker="cache")
    with pytest.raises(ValueError, match="already registered with other settings"):
        bus.subscribe("c", Dependency(), name="three", breaker=CircuitBreaker("db", probes=1))
    with pytest.raises(TypeError, match="CircuitBreaker or a name"):
        bus.subscribe("c", Dependency(), name="three", breaker=3)  # type: ignore[arg-type]
