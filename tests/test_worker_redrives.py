"""Workers drive redrives (issue 16): a redrive started with no dashboard or CLI
attached is finished by the running workers, which cooperate (one holds a
redrive at a time, nothing is done twice), leave alone what they cannot drive,
stop at once when stopped and ride out a store outage. On SQLite and PostgreSQL;
the fault-injecting checks on the memory store."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import fresh_store
from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    ManualClock,
    Redrive,
    RetryWorker,
    Store,
    StoreUnavailable,
)
from retrybus._cli.worker import WorkerSettings, build_parser, serve
from retrybus._stores.memory import MemoryStore
from retrybus._worker import DEFAULT_REDRIVE_INTERVAL
from seeding import dead_letter as dead

#: a worker that turns quickly: claims, heartbeats and redrive passes
FAST: dict[str, Any] = {
    "check_interval": 0.02,
    "heartbeat_interval": 0.05,
    "redrive_interval": 0.01,
}


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    """Wait until ``condition()`` holds (checked every 10 ms), failing after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {seconds}s: {condition.__doc__ or condition}")
        await asyncio.sleep(0.01)


class Calls:
    """A handler ``h`` that counts its calls by the event's ``n``."""

    def __init__(self) -> None:
        self.seen: Counter[int] = Counter()

    async def handle(self, event: Event) -> None:
        self.seen[event.data["n"]] += 1


def service_bus(store: Store, clock: ManualClock, calls: Calls | None = None) -> EventBus:
    """A bus of the default service on ``store`` (as a process of its own would
    have: its own ``bus.redrives`` runner), with handler ``h`` when ``calls``."""
    bus = EventBus(store, clock=clock)
    if calls is not None:
        bus.subscribe("like.added", calls.handle, name="h")
    return bus


async def finished(bus: EventBus, redrive_id: str) -> Redrive:
    async def ended() -> bool:
        """the redrive ends"""
        return not (await bus.redrives.get(redrive_id)).active

    await until(ended)
    return await bus.redrives.get(redrive_id)


# a redrive nobody attends to ---------------------------------------------------------


@pytest.mark.parametrize("action", ["requeue", "reprocess"])
async def test_a_redrive_started_with_nothing_attached_is_finished_by_a_running_worker(
    store: Store, clock: ManualClock, action: str
) -> None:
    admin = service_bus(store, clock)  # the dashboard's or CLI's bus, gone after start
    for n in range(5):
        await dead(admin, n)
    redrive = await admin.redrives.start(action=action, actor="alice")
    calls = Calls()
    async with RetryWorker(service_bus(store, clock, calls), **FAST):
        after = await finished(admin, redrive.id)

        async def all_handled() -> bool:
            """each dead letter's handler ran"""
            return len(calls.seen) == 5

        await until(all_handled)
    assert (after.state, after.done, after.failed) == ("completed", 5, 0)
    assert calls.seen == dict.fromkeys(range(5), 1)
    assert await store.count_dead(DeadLetterFilter(processed=False)) == 0
    assert await store.list_retry(limit=10, offset=0) == []


async def test_a_probing_redrive_is_taken_through_its_probe_by_the_worker_that_handles_it(
    store: Store, clock: ManualClock
) -> None:
    admin = service_bus(store, clock)
    for n in range(4):
        await dead(admin, n)
    redrive = await admin.redrives.start(probe=2)
    calls = Calls()
    async with RetryWorker(service_bus(store, clock, calls), **FAST):
        after = await finished(admin, redrive.id)
    assert (after.state, after.done) == ("completed", 4)
    assert calls.seen == dict.fromkeys(range(4), 1)


# cooperating runners -----------------------------------------------------------------


@pytest.mark.parametrize("action", ["requeue", "reprocess"])
async def test_two_workers_and_a_dashboard_drive_one_redrive_and_do_each_item_once(
    store: Store, clock: ManualClock, action: str
) -> None:
    admin = service_bus(store, clock)
    count = 250  # more than one step takes without a rate
    for n in range(count):
        await dead(admin, n)
    redrive = await admin.redrives.start(action=action)
    calls = Calls()
    first = RetryWorker(service_bus(store, clock, calls), **FAST)
    second = RetryWorker(service_bus(store, clock, calls), **FAST)
    dashboard = service_bus(store, clock, calls)  # it has the handlers, as the app's bus
    stop_dashboard = asyncio.Event()
    async with first, second:
        runner = asyncio.create_task(dashboard.redrives.run_all(interval=0.01, stop=stop_dashboard))
        try:
            after = await finished(admin, redrive.id)

            async def all_handled() -> bool:
                """every dead letter's handler ran"""
                return len(calls.seen) == count

            await until(all_handled)
        finally:
            stop_dashboard.set()
            await runner
    assert (after.state, after.done, after.failed) == ("completed", count, 0)
    assert calls.seen == dict.fromkeys(range(count), 1)
    assert await store.count_dead(DeadLetterFilter(processed=False)) == 0


async def test_a_stopping_worker_ends_its_step_at_the_next_item_and_lets_go_of_the_redrive(
    store: Store, clock: ManualClock
) -> None:
    admin = service_bus(store, clock)
    for n in range(4):
        await dead(admin, n)
    calls = Calls()
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_first(event: Event) -> None:
        await calls.handle(event)
        if not entered.is_set():
            entered.set()
            await release.wait()

    bus = EventBus(store, clock=clock)
    bus.subscribe("like.added", slow_first, name="h")
    redrive = await admin.redrives.start(action="reprocess")
    worker = RetryWorker(bus, **FAST)
    await worker.start()
    await asyncio.wait_for(entered.wait(), 20)
    stopping = asyncio.create_task(worker.stop())

    async def claim_loop_ended() -> bool:
        """the worker's claim loop ends (stop() then waits for the redrive step)"""
        return not worker.running

    await until(claim_loop_ended)
    assert not stopping.done()  # the item under way finishes first
    release.set()
    await asyncio.wait_for(stopping, 20)
    stopped = await admin.redrives.get(redrive.id)
    assert (stopped.state, stopped.done, stopped.runner) == ("running", 1, None)
    assert sum(calls.seen.values()) == 1
    # the lease was given back: another runner goes on at once (the clock stands still,
    # so a lease left to run out would hold it for good)
    other = service_bus(store, clock, calls)
    after = await other.redrives.run(redrive.id, interval=0)
    assert (after.state, after.done) == ("completed", 4)
    assert calls.seen == dict.fromkeys(range(4), 1)


# what a worker leaves alone ------------------------------------------------------------


async def test_a_reprocess_redrive_of_a_handler_the_worker_lacks_is_left_alone(
    store: Store, clock: ManualClock
) -> None:
    admin = service_bus(store, clock)
    for n in range(3):
        await dead(admin, n, handler="h")
        await dead(admin, 100 + n, handler="other")
    theirs = await admin.redrives.start(action="reprocess", handler_name="h")
    # a control the worker can drive: it completes on the worker's second pass over
    # the redrives, so the first pass (which saw both) is over by then
    ours = await admin.redrives.start(action="reprocess", handler_name="other")
    calls = Calls()
    bus = EventBus(store, clock=clock)
    bus.subscribe("like.added", calls.handle, name="other")
    async with RetryWorker(bus, **FAST):
        control = await finished(admin, ours.id)
    assert (control.state, control.done) == ("completed", 3)
    assert calls.seen == {100: 1, 101: 1, 102: 1}
    left = await admin.redrives.get(theirs.id)
    assert (left.state, left.done, left.failed, left.runner) == ("running", 0, 0, None)
    assert await store.count_dead(DeadLetterFilter(handler_name="h", processed=False)) == 3


async def test_a_worker_with_drive_redrives_false_leaves_redrives_to_others(
    store: Store, clock: ManualClock
) -> None:
    admin = service_bus(store, clock)
    for n in range(3):
        await dead(admin, n)
    redrive = await admin.redrives.start()
    calls = Calls()
    bus = service_bus(store, clock, calls)
    worker = RetryWorker(bus, drive_redrives=False, **FAST)
    assert worker.drive_redrives is False
    async with worker:
        # the worker goes round its loop, redelivering, many redrive intervals long
        for n in range(10, 13):
            await bus.publish(Event("like.added", {"n": n}), defer=True)

            async def delivered(n: int = n) -> bool:
                """the deferred delivery ran"""
                return calls.seen[n] == 1

            await until(delivered)
    left = await admin.redrives.get(redrive.id)
    assert (left.state, left.done, left.runner) == ("running", 0, None)
    assert await store.count_dead(DeadLetterFilter()) == 3
    assert set(calls.seen) == {10, 11, 12}


def test_drive_redrives_is_on_by_default_every_second_and_the_interval_is_checked() -> None:
    worker = RetryWorker(EventBus())
    assert (worker.drive_redrives, worker.redrive_interval) == (True, 1.0)
    assert DEFAULT_REDRIVE_INTERVAL == 1.0
    for value in (0, -1, "1", True):
        with pytest.raises(ValueError, match="redrive_interval must be a number > 0"):
            RetryWorker(EventBus(), redrive_interval=value)  # type: ignore[arg-type]


def test_the_worker_command_drives_redrives_unless_told_no_redrives() -> None:
    assert build_parser().parse_args(["app:bus"]).no_redrives is False
    assert build_parser().parse_args(["app:bus", "--no-redrives"]).no_redrives is True
    assert WorkerSettings().redrives is True


@pytest.mark.parametrize("redrives", [True, False])
async def test_the_worker_command_drives_a_redrive_or_with_no_redrives_leaves_it(
    clock: ManualClock, redrives: bool
) -> None:
    store = MemoryStore()
    admin = service_bus(store, clock)
    for n in range(3):
        await dead(admin, n)
    redrive = await admin.redrives.start()
    calls = Calls()
    bus = service_bus(store, clock, calls)
    serving = asyncio.create_task(
        serve(bus, WorkerSettings(check_interval=0.02, heartbeat_interval=0.05, redrives=redrives))
    )
    try:
        if redrives:
            await finished(admin, redrive.id)
        else:
            # a turn of the loop, a redrive interval (1 s) and more
            await bus.publish(Event("like.added", {"n": 10}), defer=True)

            async def delivered() -> bool:
                """the deferred delivery ran"""
                if serving.done():
                    serving.result()  # its error
                return calls.seen[10] == 1

            await until(delivered)
            await asyncio.sleep(1.5 * DEFAULT_REDRIVE_INTERVAL)
    finally:
        if not serving.done():
            os.kill(os.getpid(), signal.SIGTERM)  # serve() stops gracefully on it
        await asyncio.wait_for(serving, 20)
    after = await admin.redrives.get(redrive.id)
    if redrives:
        assert (after.state, after.done) == ("completed", 3)
        assert calls.seen == dict.fromkeys(range(3), 1)
    else:
        assert (after.state, after.done, after.runner) == ("running", 0, None)
        assert await store.count_dead(DeadLetterFilter()) == 3


# a store outage ------------------------------------------------------------------------


class ControlOutage(MemoryStore):
    """A memory store whose control records (the redrives') cannot be read while
    ``down``; counts the reads that failed."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failed_reads = 0

    async def list_control(self, prefix: str) -> Any:
        if self.down:
            self.failed_reads += 1
            raise StoreUnavailable(f"{self.url} is down")
        return await super().list_control(prefix)


async def test_a_store_outage_while_driving_redrives_is_logged_once_and_the_worker_goes_on(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = ControlOutage()
    admin = service_bus(store, clock)
    for n in range(3):
        await dead(admin, n)
    calls = Calls()
    caplog.set_level(logging.DEBUG, logger="retrybus.redrive")
    store.down = True
    async with RetryWorker(service_bus(store, clock, calls), **FAST) as worker:

        async def several_passes_failed() -> bool:
            """the driver met the outage on several passes"""
            return store.failed_reads >= 5

        await until(several_passes_failed)
        assert worker.running
        store.down = False
        redrive = await admin.redrives.start()
        after = await finished(admin, redrive.id)
    assert (after.state, after.done) == ("completed", 3)
    assert calls.seen == dict.fromkeys(range(3), 1)
    redrive_logs = [r for r in caplog.records if r.name == "retrybus.redrive"]
    warnings = [r.getMessage() for r in redrive_logs if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "cannot list redrives" in warnings[0]
    assert "is down" in warnings[0]
    assert any("store is back" in r.getMessage() for r in redrive_logs)
