"""The SQLite store's multi-process guarantees, shown with real processes on a real file:
a worker killed with SIGKILL in the middle of a batch.

Workers run ``tests/apps/process_worker.py`` in their own processes; each records
every handler call durably in its own file (see that module), and the tests
read those records and the store afterwards. Nothing is mocked. Four workers
sharing one file, and a file reopened in a fresh process: tests/test_conformance_engines.py,
for every engine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

import retrybus
from call_records import Call, epoch_ns, overlapping, read_calls, wait_until
from retrybus import Event, EventBus, FixedDelay
from retrybus._outcomes import Counters

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent / "apps"
WORKER = APPS / "process_worker.py"
HANDLER = "record_item"


def _url(db: Path) -> str:
    return f"sqlite:///{db}"


@dataclass
class StoreState:
    retry_count: int
    dead_count: int
    counters: Counters
    leases: dict[str, tuple[str | None, datetime | None]] = field(default_factory=dict)


async def read_state(db: Path) -> StoreState:
    """How many items are in each queue, the running totals, and who holds which lease."""
    async with retrybus.open_store(_url(db)) as store:
        bus = EventBus(store)
        items = await bus.retry_queue.list(limit=100_000)
        return StoreState(
            retry_count=await bus.retry_queue.count(),
            dead_count=await bus.dead_letters.count(),
            counters=await store.counters(),
            leases={item.event_id: (item.lease_owner, item.lease_until) for item in items},
        )


async def seed(db: Path, count: int) -> dict[str, Call]:
    """Publish ``count`` events whose handler fails on this first call, so each
    leaves one retry item, due at once. Returns the publish-time calls by event id."""
    calls: dict[str, Call] = {}

    async def fails_the_first_time(event: Event) -> None:
        start = time.time_ns()
        calls[event.id] = Call(event.id, os.getpid(), start, time.time_ns())
        raise ConnectionError("the first call fails")

    async with retrybus.open_store(_url(db)) as store:
        bus = EventBus(store, default_policy=FixedDelay(max_retries=3, delay=0))
        bus.subscribe("*", fails_the_first_time, name=HANDLER)
        for n in range(count):
            result = await bus.publish(Event("item.created", {"n": n}))
            assert result.retrying == (HANDLER,)
        assert await bus.retry_queue.count() == count
    return calls


class Workers:
    """Worker processes on one SQLite file, with their record and log files."""

    def __init__(self, directory: Path, db: Path) -> None:
        self.directory = directory
        self.db = db
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def record(self, name: str) -> Path:
        return self.directory / f"{name}.calls"

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def spawn(self, name: str, *options: str) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "--db",
                    str(self.db),
                    "--record",
                    str(self.record(name)),
                    "--name",
                    name,
                    *options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def wait(self, name: str, timeout: float = 60.0) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs[name].kill()
            self.procs[name].wait()
            pytest.fail(f"worker {name} did not finish in {timeout}s:\n{self.log(name)}")

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# A worker killed with SIGKILL in the middle of a batch --------------------------

KILL_ITEMS = 40
KILL_LEASE = 2.0
SLOW_WORKER = (
    "--batch-size=10",
    "--concurrency=5",
    f"--lease={KILL_LEASE}",
    "--sleep-min=0.2",
    "--sleep-max=0.2",
)


SETTLED_NS = 50_000_000  # a handler that returned this long ago has had time to report


def killed_mid_batch(calls: list[Call]) -> bool:
    """Some handlers are running, and some returned a while ago."""
    settled = time.time_ns() - SETTLED_NS
    return any(c.end is None for c in calls) and any(
        c.end is not None and c.end < settled for c in calls
    )


@dataclass
class KillRun:
    publish_calls: dict[str, Call]
    killed_calls: list[Call]
    second_calls: list[Call]
    killed_at: int
    held: dict[str, datetime]  # event id -> lease_until of the items the killed worker held
    second_exit_code: int
    second_log: str
    after: StoreState


@pytest.fixture(scope="module")
def killed_worker(tmp_path_factory: pytest.TempPathFactory) -> KillRun:
    """40 items whose handler takes 0.2 s; a worker (batches of 10, 5 at a time,
    lease 2 s) is SIGKILLed once some of its handlers returned (50 ms or more
    ago) while others are still running; then a second worker runs on the same
    file until the queue is empty."""
    directory = tmp_path_factory.mktemp("killed_worker")
    db = directory / "bus.db"
    publish_calls = asyncio.run(seed(db, KILL_ITEMS))
    workers = Workers(directory, db)
    try:
        victim = workers.spawn("killed", *SLOW_WORKER)
        wait_until(
            lambda: killed_mid_batch(read_calls(workers.record("killed"))),
            "the worker has finished some handlers and is in the middle of others",
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.time_ns()
        before = asyncio.run(read_state(db))
        held = {
            event_id: lease_until
            for event_id, (owner, lease_until) in before.leases.items()
            if owner is not None and owner.startswith("killed:") and lease_until is not None
        }
        workers.spawn("second", *SLOW_WORKER, "--until-empty")
        second_exit_code = workers.wait("second")
    finally:
        workers.kill_all()
    return KillRun(
        publish_calls=publish_calls,
        killed_calls=read_calls(workers.record("killed")),
        second_calls=read_calls(workers.record("second")),
        killed_at=killed_at,
        held=held,
        second_exit_code=second_exit_code,
        second_log=workers.log("second"),
        after=asyncio.run(read_state(db)),
    )


def test_the_worker_is_killed_while_it_holds_items_in_flight(killed_worker: KillRun) -> None:
    in_flight = {c.event_id for c in killed_worker.killed_calls if c.end is None}
    assert in_flight
    assert in_flight <= set(killed_worker.held)
    assert killed_worker.second_exit_code == 0, killed_worker.second_log


def test_no_item_is_lost_when_a_worker_is_killed(killed_worker: KillRun) -> None:
    completed = {
        c.event_id
        for c in [*killed_worker.killed_calls, *killed_worker.second_calls]
        if c.end is not None
    }
    assert completed == set(killed_worker.publish_calls)
    after = killed_worker.after
    assert (after.retry_count, after.dead_count) == (0, 0)
    assert after.counters.retry_succeeded == KILL_ITEMS
    assert after.counters.retry_dead_lettered == 0


def test_only_the_items_the_killed_worker_held_are_handled_again(killed_worker: KillRun) -> None:
    calls = Counter(c.event_id for c in [*killed_worker.killed_calls, *killed_worker.second_calls])
    handled_again = {event_id for event_id, n in calls.items() if n > 1}
    assert handled_again <= set(killed_worker.held)
    assert {event_id: n for event_id, n in calls.items() if n > 2} == {}
    second = Counter(c.event_id for c in killed_worker.second_calls)
    assert {event_id: second[event_id] for event_id in killed_worker.held} == dict.fromkeys(
        killed_worker.held, 1
    )


def test_an_item_whose_handler_finished_before_the_kill_is_not_handled_again(
    killed_worker: KillRun,
) -> None:
    finished = {
        c.event_id
        for c in killed_worker.killed_calls
        if c.end is not None and c.end < killed_worker.killed_at - SETTLED_NS
    }
    assert finished  # the killed worker had finished some handlers
    handled_again = {c.event_id for c in killed_worker.second_calls} & finished
    assert handled_again == set(), (
        f"{len(handled_again)} of the {len(finished)} items whose handler had returned "
        "before the kill were handled again"
    )


def test_the_killed_workers_items_are_taken_over_only_after_their_lease_expires(
    killed_worker: KillRun,
) -> None:
    taken_over = {
        c.event_id: c.start for c in killed_worker.second_calls if c.event_id in killed_worker.held
    }
    early = {
        event_id: (start, epoch_ns(killed_worker.held[event_id]))
        for event_id, start in taken_over.items()
        if start < epoch_ns(killed_worker.held[event_id])
    }
    assert early == {}
    # and the second worker was running, handling other items, while those leases held
    first_start = min(c.start for c in killed_worker.second_calls)
    assert first_start < min(epoch_ns(lease_until) for lease_until in killed_worker.held.values())
    assert killed_worker.killed_at < first_start


def test_no_item_is_handled_by_the_second_worker_while_the_killed_one_ran(
    killed_worker: KillRun,
) -> None:
    by_item: dict[str, list[Call]] = defaultdict(list)
    for call in killed_worker.killed_calls:
        # a call cut off by the kill ended at the kill at the latest
        by_item[call.event_id].append(
            Call(call.event_id, call.pid, call.start, call.end or killed_worker.killed_at)
        )
    for call in killed_worker.second_calls:
        by_item[call.event_id].append(call)
    clashes = {event_id: overlapping(calls) for event_id, calls in by_item.items()}
    assert {event_id: pairs for event_id, pairs in clashes.items() if pairs} == {}
