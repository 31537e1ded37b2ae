"""Chaos: a publisher and two worker processes on one store, the workers killed
with SIGKILL every few seconds and the database server restarted once mid-run;
afterwards nothing is lost, every duplicate is explained, nothing ran twice at once.

On each engine (a SQLite file; a private PostgreSQL cluster, Redis server with an
append-only file, and SecantusDB server, see tests/private_servers.py, which the
test may restart; SecantusDB standalone, see ``engine_url``):

- one publisher process publishes 1,000 events with ``EventBus.publish``. Its
  bus has two handlers: ``flaky`` fails on its first call for one event in three
  (in the publisher, so those deliveries go to the retry queue), and on every call
  for one event in fifteen (those end in the dead letter queue after their
  retries); ``steady`` always succeeds. The bus gets ``store_timeout=`` when
  ``EventBus`` takes it (it retries its store writes through an outage); a
  publish that raises ``StoreUnavailable`` anyway is logged and published again
  with the same event id.
- two worker processes (this file run as a script: ``python tests/test_chaos.py
  worker …``, built like tests/apps/process_worker.py) retry the failed
  deliveries, leases of 2 s, retry delays of 0.2 s. Each process records every
  handler call durably in a file of its own (``S``/``E`` lines that
  call_records.read_calls reads, the ``E`` line carrying ``ok``/``fail``), and in
  a second file each outcome the store accepted (``W`` lines: store.complete
  wrapped), so the test knows which calls' outcomes were written.
- every 1.5–3 s (at random) one of the workers is SIGKILLed and started again;
  one server restart happens about 40 % into the publishing (PostgreSQL: an
  immediate shutdown, recovered from its WAL; Redis with an append-only file and
  SecantusDB: a clean one). SQLite has no server: only the workers are killed.

When the publisher is done the kills stop, the retry queue is left to empty, and
the workers are stopped. Then, from the records and the store:

(a) nothing is lost: every (event, handler) delivery ended in a successful call
    or in the dead letter queue, never both, and the retry queue is empty;
(b) every duplicate success is explained: a delivery called successfully more
    than once follows a successful call whose worker was killed before the store
    had its outcome, or an event the publisher logged as re-published; a call
    with no end record was cut off by a kill;
(c) never twice at once: no two calls of one delivery overlap in time
    (call_records.clashes; a call cut off by a kill ends when its process died).

A short summary is printed for each engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import retrybus
from call_records import Call, clashes, read_calls
from private_servers import PrivatePostgres, PrivateRedis, PrivateSecantus
from retrybus import Event, EventBus, FixedDelay, RetryWorker, StoreUnavailable
from retrybus._outcomes import DeadLettered, Outcome, Succeeded

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

THIS_FILE = Path(__file__).resolve()
ENGINES = ["sqlite", "postgresql", "redis", "mongodb"]

EVENTS = 1_000
EVENT_TYPE = "chaos.happened"
FLAKY, STEADY = "flaky", "steady"
MAX_RETRIES = 2
RETRY_DELAY = 0.2
LEASE = 2.0
STORE_TIMEOUT = 5.0
PUBLISH_SECONDS = {"sqlite": 8.0, "postgresql": 8.0, "redis": 8.0, "mongodb": 10.0}
KILL_EVERY = (1.5, 3.0)
RESTART_AT = 0.4  # of the publishing time
RESTART_PAUSE = 0.5
RESTART_MODE = {"postgresql": "immediate", "redis": "fast", "mongodb": "fast"}
WORKER_OPTIONS = {"batch_size": 20, "concurrency": 8, "check_interval": 0.2}


def fails_in_publisher(n: int) -> bool:
    """``flaky`` fails its first call (the publisher's) for one event in three."""
    return n % 3 == 0


def fails_always(n: int) -> bool:
    """... and every call for one event in fifteen: dead-lettered after its retries."""
    return n % 15 == 0


def delivery(event_id: str, handler: str) -> str:
    """The key of one (event, handler) delivery, in the records and the checks."""
    return f"{event_id}/{handler}"


# The processes: python tests/test_chaos.py (publisher | worker) ...---------------


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def chaos_bus(store: retrybus.Store, role: str, record: int, **options: Any) -> EventBus:
    """The bus of the publisher (``role="publisher"``) or of a worker: the handlers
    record each call (``S``/``E`` lines, one ``os.write`` each) and fail as the
    event's number says."""
    pid = os.getpid()
    pause = 0.002 if role == "publisher" else 0.05
    bus = EventBus(
        store, default_policy=FixedDelay(max_retries=MAX_RETRIES, delay=RETRY_DELAY), **options
    )

    def handler(name: str) -> Any:
        async def handle(event: Event) -> None:
            n = int(event.data["n"])
            fails = name == FLAKY and (
                fails_always(n) or (role == "publisher" and fails_in_publisher(n))
            )
            key = delivery(event.id, name)
            start = time.time_ns()
            os.write(record, f"S {key} {pid} {start}\n".encode())
            await asyncio.sleep(random.uniform(0.0, pause))
            end = time.time_ns()
            outcome = "fail" if fails else "ok"
            os.write(record, f"E {key} {pid} {start} {end} {outcome}\n".encode())
            if fails:
                raise ConnectionError(f"{name} fails for event {n}")

        return handle

    bus.subscribe(EVENT_TYPE, handler(FLAKY), name=FLAKY)
    bus.subscribe(EVENT_TYPE, handler(STEADY), name=STEADY)
    return bus


def note_written_outcomes(store: retrybus.Store, written: int) -> None:
    """Wrap ``store.complete`` to append a ``W <delivery> <pid> <time_ns> <kind>``
    line for each outcome the store accepted, once it has."""
    complete = store.complete
    pid = os.getpid()

    async def noted(outcomes: Any, owner: str | None, now: Any) -> set[str]:
        applied = await complete(outcomes, owner, now)
        at = time.time_ns()
        lines = []
        for outcome in outcomes:
            item_id, key, kind = _outcome_fields(outcome)
            if item_id in applied:
                lines.append(f"W {key} {pid} {at} {kind}\n")
        if lines:
            os.write(written, "".join(lines).encode())
        return applied

    store.complete = noted  # type: ignore[method-assign]


def _outcome_fields(outcome: Outcome) -> tuple[str, str, str]:
    if isinstance(outcome, DeadLettered):
        dead = outcome.dead_letter
        return outcome.item_id, delivery(dead.event_id, dead.handler_name), "dead"
    kind = "ok" if isinstance(outcome, Succeeded) else "again"
    return outcome.item.id, delivery(outcome.item.event_id, outcome.item.handler_name), kind


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )


async def publisher_main(args: argparse.Namespace) -> int:
    """Publish ``--count`` events over ``--seconds``; log each (``P id n``), and
    each publish that raised StoreUnavailable (``R id n time``) before it is
    published again, same event id."""
    _log_to_stderr()
    record, log = _open_append(args.record), _open_append(args.log)
    store = retrybus.open_store(args.store)
    takes_timeout = "store_timeout" in inspect.signature(EventBus).parameters
    options = {"store_timeout": STORE_TIMEOUT} if takes_timeout else {}
    bus = chaos_bus(store, "publisher", record, **options)
    os.write(log, f"# store_timeout {'yes' if takes_timeout else 'no'}\n".encode())
    # the server may be restarting as this process starts (a loaded machine starts
    # it late): it waits for the server as a publish does through an outage
    deadline = time.monotonic() + 30
    while True:
        try:
            await store.connect()
            break
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    began = time.monotonic()
    pace = args.seconds / args.count
    for n in range(args.count):
        wait = began + n * pace - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        event = Event(EVENT_TYPE, {"n": n}, source="chaos")
        for tries in itertools.count(1):
            try:
                await bus.publish(event)
                break
            except StoreUnavailable as exc:
                reason = str(exc).replace("\n", " ")[:200]
                os.write(log, f"R {event.id} {n} {time.time_ns()} {reason}\n".encode())
                if tries >= 200:
                    raise
                await asyncio.sleep(0.1)
        os.write(log, f"P {event.id} {n}\n".encode())
    await store.close()
    os.write(log, b"# done\n")
    return 0


async def worker_main(args: argparse.Namespace) -> int:
    """A RetryWorker on ``--store`` until SIGTERM, recording calls and written outcomes."""
    _log_to_stderr()
    record, written = _open_append(args.record), _open_append(args.written)
    store = retrybus.open_store(args.store)
    note_written_outcomes(store, written)
    bus = chaos_bus(store, "worker", record)
    worker = RetryWorker(bus, lease=LEASE, name=args.name, **WORKER_OPTIONS)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await worker.start()
    try:
        while not stopping.is_set():
            if not worker.running:
                logging.getLogger("chaos").error("the worker's claim loop ended by itself")
                return 3
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.1)
    finally:
        await worker.stop()
        await store.close()
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="the chaos test's publisher and workers")
    roles = parser.add_subparsers(dest="role", required=True)
    publisher = roles.add_parser("publisher")
    publisher.add_argument("--store", required=True)
    publisher.add_argument("--record", required=True)
    publisher.add_argument("--log", required=True)
    publisher.add_argument("--count", type=int, default=EVENTS)
    publisher.add_argument("--seconds", type=float, default=8.0)
    worker = roles.add_parser("worker")
    worker.add_argument("--store", required=True)
    worker.add_argument("--record", required=True)
    worker.add_argument("--written", required=True)
    worker.add_argument("--name", required=True)
    return parser.parse_args(argv)


# The run -------------------------------------------------------------------------


@dataclass
class Incarnation:
    """One worker process: its name, files and fate."""

    name: str
    proc: subprocess.Popen[bytes]
    record: Path
    written: Path
    log: Path
    killed_at: int | None = None  # time_ns once it is dead, when we killed it
    exited: int | None = None  # its exit code, when it ended by itself
    stopped: int | None = None  # its exit code after the SIGTERM at the end


class Chaos:
    """The publisher and the workers of one run, and the kills."""

    def __init__(self, directory: Path, url: str, rng: random.Random) -> None:
        self.directory = directory
        self.url = url
        self.rng = rng
        self.live: dict[str, Incarnation] = {}
        self.incarnations: list[Incarnation] = []
        self.numbers = itertools.count()
        self.publisher: subprocess.Popen[bytes] | None = None

    def spawn_worker(self, slot: str) -> None:
        name = f"{slot}.{next(self.numbers)}"
        files = {kind: self.directory / f"{name}.{kind}" for kind in ("calls", "written", "log")}
        with files["log"].open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(THIS_FILE),
                    "worker",
                    "--store",
                    self.url,
                    "--record",
                    str(files["calls"]),
                    "--written",
                    str(files["written"]),
                    "--name",
                    name,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        incarnation = Incarnation(name, proc, files["calls"], files["written"], files["log"])
        self.live[slot] = incarnation
        self.incarnations.append(incarnation)

    def spawn_publisher(self, seconds: float) -> None:
        with (self.directory / "publisher.err").open("wb") as log:
            self.publisher = subprocess.Popen(
                [
                    sys.executable,
                    str(THIS_FILE),
                    "publisher",
                    "--store",
                    self.url,
                    "--record",
                    str(self.directory / "publisher.calls"),
                    "--log",
                    str(self.directory / "publisher.log"),
                    "--seconds",
                    str(seconds),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill_one(self) -> None:
        """SIGKILL one worker at random and start another in its place."""
        slot = self.rng.choice(sorted(self.live))
        incarnation = self.live[slot]
        if incarnation.proc.poll() is None:
            incarnation.proc.send_signal(signal.SIGKILL)
            incarnation.proc.wait()
            incarnation.killed_at = time.time_ns()
        else:
            incarnation.exited = incarnation.proc.returncode
        self.spawn_worker(slot)

    def replace_exited(self) -> None:
        """Start a worker in place of one that ended by itself (say, when it was
        started while the server was down and gave up)."""
        for slot, incarnation in list(self.live.items()):
            if incarnation.proc.poll() is not None:
                incarnation.exited = incarnation.proc.returncode
                self.spawn_worker(slot)

    def stop_workers(self) -> None:
        for incarnation in self.live.values():
            if incarnation.proc.poll() is None:
                incarnation.proc.send_signal(signal.SIGTERM)
        for incarnation in self.live.values():
            try:
                incarnation.proc.wait(20)
            except subprocess.TimeoutExpired:
                incarnation.proc.kill()
                incarnation.proc.wait()
                incarnation.killed_at = time.time_ns()
            incarnation.stopped = incarnation.proc.returncode

    def kill_everything(self) -> None:
        for proc in [self.publisher, *(i.proc for i in self.incarnations)]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@dataclass
class ChaosRun:
    engine: str
    seed: int
    seconds: float
    events: dict[str, int]  # event id -> its number
    republished: Counter[str]  # event id -> how many publishes of it raised
    store_timeout: bool  # the publisher's EventBus took store_timeout=
    publisher_exit: int
    publisher_err: str
    calls: list[Call]  # every handler call; Call.event_id is the delivery key
    outcomes: dict[tuple[str, int, int], str]  # (delivery, pid, start) -> "ok" / "fail"
    written: dict[tuple[str, int], list[int]]  # (delivery, pid) -> when outcomes were written
    killed: dict[int, int]  # pid -> time_ns it was dead by
    exited: list[tuple[str, int]]  # workers that ended by themselves, with their code
    server_restarts: int
    drained: bool
    retry_count: int
    dead_letters: list[retrybus.DeadLetterItem] = field(default_factory=list)
    worker_logs: dict[str, str] = field(default_factory=dict)

    def outage_seen(self) -> int:
        """How many worker processes logged an outage of the store."""
        return sum("store unavailable" in log for log in self.worker_logs.values())

    def ok_calls(self) -> dict[str, list[Call]]:
        found: dict[str, list[Call]] = defaultdict(list)
        for call in self.calls:
            if self.outcomes.get((call.event_id, call.pid, call.start)) == "ok":
                found[call.event_id].append(call)
        for calls in found.values():
            calls.sort(key=lambda call: call.start)
        return found

    def outcome_written(self, call: Call) -> bool:
        """The store accepted an outcome from this call's process for its delivery
        after the call started."""
        return any(at >= call.start for at in self.written.get((call.event_id, call.pid), []))


def read_outcomes(record: Path) -> dict[tuple[str, int, int], str]:
    """``ok``/``fail`` of each call that returned (the last field of its ``E`` line)."""
    found = {}
    if record.exists():
        for line in record.read_text().splitlines():
            fields = line.split()
            if fields[0] == "E":
                found[(fields[1], int(fields[2]), int(fields[3]))] = fields[5]
    return found


def read_written(path: Path, into: dict[tuple[str, int], list[int]]) -> None:
    if path.exists():
        for line in path.read_text().splitlines():
            _w, key, pid, at, _kind = line.split()
            into[(key, int(pid))].append(int(at))


def bounded(function: Any, *args: Any, timeout: float = 60.0) -> Any:
    """``asyncio.run(function(*args))`` in a thread of its own, given up after
    ``timeout`` seconds (TimeoutError): a store that hangs must not hang the suite."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(function(*args)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="chaos-store")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{function.__name__} on the store took more than {timeout}s")
    if errors:
        raise errors[0]
    return result[0]


async def store_counts(url: str) -> tuple[int, list[retrybus.DeadLetterItem]]:
    async with retrybus.open_store(url) as store:
        bus = EventBus(store)
        return await bus.retry_queue.count(), await bus.dead_letters.list(limit=100_000)


async def retry_count(url: str) -> int | None:
    try:
        async with retrybus.open_store(url) as store:
            return await EventBus(store).retry_queue.count()
    except StoreUnavailable:
        return None


@contextlib.contextmanager
def engine_url(engine: str, directory: Path) -> Iterator[tuple[str, Any]]:
    """The store URL of a fresh store on ``engine``, and its private server (None for SQLite)."""
    if engine == "sqlite":
        yield f"sqlite:///{directory / 'chaos.db'}", None
        return
    if engine == "postgresql":
        with PrivatePostgres() as server:
            yield server.url, server
    elif engine == "redis":
        with PrivateRedis(persistent=True) as server:
            yield f"{server.url}?prefix=chaos", server
    elif engine == "mongodb":
        # MongoDB runs on a standalone SecantusDB (no transactions: retrybus's code path
        # for a standalone server, which writes a dead letter before it deletes its retry
        # item). With transactions, SecantusDB 0.7.0b3 deadlocks under this load: a plain
        # update (a claim, a lease extension) that meets an uncommitted write of an open
        # transaction retries forever while holding the collection's lock, which the
        # transaction's next statement waits for; and it aborts a transaction abandoned
        # by a SIGKILLed client only when another transaction runs a statement.
        with PrivateSecantus(transactions=False) as server:
            yield f"{server.url}/chaos?timeout={STORE_TIMEOUT:g}", server
    else:
        raise ValueError(f"no such engine: {engine}")


def run_chaos(engine: str, directory: Path) -> ChaosRun:
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    began = time.monotonic()
    with engine_url(engine, directory) as (url, server):
        bounded(store_counts, url)  # creates the schema before the processes race to
        chaos = Chaos(directory, url, rng)
        restarter: threading.Thread | None = None
        restart_errors: list[BaseException] = []

        def restart() -> None:
            try:
                server.restart(RESTART_PAUSE, RESTART_MODE[engine])
            except BaseException as exc:
                restart_errors.append(exc)

        try:
            chaos.spawn_worker("a")
            chaos.spawn_worker("b")
            publishing = PUBLISH_SECONDS[engine]
            chaos.spawn_publisher(publishing)
            publisher = chaos.publisher
            assert publisher is not None
            started = time.monotonic()
            next_kill = started + rng.uniform(*KILL_EVERY)
            restart_at = started + publishing * RESTART_AT
            deadline = started + publishing + 60.0
            while publisher.poll() is None and time.monotonic() < deadline:
                now = time.monotonic()
                if server is not None and restarter is None and now >= restart_at:
                    restarter = threading.Thread(target=restart, name="chaos-restart")
                    restarter.start()
                if now >= next_kill:
                    chaos.kill_one()
                    next_kill = now + rng.uniform(*KILL_EVERY)
                chaos.replace_exited()
                time.sleep(0.02)
            if restarter is not None:
                restarter.join(60)
            if restart_errors:
                raise restart_errors[0]
            # the kills stop; the workers empty the retry queue
            drain_until = time.monotonic() + 60.0
            drained = False
            while publisher.poll() is not None and time.monotonic() < drain_until:
                chaos.replace_exited()
                if bounded(retry_count, url, timeout=20.0) == 0:
                    drained = True
                    break
                time.sleep(0.25)
            chaos.stop_workers()
        finally:
            chaos.kill_everything()
        left, dead_letters = bounded(store_counts, url)
        restarts = 0 if server is None else server.restarts

    publisher_log = (directory / "publisher.log").read_text().splitlines()
    events = {}
    republished: Counter[str] = Counter()
    for line in publisher_log:
        kind, *rest = line.split()
        if kind == "P":
            events[rest[0]] = int(rest[1])
        elif kind == "R":
            republished[rest[0]] += 1
    calls = read_calls(directory / "publisher.calls")
    outcomes = read_outcomes(directory / "publisher.calls")
    written: dict[tuple[str, int], list[int]] = defaultdict(list)
    killed = {}
    exited = []
    for incarnation in chaos.incarnations:
        calls += read_calls(incarnation.record)
        outcomes.update(read_outcomes(incarnation.record))
        read_written(incarnation.written, written)
        if incarnation.killed_at is not None:
            killed[incarnation.proc.pid] = incarnation.killed_at
        elif incarnation.exited not in (None, 0):
            exited.append((incarnation.name, incarnation.exited))
    err = directory / "publisher.err"
    return ChaosRun(
        engine=engine,
        seed=seed,
        seconds=time.monotonic() - began,
        events=events,
        republished=republished,
        store_timeout="# store_timeout yes" in publisher_log,
        publisher_exit=publisher.returncode,
        publisher_err=err.read_text(errors="replace")[-4000:] if err.exists() else "",
        calls=calls,
        outcomes=outcomes,
        written=dict(written),
        killed=killed,
        exited=exited,
        server_restarts=restarts,
        drained=drained,
        retry_count=left,
        dead_letters=dead_letters,
        worker_logs={
            i.name: i.log.read_text(errors="replace") for i in chaos.incarnations if i.log.exists()
        },
    )


@pytest.fixture(scope="module", params=ENGINES)
def chaos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ChaosRun:
    engine = request.param
    return run_chaos(engine, tmp_path_factory.mktemp(f"chaos_{engine}"))


# The checks ----------------------------------------------------------------------


def expected_deliveries(run: ChaosRun) -> tuple[set[str], set[str]]:
    """The deliveries that should end in a success, and those that should end dead-lettered."""
    succeed, dead = set(), set()
    for event_id, n in run.events.items():
        succeed.add(delivery(event_id, STEADY))
        (dead if fails_always(n) else succeed).add(delivery(event_id, FLAKY))
    return succeed, dead


def explain(run: ChaosRun, earlier: Call) -> str | None:
    """Why a delivery was called successfully again after ``earlier`` succeeded."""
    event_id = earlier.event_id.split("/")[0]
    if run.republished[event_id]:
        return "re-published by the publisher"
    if earlier.pid in run.killed and not run.outcome_written(earlier):
        return "its worker was killed before its outcome was written"
    if REMOVAL_FAILED in run.publisher_err:
        # a durable publish removes a success's record after publish returns, retried
        # for store_timeout; a restart outlasting it leaves the record to a worker
        return "the publisher could not remove a success's record through the outage"
    return None


REMOVAL_FAILED = "could not remove the records of successful deliveries"


def duplicates(run: ChaosRun) -> list[tuple[Call, Call, str | None]]:
    """Each successful call of a delivery after its first, with the successful
    call before it and the explanation (None: unexplained)."""
    found = []
    for calls in run.ok_calls().values():
        for earlier, later in itertools.pairwise(calls):
            found.append((earlier, later, explain(run, earlier)))
    return found


def cut_off(run: ChaosRun) -> list[Call]:
    """Calls with no end record."""
    return [call for call in run.calls if call.end is None]


def summary(run: ChaosRun) -> str:
    succeed, dead = expected_deliveries(run)
    oks = run.ok_calls()
    dups = duplicates(run)
    reasons = Counter(reason or "UNEXPLAINED" for *_pair, reason in dups)
    cut = cut_off(run)
    return (
        f"chaos on {run.engine} (seed {run.seed}, {run.seconds:.1f}s): "
        f"{len(run.events)} events, {len(succeed) + len(dead)} deliveries -> "
        f"{len(set(oks) & succeed)} succeeded, {len(run.dead_letters)} dead letters "
        f"({len(dead)} expected); {len(run.calls)} handler calls; "
        f"{len(run.killed)} workers SIGKILLed, {len(cut)} calls cut off by a kill, "
        f"{len(run.exited)} workers exited by themselves {[code for _n, code in run.exited]}; "
        f"{run.server_restarts} server restart(s), an outage logged by {run.outage_seen()} "
        f"worker process(es); publisher: store_timeout "
        f"{'on' if run.store_timeout else 'not available'}, "
        f"{sum(run.republished.values())} publish(es) raised StoreUnavailable and were re-published "
        f"({len(run.republished)} events); {len(dups)} duplicate successes: "
        + (", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "none")
    )


def test_chaos_summary(chaos: ChaosRun, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\n{summary(chaos)}")
    assert chaos.publisher_exit == 0, chaos.publisher_err
    assert len(chaos.events) == EVENTS
    assert chaos.killed, "no worker was killed"
    if chaos.engine != "sqlite":
        assert chaos.server_restarts == 1


def test_nothing_is_lost(chaos: ChaosRun) -> None:
    assert chaos.publisher_exit == 0, chaos.publisher_err
    assert len(chaos.events) == EVENTS
    assert chaos.drained, f"the retry queue still holds {chaos.retry_count} item(s)"
    assert chaos.retry_count == 0
    succeed, dead = expected_deliveries(chaos)
    succeeded = set(chaos.ok_calls())
    dead_lettered = Counter(delivery(d.event_id, d.handler_name) for d in chaos.dead_letters)
    assert succeeded == succeed, {
        "never succeeded": len(succeed - succeeded),
        "succeeded unexpectedly": len(succeeded - succeed),
    }
    assert set(dead_lettered) == dead, {
        "not dead-lettered": len(dead - set(dead_lettered)),
        "dead-lettered unexpectedly": len(set(dead_lettered) - dead),
    }
    assert not succeeded & set(dead_lettered)
    # a delivery is dead-lettered once, unless its event was published twice
    twice = {
        key: n for key, n in dead_lettered.items() if n > 1 + chaos.republished[key.split("/")[0]]
    }
    assert twice == {}
    reasons = Counter(d.reason for d in chaos.dead_letters)
    assert reasons == Counter({f"failed after {MAX_RETRIES} retries": len(chaos.dead_letters)})


def test_every_duplicate_success_is_explained(chaos: ChaosRun) -> None:
    unexplained = [(earlier, later) for earlier, later, reason in duplicates(chaos) if not reason]
    assert unexplained == [], summary(chaos)
    # a call that never returned was cut off by a kill
    assert [call for call in cut_off(chaos) if call.pid not in chaos.killed] == []


def test_never_twice_at_once(chaos: ChaosRun) -> None:
    calls = [
        call
        if call.end is not None
        else Call(call.event_id, call.pid, call.start, chaos.killed[call.pid])
        for call in chaos.calls
        if call.end is not None or call.pid in chaos.killed
    ]
    assert clashes(calls) == {}


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    main = publisher_main if arguments.role == "publisher" else worker_main
    sys.exit(asyncio.run(main(arguments)))
