"""Crashes on the server engines: a worker process killed mid-batch, and the
engine itself restarting under a running worker.

Workers are real processes (``tests/apps/logging_worker.py``: ``process_worker.py``
with retrybus's log on stderr), each recording every handler call durably in a
file of its own; the tests read those records, the worker's log and the store
afterwards. Every test gets a namespace of its own (a schema, a key prefix, a
database) from the engine's fixture module, removed afterwards.

The killed-worker tests use the shared PostgreSQL and Redis servers (a namespace
each), as they restart nothing; on MongoDB they use a SecantusDB server of this
module's own (see ``MONGODB_TRANSACTION_LIFETIME``). The restart tests never touch the shared servers: each starts
a private PostgreSQL cluster or Redis server of its own (tests/private_servers.py:
initdb or redis-server on a free port of 127.0.0.1, data in a temporary
directory), stops and starts that one, and removes it at the end, whatever
happens. conftest.py fails the session should the shared servers restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

import retrybus
from call_records import Call, clashes, epoch_ns, read_calls, wait_until
from engines import mongodb as mongodb_engine
from engines import postgresql as postgresql_engine
from engines import redis as redis_engine
from engines._common import unique_name
from private_servers import PrivatePostgres, PrivateRedis, PrivateSecantus
from retrybus import Event, EventBus, FixedDelay
from retrybus._outcomes import Counters

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "apps" / "logging_worker.py"
HANDLER = "record_item"
OUTAGE_LOGGED = "store unavailable, retrying in"
STORE_IS_BACK = "is back"


# Namespaces on the engines ------------------------------------------------------


@dataclass
class Namespace:
    """A store URL of a namespace no other test uses, and how to remove it."""

    url: str
    remove: Callable[[], Awaitable[None]]


# MongoDB: a SecantusDB server of this module's own (unless MONGODB_URI names a real
# server). A worker SIGKILLed inside a transaction (a batch of outcomes) leaves it
# open, and the next worker's claim of an item it wrote waits until the server
# aborts it: mongod does so transactionLifetimeLimitSeconds (60 s by default) after
# its last use, SecantusDB only when another transaction runs a statement, so on
# the session's shared SecantusDB the second worker (and the database's removal)
# could wait forever. The private one aborts such transactions 3 s after their
# last use, checking twice a second (tests/private_servers.py).
MONGODB_TRANSACTION_LIFETIME = 3.0


async def _nothing() -> None:
    """Nothing to remove: the namespace goes with its private server."""


async def new_namespace(kind: str, mongodb_server: str | None = None) -> Namespace:
    """A fresh namespace on engine ``kind``; skips (or, with CI=true, fails) when
    its server is unreachable. MongoDB's is on ``mongodb_server`` when given."""
    if kind == "postgresql":
        async with postgresql_engine.fresh_schema() as schema:  # only checks the server
            pass
        return Namespace(
            postgresql_engine.url_with_schema(schema),
            lambda: postgresql_engine.drop_schema(schema),
        )
    if kind == "redis":
        await redis_engine.ping()
        prefix = unique_name()
        return Namespace(redis_engine.store_url(prefix), lambda: redis_engine.delete_prefix(prefix))
    if kind == "mongodb":
        name = unique_name()
        if mongodb_server is not None:
            return Namespace(f"{mongodb_server}/{name}?timeout=10", _nothing)
        url = mongodb_engine.database_url(name, timeout="10")  # starts SecantusDB
        return Namespace(url, lambda: mongodb_engine.drop_database(url, name))
    raise ValueError(f"no such engine: {kind}")


@pytest.fixture(scope="module")
def namespaces() -> Iterator[Callable[[str], Namespace]]:
    """Makes namespaces (``namespaces(kind)``); removes them all at the end."""
    made: list[Namespace] = []
    servers = contextlib.ExitStack()
    mongodb_servers: list[str] = []

    def make(kind: str) -> Namespace:
        if kind == "mongodb" and not os.environ.get("MONGODB_URI") and not mongodb_servers:
            server = PrivateSecantus(transaction_lifetime=MONGODB_TRANSACTION_LIFETIME)
            mongodb_servers.append(servers.enter_context(server).url)
        namespace = asyncio.run(new_namespace(kind, next(iter(mongodb_servers), None)))
        made.append(namespace)
        return namespace

    with servers:
        yield make
        for namespace in made:
            asyncio.run(namespace.remove())


# Calls, store state, worker processes (as in test_sqlite_processes.py) ---------------


@dataclass
class StoreState:
    retry_count: int
    dead_count: int
    counters: Counters
    leases: dict[str, tuple[str | None, datetime | None]] = field(default_factory=dict)


async def read_state(url: str) -> StoreState:
    """How many items are in each queue, the running totals, and who holds which lease."""
    async with retrybus.open_store(url) as store:
        bus = EventBus(store)
        items = await bus.retry_queue.list(limit=100_000)
        return StoreState(
            retry_count=await bus.retry_queue.count(),
            dead_count=await bus.dead_letters.count(),
            counters=await store.counters(),
            leases={item.event_id: (item.lease_owner, item.lease_until) for item in items},
        )


async def seed(url: str, count: int) -> set[str]:
    """Publish ``count`` events whose handler fails on this first call, so each
    leaves one retry item, due at once. Returns their event ids."""

    async def fails_the_first_time(event: Event) -> None:
        raise ConnectionError("the first call fails")

    async with retrybus.open_store(url) as store:
        bus = EventBus(store, default_policy=FixedDelay(max_retries=3, delay=0))
        bus.subscribe("*", fails_the_first_time, name=HANDLER)
        ids = set()
        for n in range(count):
            event = Event("item.created", {"n": n})
            result = await bus.publish(event)
            assert result.retrying == (HANDLER,)
            ids.add(event.id)
        assert await bus.retry_queue.count() == count
    return ids


class Workers:
    """Worker processes on one store, with their record and log (stderr) files."""

    def __init__(self, directory: Path, url: str) -> None:
        self.directory = directory
        self.url = url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def record(self, name: str) -> Path:
        return self.directory / f"{name}.calls"

    def calls(self, name: str) -> list[Call]:
        return read_calls(self.record(name))

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spawn(self, name: str, *options: str) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "--store",
                    self.url,
                    "--record",
                    str(self.record(name)),
                    "--name",
                    name,
                    "--handler",
                    HANDLER,
                    *options,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def wait(self, name: str, timeout: float = 30.0) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs[name].kill()
            self.procs[name].wait()
            pytest.fail(f"worker {name} did not finish in {timeout}s:\n{self.log(name)}")

    def stop(self, name: str, timeout: float = 15.0) -> int:
        """SIGTERM: the worker finishes what it runs and exits."""
        self.procs[name].send_signal(signal.SIGTERM)
        return self.wait(name, timeout)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def handled(calls: list[Call]) -> set[str]:
    """The items some call returned for."""
    return {call.event_id for call in calls if call.end is not None}


# A worker killed with SIGKILL in the middle of a batch ------------------------------

KILL_LEASE = 2.0
KILL_ITEMS = {"postgresql": 40, "redis": 40, "mongodb": 20}  # SecantusDB is slow
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
    items: set[str]
    killed_calls: list[Call]
    second_calls: list[Call]
    killed_at: int
    held: dict[str, datetime]  # event id -> lease_until of the items the killed worker held
    second_exit_code: int
    second_log: str
    after: StoreState


@pytest.fixture(scope="module", params=["postgresql", "redis", "mongodb"])
def killed_worker(
    request: pytest.FixtureRequest,
    namespaces: Callable[[str], Namespace],
    tmp_path_factory: pytest.TempPathFactory,
) -> KillRun:
    """Items whose handler takes 0.2 s; a worker process (batches of 10, 5 at a
    time, lease 2 s) is SIGKILLed once some of its handlers returned (50 ms or more
    ago) while others are still running; then a second worker process runs on the
    same store until the retry queue is empty."""
    kind = request.param
    url = namespaces(kind).url
    directory = tmp_path_factory.mktemp(f"killed_worker_{kind}")
    items = asyncio.run(seed(url, KILL_ITEMS[kind]))
    workers = Workers(directory, url)
    try:
        victim = workers.spawn("killed", *SLOW_WORKER)
        wait_until(
            lambda: killed_mid_batch(workers.calls("killed")) or victim.poll() is not None,
            "the worker has finished some handlers and is in the middle of others",
        )
        assert victim.poll() is None, workers.log("killed")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.time_ns()
        before = asyncio.run(read_state(url))
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
        items=items,
        killed_calls=workers.calls("killed"),
        second_calls=workers.calls("second"),
        killed_at=killed_at,
        held=held,
        second_exit_code=second_exit_code,
        second_log=workers.log("second"),
        after=asyncio.run(read_state(url)),
    )


def test_a_worker_is_killed_while_it_holds_items_in_flight(killed_worker: KillRun) -> None:
    in_flight = {c.event_id for c in killed_worker.killed_calls if c.end is None}
    assert in_flight
    assert in_flight <= set(killed_worker.held)
    assert killed_worker.second_exit_code == 0, killed_worker.second_log


def test_no_item_is_lost_when_a_worker_is_killed(killed_worker: KillRun) -> None:
    assert handled([*killed_worker.killed_calls, *killed_worker.second_calls]) == (
        killed_worker.items
    )
    after = killed_worker.after
    assert (after.retry_count, after.dead_count) == (0, 0)
    assert after.counters.retry_succeeded == len(killed_worker.items)
    assert after.counters.retry_dead_lettered == 0


def test_only_the_items_the_killed_worker_held_are_handled_again(killed_worker: KillRun) -> None:
    calls = Counter(c.event_id for c in [*killed_worker.killed_calls, *killed_worker.second_calls])
    assert {event_id for event_id, n in calls.items() if n > 1} <= set(killed_worker.held)
    assert {event_id: n for event_id, n in calls.items() if n > 2} == {}
    second = Counter(c.event_id for c in killed_worker.second_calls)
    assert {event_id: second[event_id] for event_id in killed_worker.held} == dict.fromkeys(
        killed_worker.held, 1
    )


def test_the_killed_workers_items_are_taken_over_only_after_their_lease_expires(
    killed_worker: KillRun,
) -> None:
    taken_over = {
        c.event_id: c.start for c in killed_worker.second_calls if c.event_id in killed_worker.held
    }
    assert set(taken_over) == set(killed_worker.held)
    early = {
        event_id: (start, epoch_ns(killed_worker.held[event_id]))
        for event_id, start in taken_over.items()
        if start < epoch_ns(killed_worker.held[event_id])
    }
    assert early == {}
    # and the second worker was running, handling other items, while those leases held
    first_start = min(c.start for c in killed_worker.second_calls)
    assert killed_worker.killed_at < first_start
    assert first_start < min(epoch_ns(lease_until) for lease_until in killed_worker.held.values())


def test_no_item_is_handled_by_the_second_worker_while_the_killed_one_ran_it(
    killed_worker: KillRun,
) -> None:
    cut_off = [  # a call cut off by the kill ended at the kill at the latest
        Call(c.event_id, c.pid, c.start, c.end or killed_worker.killed_at)
        for c in killed_worker.killed_calls
    ]
    assert clashes([*cut_off, *killed_worker.second_calls]) == {}


# The engine restarting under a running worker -------------------------------------
#
# These run on servers of their own (tests/private_servers.py), never on the shared
# ones the rest of the suite uses: each test starts a private PostgreSQL cluster or
# Redis server, restarts that, and removes it at the end.

RESTART_WORKER = ("--batch-size=10", "--concurrency=5", "--lease=5", "--check-interval=0.05")


@dataclass
class RestartRun:
    items: set[str]
    calls: list[Call]
    alive_after_restart: bool
    exit_code: int
    log: str
    after: StoreState


# PostgreSQL: it keeps its data, so items are added first and the server restarts
# while the worker is in the middle of them.

PG_ITEMS = 40


@pytest.fixture(scope="module")
def postgresql_restart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartRun]:
    """40 items whose handler takes 0.2 s, a worker (batches of 10, 5 at a time,
    lease 5 s) handling them, on a private PostgreSQL cluster; once some are done
    and others running, the cluster is stopped (fast shutdown), and started again
    once the worker has logged the outage. The worker is left to finish by itself,
    then stopped with SIGTERM."""
    with PrivatePostgres() as server:
        url = server.url
        items = asyncio.run(seed(url, PG_ITEMS))
        workers = Workers(tmp_path_factory.mktemp("postgresql_restart"), url)
        try:
            worker = workers.spawn("worker", *RESTART_WORKER, "--sleep-min=0.2", "--sleep-max=0.2")
            wait_until(
                lambda: killed_mid_batch(workers.calls("worker")) or worker.poll() is not None,
                "the worker has finished some handlers and is in the middle of others",
            )
            server.stop("fast")
            try:
                wait_until(
                    lambda: OUTAGE_LOGGED in workers.log("worker"), "the worker logs the outage"
                )
                time.sleep(1.0)  # down a while longer: the worker keeps retrying
            finally:
                server.start()
            wait_until(
                lambda: handled(workers.calls("worker")) == items or worker.poll() is not None,
                "the worker has handled every item",
                timeout=30.0,
            )
            wait_until(
                lambda: asyncio.run(read_state(url)).retry_count == 0 or worker.poll() is not None,
                "the worker has written every outcome",
            )
            alive = worker.poll() is None
            exit_code = workers.stop("worker")
        finally:
            workers.kill_all()
        yield RestartRun(
            items=items,
            calls=workers.calls("worker"),
            alive_after_restart=alive,
            exit_code=exit_code,
            log=workers.log("worker"),
            after=asyncio.run(read_state(url)),
        )


def test_the_worker_logs_the_postgresql_outage_and_resumes_by_itself(
    postgresql_restart: RestartRun,
) -> None:
    log = postgresql_restart.log
    assert OUTAGE_LOGGED in log
    assert STORE_IS_BACK in log[log.index(OUTAGE_LOGGED) :], log
    assert postgresql_restart.alive_after_restart, log
    assert postgresql_restart.exit_code == 0, log


def test_no_item_is_lost_when_postgresql_restarts(postgresql_restart: RestartRun) -> None:
    assert handled(postgresql_restart.calls) == postgresql_restart.items
    after = postgresql_restart.after
    assert (after.retry_count, after.dead_count) == (0, 0)
    assert after.counters.retry_succeeded == PG_ITEMS
    assert after.counters.retry_dead_lettered == 0


def test_an_item_handled_again_after_postgresql_restarts_never_runs_twice_at_once(
    postgresql_restart: RestartRun,
) -> None:
    calls = Counter(call.event_id for call in postgresql_restart.calls)
    assert {event_id: n for event_id, n in calls.items() if n > 2} == {}
    assert clashes(postgresql_restart.calls) == {}


def test_no_item_is_handled_twice_when_postgresql_restarts(
    postgresql_restart: RestartRun,
) -> None:
    calls = Counter(call.event_id for call in postgresql_restart.calls)
    assert {event_id: n for event_id, n in calls.items() if n > 1} == {}, postgresql_restart.log


# Redis: the private server keeps nothing on disk (no RDB, no AOF), so a restart
# empties it and any item added before would be gone with the server, whatever
# retrybus does. So the worker is running (idle, polling) when Redis goes down; the
# test checks it survives the outage, and then handles every item added after the
# server is back.

REDIS_ITEMS = 30


@pytest.fixture(scope="module")
def redis_restart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartRun]:
    """A worker running (idle) on a private Redis server; the server is shut down,
    and started again once the worker has logged the outage; then 30 items
    (handler 0.05 s) are added, the worker is left to handle them, then stopped
    with SIGTERM."""
    with PrivateRedis(persistent=False) as server:
        url = server.url
        workers = Workers(tmp_path_factory.mktemp("redis_restart"), url)
        try:
            worker = workers.spawn(
                "worker", *RESTART_WORKER, "--sleep-min=0.05", "--sleep-max=0.05"
            )
            wait_until(
                lambda: " started on " in workers.log("worker") or worker.poll() is not None,
                "the worker has started",
            )
            server.stop("fast")
            try:
                wait_until(
                    lambda: OUTAGE_LOGGED in workers.log("worker"), "the worker logs the outage"
                )
                time.sleep(1.0)  # down a while longer: the worker keeps retrying
            finally:
                server.start()
            items = asyncio.run(seed(url, REDIS_ITEMS))
            wait_until(
                lambda: handled(workers.calls("worker")) == items or worker.poll() is not None,
                "the worker has handled every item added after the restart",
                timeout=30.0,
            )
            wait_until(
                lambda: asyncio.run(read_state(url)).retry_count == 0 or worker.poll() is not None,
                "the worker has written every outcome",
            )
            alive = worker.poll() is None
            exit_code = workers.stop("worker")
        finally:
            workers.kill_all()
        yield RestartRun(
            items=items,
            calls=workers.calls("worker"),
            alive_after_restart=alive,
            exit_code=exit_code,
            log=workers.log("worker"),
            after=asyncio.run(read_state(url)),
        )


def test_the_worker_logs_the_redis_outage_and_resumes_by_itself(
    redis_restart: RestartRun,
) -> None:
    log = redis_restart.log
    assert OUTAGE_LOGGED in log
    assert STORE_IS_BACK in log[log.index(OUTAGE_LOGGED) :], log
    assert redis_restart.alive_after_restart, log
    assert redis_restart.exit_code == 0, log


def test_items_added_after_redis_restarts_are_each_handled_once(
    redis_restart: RestartRun,
) -> None:
    calls = Counter(call.event_id for call in redis_restart.calls)
    assert calls == Counter(dict.fromkeys(redis_restart.items, 1))
    assert handled(redis_restart.calls) == redis_restart.items
    after = redis_restart.after
    assert (after.retry_count, after.dead_count) == (0, 0)
    assert after.counters.retry_succeeded == REDIS_ITEMS
