"""The outage harness (tests/test_breaker_outage.py): a dependency down for a
while in the middle of a steady stream of deferred events, handled by worker
processes (tests/apps/outage_worker.py) on one PostgreSQL schema.

``run_outage(scenario, ...)`` publishes ``scenario.events`` events with
``defer=True`` at a steady rate over ``publish_for`` seconds (the workers make
the first deliveries), takes the dependency down ``down_at`` seconds in for
``down_for`` seconds, polls the breaker's control record
(``breaker:<service>:<name>``) every 50 ms for its transitions, waits until
every event ended in a success or a dead letter and the retry queue is empty,
stops the workers and returns what happened (``OutageRun``): every handler call
(when, which process, its outcome, the breaker's state as that process knew it),
the breaker's open periods, the dead letters. A scenario is the workers' options
(``policy``, ``breaker``, ``worker``: what tests/apps/outage_worker.py takes), so
another scenario is a few lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from conftest import ENGINES
from retrybus import CircuitBreaker, Event, EventBus, ExponentialBackoff, Store

APP = Path(__file__).parent / "apps" / "outage_worker.py"
SERVICE = "orders"
HANDLER = "save_order"
EVENT_TYPE = "order.paid"
BREAKER = "orders-db"


@dataclass(frozen=True)
class Scenario:
    """One outage run: the load, the outage, and the workers' options."""

    #: ``ExponentialBackoff`` keyword arguments
    policy: dict[str, Any]
    #: ``CircuitBreaker`` keyword arguments but the name (None: no breaker)
    breaker: dict[str, Any] | None
    #: ``RetryWorker`` keyword arguments
    worker: dict[str, Any]
    events: int = 10_000
    #: seconds over which the events are published, at a steady rate
    publish_for: float = 85.0
    #: the dependency goes down this many seconds into the run
    down_at: float = 15.0
    down_for: float = 60.0
    workers: int = 2
    handler_sleep: float = 0.002
    #: seconds after the last publish within which every event must have ended
    settle_within: float = 120.0

    @property
    def rate(self) -> float:
        """Events published per second."""
        return self.events / self.publish_for


@dataclass(frozen=True)
class Call:
    """One handler call, as a worker process recorded it (times: epoch seconds)."""

    event_id: str
    pid: int
    start: float
    end: float
    ok: bool
    #: the breaker's state as the calling process knew it when the call started
    state: str


@dataclass(frozen=True)
class OpenPeriod:
    """One opening of the breaker: open from ``opened_at`` to ``half_open_at``,
    then half-open (probes only) until ``ended_at`` (it closed, or a probe
    failed and it opened again; None: it never did within the run)."""

    trip: int
    opened_at: float
    half_open_at: float
    open_for: float
    ended_at: float | None

    def holds_open(self, moment: float) -> bool:
        """Whether it was open (not yet half-open) at ``moment``."""
        return self.opened_at <= moment < self.half_open_at


@dataclass
class OutageRun:
    """What a run gave."""

    scenario: Scenario
    calls: list[Call]
    #: event id -> when its publish returned (epoch seconds)
    published: dict[str, float]
    down: float
    up: float
    periods: list[OpenPeriod]
    #: event id -> its dead letters' count
    dead_letters: Counter[str]
    logs: str
    started: float
    retry_queue_left: int = 0
    statuses: list[dict[str, Any]] = field(default_factory=list)

    def successes(self) -> Counter[str]:
        """event id -> its successful calls."""
        return Counter(call.event_id for call in self.calls if call.ok)

    def failures(self) -> list[Call]:
        return [call for call in self.calls if not call.ok]

    def calls_while_open(self) -> list[Call]:
        """Calls that started while the shared breaker was open (not half-open)."""
        return [call for call in self.calls if any(p.holds_open(call.start) for p in self.periods)]

    def calls_while_half_open(self) -> dict[int, list[Call]]:
        """trip -> the calls that started while that opening was half-open."""
        found: dict[int, list[Call]] = defaultdict(list)
        for call in self.calls:
            for period in self.periods:
                ended = float("inf") if period.ended_at is None else period.ended_at
                if period.half_open_at <= call.start < ended:
                    found[period.trip].append(call)
        return found

    def success_rate(self, start: float, end: float) -> float:
        """Successful calls per second that ended within [start, end)."""
        ended = sum(1 for call in self.calls if call.ok and start <= call.end < end)
        return ended / (end - start)

    def recovered_at(self, rate: float, *, step: float = 1.0) -> float | None:
        """The end of the first ``step``-second bin after the dependency came back
        in which the successes reached ``rate`` per second (None: never)."""
        last = max((call.end for call in self.calls), default=self.up)
        moment = self.up
        while moment < last:
            if self.success_rate(moment, moment + step) >= rate:
                return moment + step
            moment += step
        return None

    def first_calls(self) -> dict[str, Call]:
        """Each event's first call (its first delivery), by event id."""
        first: dict[str, Call] = {}
        for call in sorted(self.calls, key=lambda c: c.start):
            first.setdefault(call.event_id, call)
        return first

    def attempts(self) -> Counter[str]:
        """event id -> how many times its handler was called."""
        return Counter(call.event_id for call in self.calls)


def read_calls(record: Path) -> list[Call]:
    """The calls a worker process recorded (tests/apps/outage_worker.py's lines)."""
    if not record.exists():
        return []
    calls = []
    for line in record.read_text().splitlines():
        event_id, pid, start, end, outcome, state = line.split()
        calls.append(
            Call(event_id, int(pid), int(start) / 1e9, int(end) / 1e9, outcome == "ok", state)
        )
    return calls


def periods_of(statuses: list[dict[str, Any]]) -> list[OpenPeriod]:
    """The open periods the breaker's stored statuses (in the order seen) show."""
    opened: dict[int, dict[str, Any]] = {}
    ends: dict[int, float] = {}
    for status in statuses:
        trips = int(status["trips"])
        if status["state"] == "open" and trips not in opened:
            opened[trips] = status
            if trips - 1 in opened and trips - 1 not in ends:
                ends[trips - 1] = _epoch(status["opened_at"])
        elif status["state"] == "closed" and trips in opened and trips not in ends:
            ends[trips] = _epoch(status["changed_at"])
    return [
        OpenPeriod(
            trip=trips,
            opened_at=_epoch(status["opened_at"]),
            half_open_at=_epoch(status["half_open_at"]),
            open_for=float(status["open_for"]),
            ended_at=ends.get(trips),
        )
        for trips, status in sorted(opened.items())
    ]


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def worker_config(scenario: Scenario, url: str, directory: Path, n: int) -> dict[str, Any]:
    """What worker ``n`` is started with (tests/apps/outage_worker.py)."""
    breaker = None if scenario.breaker is None else {"name": BREAKER, **scenario.breaker}
    return {
        "store": url,
        "service": SERVICE,
        "handler": HANDLER,
        "event_type": EVENT_TYPE,
        "record": str(directory / f"worker-{n}.calls"),
        "dependency": str(directory / "dependency-down"),
        "ready": str(directory / f"worker-{n}.ready"),
        "name": f"outage-{n}",
        "policy": scenario.policy,
        "breaker": breaker,
        "worker": scenario.worker,
        "handler_sleep": scenario.handler_sleep,
    }


@contextlib.asynccontextmanager
async def outage_store() -> AsyncIterator[tuple[str, Store]]:
    """A URL and a store on a fresh PostgreSQL schema (dropped afterwards)."""
    engine = ENGINES["postgresql"]
    async with engine.open_test_store() as store:
        yield engine.namespace_url(store), store


@contextlib.contextmanager
def _killed_at_exit(processes: list[asyncio.subprocess.Process]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)


async def run_outage(scenario: Scenario, directory: Path) -> OutageRun:
    """Run ``scenario`` on a fresh PostgreSQL schema (see the module's docstring)."""
    async with outage_store() as (url, store):
        return await _run(scenario, url, store, directory)


async def _run(scenario: Scenario, url: str, store: Store, directory: Path) -> OutageRun:
    configs = [worker_config(scenario, url, directory, n) for n in range(1, scenario.workers + 1)]
    processes: list[asyncio.subprocess.Process] = []
    with _killed_at_exit(processes):
        for config in configs:
            log = (directory / f"{config['name']}.log").open("ab")
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(APP),
                    json.dumps(config),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        await _wait_for(
            lambda: all(Path(c["ready"]).exists() for c in configs), "the workers run", 60
        )
        bus = _publisher_bus(scenario, store)
        flag = Path(configs[0]["dependency"])
        statuses: list[dict[str, Any]] = []
        published: dict[str, float] = {}
        outage: dict[str, float] = {}
        async with bus:
            started = time.time()
            polling = asyncio.create_task(_poll_breaker(store, statuses))
            try:
                await asyncio.gather(
                    _publish(bus, scenario, published),
                    _take_down(flag, scenario, outage),
                )
                records = [Path(c["record"]) for c in configs]
                await _wait_for(
                    lambda: _all_ended(bus, records, published),
                    "every event ended in a success or a dead letter",
                    scenario.settle_within,
                )
            finally:
                polling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling
            dead = await bus.dead_letters.list(limit=scenario.events * 2)
            left = await bus.retry_queue.count()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await asyncio.wait_for(process.wait(), 60)
    calls = [call for config in configs for call in read_calls(Path(config["record"]))]
    logs = "\n".join((directory / f"{c['name']}.log").read_text(errors="replace") for c in configs)
    return OutageRun(
        scenario=scenario,
        calls=calls,
        published=published,
        down=outage["down"],
        up=outage["up"],
        periods=periods_of(statuses),
        dead_letters=Counter(item.event_id for item in dead),
        logs=logs,
        started=started,
        retry_queue_left=left,
        statuses=statuses,
    )


def _publisher_bus(scenario: Scenario, store: Store) -> EventBus:
    """A publisher of the service: it knows the handler (and its breaker, so that
    what it publishes while the breaker is open waits until it half-opens) but
    never calls it (``defer=True``)."""
    bus = EventBus(store, service=SERVICE, default_policy=ExponentialBackoff(**scenario.policy))
    breaker = None if scenario.breaker is None else CircuitBreaker(BREAKER, **scenario.breaker)

    async def never_called(event: Event) -> None:
        raise AssertionError(f"the publisher called its handler for {event.id}")

    bus.subscribe(EVENT_TYPE, never_called, name=HANDLER, breaker=breaker)
    return bus


async def _publish(bus: EventBus, scenario: Scenario, published: dict[str, float]) -> None:
    """``scenario.events`` events at a steady rate, a few at a time every 20 ms."""
    begin = time.monotonic()
    sent = 0

    async def one(n: int) -> None:
        event = Event(EVENT_TYPE, {"n": n}, id=f"ev-{n}", source="shop")
        await bus.publish(event, defer=True)
        published[event.id] = time.time()

    while sent < scenario.events:
        due = min(scenario.events, int((time.monotonic() - begin) * scenario.rate) + 1)
        if due > sent:
            await asyncio.gather(*(one(n) for n in range(sent, due)))
            sent = due
        await asyncio.sleep(0.02)


async def _take_down(flag: Path, scenario: Scenario, outage: dict[str, float]) -> None:
    await asyncio.sleep(scenario.down_at)
    _set_down(flag, True)
    outage["down"] = time.time()
    await asyncio.sleep(scenario.down_for)
    _set_down(flag, False)
    outage["up"] = time.time()


def _set_down(flag: Path, down: bool) -> None:
    """The dependency is down while ``flag`` exists (the handler checks it)."""
    if down:
        flag.touch()
    else:
        flag.unlink()


async def _poll_breaker(store: Store, statuses: list[dict[str, Any]]) -> None:
    """Every distinct stored status of the breaker, in order, every 50 ms."""
    key = f"breaker:{SERVICE}:{BREAKER}"
    version = 0
    while True:
        record = await store.get_control(key)
        if record is not None and record.version != version:
            version = record.version
            statuses.append(dict(record.value))
        await asyncio.sleep(0.05)


async def _all_ended(bus: EventBus, records: list[Path], published: dict[str, float]) -> bool:
    succeeded = {call.event_id for record in records for call in read_calls(record) if call.ok}
    if len(succeeded) < len(published) and await bus.dead_letters.count() == 0:
        return False
    dead = {item.event_id for item in await bus.dead_letters.list(limit=len(published) * 2)}
    return succeeded | dead >= published.keys() and await bus.retry_queue.count() == 0


async def _wait_for(condition: Any, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting until {what}")
        await asyncio.sleep(0.5)
