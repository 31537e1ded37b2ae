"""Durable delivery on SQLite, PostgreSQL and Redis, each figure beside a floor
measured in the same run, in the same stretch of time (the VM's speed varies up
to 2x from hour to hour, and a shared disk's commit time within seconds).

Figures (ENGINE is sqlite, postgresql or redis):

  floor_ENGINE_round_trip_p50        ms, the store's floor, timed in blocks of 100 taking
                                     turns with blocks of 100 publishes of the next
                                     figure: SQLite a bare `BEGIN IMMEDIATE; INSERT one
                                     small row; COMMIT` (WAL, synchronous=NORMAL, as the
                                     store), PostgreSQL a bare prepared asyncpg INSERT of
                                     one small row (one round trip, its durable commit
                                     included), Redis a bare redis-py SET
  durable_publish_latency_ENGINE_p50 / _p99
                                     ms, `await bus.publish(event)` on a bus whose store is
                                     ENGINE (durable: the library's default there), one
                                     async handler that succeeds, one publish after another
  durable_publish_throughput_ENGINE  events/s, the same with 100 concurrent publishers
                                     (tasks), the removals of the succeeded records
                                     flushed before the clock stops
  nondurable_publish_throughput_ENGINE
                                     events/s, the same 100 publishers with durable=False
                                     (no store write at all), rounds taking turns with the
                                     durable ones: the CPU's ceiling for this workload now
  deferred_throughput_ENGINE         events/s, one publishing process (100 concurrent
                                     `publish(event, defer=True)`) and one `retrybus worker`
                                     process (library defaults: concurrency 16, batch
                                     100), 20,000 events, from the first publish to the
                                     last handler call returned
  deferred_floor_ENGINE_round_trip_p50
                                     ms, the floor operation timed every 25 ms by this
                                     process meanwhile (the two others load the machine)
  durable_worker_peak_rss_ENGINE     MB, peak RSS (VmHWM) of that worker process after
                                     its 61,000 deferred deliveries
  deferred_start_latency_ENGINE_p50 / _p90
                                     ms, an idle `retrybus worker` process:
                                     `publish(event, defer=True)` here to the handler's
                                     start there (clock: CLOCK_MONOTONIC, shared by all
                                     processes); a random 20-70 ms pause before each
  deferred_start_floor_ENGINE_round_trip_p50
                                     ms, one floor operation in the middle of each pause
  worker_quick_items_throughput_ENGINE / worker_slow_items_throughput_ENGINE
                                     items/s, one `retrybus worker --concurrency 500`
                                     process draining rounds of 10,000 deferred deliveries
                                     (each round written in one store write once the one
                                     before is done), whose handler returns at once; in
                                     the slow rounds 1 % of them (every 100th) await
                                     asyncio.sleep(1.0) first. Counted from the round's
                                     first call returned to its last quick one (the items
                                     handled by then, slow ones included): how much the
                                     slow items hold up the rest. The last slow items end
                                     up to 1 s later; stderr has that time too.
  worker_slow_items_slowdown_ENGINE  %, how much lower the slow figure is than the quick
                                     one (target: under 20)

Why `--concurrency 500` for the slow items (batch_size stays 100): the handlers
are async, so a lane is a task waiting on the claim queue, not a thread, and
lanes are cheap. By Little's law the slow items hold (rate x 1 % x 1 s) lanes
on average: 200 at 20,000 items/s. A claim takes at most as many items as
lanes are free (up to batch_size), so the quick items need about 100 more to
keep claims full; 500 covers both with room for the slow items' random
bunching. The library default, 16, would leave the slow items holding every
lane: about 16 slow items a second, so at most some 1,600 items/s.

Sizes: the latency 1,500 samples after 200 warm-up publishes (nearest-rank
percentiles), the floor likewise; concurrent publishing the median of three
10,000-event rounds after a 2,000-event warm-up round; deferred throughput the
median of three 20,000-event rounds after a 1,000-event one, one worker and
one publisher process throughout; the start latency 100 samples after 10; the
slow items the median of five rounds of each kind, taking turns (one round
lasts about a second: fewer would leave the comparison to the machine's noise).

Each part runs in a namespace of its own, removed afterwards: a temporary
SQLite file, a PostgreSQL schema of RETRYBUS_BENCH_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/test), a Redis key prefix of
RETRYBUS_BENCH_REDIS_URL (default redis://127.0.0.1:6379/0). A server that
cannot be reached is skipped with a note on stderr.

Run alone: .venv/bin/python bench/durable.py [--engines sqlite,redis]
[--only latency,concurrent,deferred,start,slow] [--quick] [--profile DIR]
(--quick: tiny sizes, to try it out; --profile: cProfile the in-process
publishes into DIR/<what>_<engine>.prof; the latencies of such a run are the
profiler's, not retrybus's).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import gc
import itertools
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from _common import Figure, emit, median, note, percentile, quiet_logging
from _durable_processes import EVENT_TYPE, HANDLER, publish_all
from postgresql import BASE_URL, drop_schema, new_schema, schema_url
from redis_engine import SERVER as REDIS_SERVER
from redis_engine import _delete_prefix
from redis_engine import _url as redis_url
from worker import _peak_rss_mb

from retrybus import Event, EventBus, open_store
from retrybus._records import RetryItem

ENGINES = ("sqlite", "postgresql", "redis")
PARTS = ("latency", "concurrent", "deferred", "start", "slow")
HERE = Path(__file__).parent
PROCESSES = HERE / "_durable_processes.py"
RETRYBUS = Path(sys.executable).with_name("retrybus")
PUBLISHERS = 100
SLOW_CONCURRENCY = 500
SLOW_EVERY = 100  # 1 %
SLOW_SECONDS = 1.0
T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    latency_samples: int = 1_500
    latency_warmup: int = 200
    concurrent_events: int = 10_000
    concurrent_warmup: int = 2_000
    concurrent_rounds: int = 3
    deferred_events: int = 20_000
    deferred_warmup: int = 1_000
    deferred_rounds: int = 3
    start_samples: int = 100
    start_warmup: int = 10
    slow_items: int = 10_000
    slow_rounds: int = 5


QUICK = Sizes(
    latency_samples=200,
    latency_warmup=20,
    concurrent_events=1_000,
    concurrent_warmup=200,
    concurrent_rounds=2,
    deferred_events=1_000,
    deferred_warmup=200,
    deferred_rounds=2,
    start_samples=10,
    start_warmup=2,
    slow_items=1_000,
    slow_rounds=1,
)


# namespaces and floors --------------------------------------------------------


@contextlib.asynccontextmanager
async def namespace(engine: str) -> AsyncIterator[str]:
    """A store URL of its own for ``engine``, removed afterwards."""
    if engine == "sqlite":
        with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as tmp:
            yield f"sqlite:///{os.path.join(tmp, 'durable.db')}"
    elif engine == "postgresql":
        schema = new_schema()
        try:
            yield schema_url(schema)
        finally:
            await drop_schema(schema)
    else:
        prefix = f"retrybus_bench_{uuid.uuid4().hex[:8]}"
        try:
            yield redis_url(prefix)
        finally:
            await _delete_prefix(prefix)


Op = Callable[[int], Awaitable[object]]


@contextlib.asynccontextmanager
async def sqlite_floor() -> AsyncIterator[Op]:
    """``BEGIN IMMEDIATE; INSERT one small row; COMMIT`` on a file of its own."""
    with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as tmp:
        conn = sqlite3.connect(os.path.join(tmp, "floor.db"), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE floor (id TEXT PRIMARY KEY, data TEXT)")

            async def commit_one_row(n: int) -> None:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO floor VALUES (?, ?)", (f"row-{n}", '{"n":1}'))
                conn.execute("COMMIT")

            yield commit_one_row
        finally:
            conn.close()


@contextlib.asynccontextmanager
async def postgresql_floor() -> AsyncIterator[Op]:
    """A prepared asyncpg INSERT of one small row (autocommit: one round trip,
    the durable commit included), in a schema of its own."""
    import asyncpg  # type: ignore[import-untyped]

    from retrybus._stores.postgresql import PostgresStore

    schema = new_schema()
    conn = await asyncpg.connect(PostgresStore.from_url(BASE_URL)._dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'CREATE TABLE "{schema}".floor (id text PRIMARY KEY, data text)')
        insert = await conn.prepare(f'INSERT INTO "{schema}".floor VALUES ($1, $2)')
        yield lambda n: insert.fetch(f"row-{n}", '{"n":1}')
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@contextlib.asynccontextmanager
async def redis_floor() -> AsyncIterator[Op]:
    """A redis-py SET of one key."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_SERVER)
    key = f"retrybus_bench_floor_{uuid.uuid4().hex[:8]}"
    try:
        yield lambda n: client.set(key, n)
        await client.delete(key)
    finally:
        await client.aclose()


FLOORS = {
    "sqlite": (sqlite_floor, "a bare commit of one row"),
    "postgresql": (postgresql_floor, "a bare asyncpg INSERT"),
    "redis": (redis_floor, "a bare redis-py SET"),
}


class FloorSampler:
    """Times the engine's floor operation every ``every`` seconds in the
    background (this process is otherwise only waiting on the others): the
    store's round trip while a multi-process part runs."""

    def __init__(self, engine: str, every: float = 0.025) -> None:
        self.engine = engine
        self.every = every
        self.samples: list[float] = []
        self._floor = FLOORS[engine][0]()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FloorSampler:
        op = await self._floor.__aenter__()
        self._task = asyncio.create_task(self._sample(op))
        return self

    async def _sample(self, op: Op) -> None:
        clock = time.perf_counter_ns
        for n in itertools.count():
            await asyncio.sleep(self.every)
            start = clock()
            await op(n)
            self.samples.append((clock() - start) / 1e6)

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._floor.__aexit__(*exc_info)

    def figure(self, name: str) -> Figure:
        p50 = percentile(self.samples, 0.5)
        note(
            f"floor {self.engine} ({FLOORS[self.engine][1]}) meanwhile: p50 {p50:.3f} ms, "
            f"p90 {percentile(self.samples, 0.9):.3f} ms ({len(self.samples)} samples)"
        )
        return Figure(name, p50, "ms")


# in this process: durable publish ----------------------------------------------


def bench_bus(url: str) -> EventBus:
    """A bus on ``url`` with the handler the worker processes have (it succeeds)."""
    bus = EventBus(open_store(url))

    async def handle(event: Event) -> None:
        return None

    bus.subscribe("bench.*", handle, name=HANDLER)
    return bus


def events(count: int, start: int = 0) -> list[Event]:
    return [Event(EVENT_TYPE, {"n": n}, source="bench") for n in range(start, start + count)]


class StoreCalls:
    """Counts the store writes a publish makes (the group commits), by wrapping
    the store instance's methods (a function call per write: nothing measurable)."""

    def __init__(self, bus: EventBus) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        store: Any = bus.store
        for name in ("record_pending", "complete"):
            setattr(store, name, self._counted(name, getattr(store, name)))

    def _counted(
        self, name: str, method: Callable[..., Awaitable[T]]
    ) -> Callable[..., Awaitable[T]]:
        counts = self.counts

        async def counted(items: Any, *args: Any, **kwargs: Any) -> T:
            counts[name] += 1
            counts[f"{name}_items"] += len(items)
            return await method(items, *args, **kwargs)

        return counted

    def describe(self) -> str:
        parts = []
        for name in ("record_pending", "complete"):
            calls = self.counts[name]
            if calls:
                parts.append(
                    f"{calls} {name} writes ({self.counts[f'{name}_items'] / calls:.1f} records each)"
                )
        self.counts.clear()
        return ", ".join(parts) or "no store writes"


async def _profiled(profile: Path | None, name: str, work: Awaitable[T]) -> T:
    if profile is None:
        return await work
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return await work
    finally:
        profiler.disable()
        os.makedirs(profile, exist_ok=True)
        profiler.dump_stats(profile / f"{name}.prof")
        note(f"profile written to {profile / f'{name}.prof'}")


async def publish_latency(
    engine: str, url: str, sizes: Sizes, profile: Path | None = None
) -> list[Figure]:
    """One publish after another, each timed, in blocks of 100 taking turns with
    blocks of 100 floor operations (a shared disk's commit time drifts within
    seconds); then, for stderr, publishes with the previous one's background
    removal written before the clock starts, and on PostgreSQL publishes with
    synchronous_commit=off."""
    quiet_logging()
    bus = bench_bus(url)
    await bus.store.connect()
    assert bus.core.publishes_durably
    calls = StoreCalls(bus)
    clock = time.perf_counter_ns
    make_floor, floor_what = FLOORS[engine]
    block = 100
    try:
        total = sizes.latency_warmup + sizes.latency_samples
        batch = events(total)
        timed: list[float] = []
        floor: list[float] = []

        async def alternate(floor_op: Op) -> None:
            for first in range(0, total, block):
                for event in batch[first : first + block]:
                    start = clock()
                    await bus.publish(event)
                    timed.append((clock() - start) / 1e6)
                for n in range(first, min(first + block, total)):
                    start = clock()
                    if profile is None:  # a profile is of publishes alone
                        await floor_op(n)
                    floor.append((clock() - start) / 1e6)

        async with make_floor() as floor_op:
            gc.collect()
            await _profiled(profile, f"publish_latency_{engine}", alternate(floor_op))
        timed, floor = timed[sizes.latency_warmup :], floor[sizes.latency_warmup :]
        await bus.core.ledger.flush()
        writes = calls.describe()
        isolated: list[float] = []
        for event in events(sizes.latency_samples // 3, start=total):
            await bus.core.ledger.flush()
            start = clock()
            await bus.publish(event)
            isolated.append((clock() - start) / 1e6)
        await bus.core.ledger.flush()
        left = await bus.store.retry_count()
    finally:
        await bus.close()
    if left:
        raise RuntimeError(f"{left} records left after the durable publishes on {engine}")
    note(
        f"floor {engine}, {floor_what}: p50 {percentile(floor, 0.5):.3f} ms, p99 "
        f"{percentile(floor, 0.99):.3f} ms; durable publish: p50 {percentile(timed, 0.5):.3f} "
        f"ms, p99 {percentile(timed, 0.99):.3f} ms, max {max(timed):.3f} ms ({writes}); with "
        f"the previous removal written first (not timed): p50 {percentile(isolated, 0.5):.3f} ms"
    )
    if engine == "postgresql":
        await _publish_latency_async_commit(url, sizes.latency_samples // 3)
    return [
        Figure(f"floor_{engine}_round_trip_p50", percentile(floor, 0.5), "ms"),
        Figure(f"durable_publish_latency_{engine}_p50", percentile(timed, 0.5), "ms"),
        Figure(f"durable_publish_latency_{engine}_p99", percentile(timed, 0.99), "ms"),
    ]


async def _publish_latency_async_commit(url: str, samples: int) -> None:
    """PostgreSQL's publish latency without waiting for the WAL flush (stderr)."""
    bus = bench_bus(f"{url}&synchronous_commit=off")
    clock = time.perf_counter_ns
    timed: list[float] = []
    try:
        await bus.store.connect()
        for event in events(samples + 100, start=10**6):
            start = clock()
            await bus.publish(event)
            timed.append((clock() - start) / 1e6)
        await bus.core.ledger.flush()
    finally:
        await bus.close()
    timed = timed[100:]
    note(
        f"durable publish postgresql with synchronous_commit=off: p50 "
        f"{percentile(timed, 0.5):.3f} ms, p99 {percentile(timed, 0.99):.3f} ms"
    )


async def publish_throughput(
    engine: str, url: str, sizes: Sizes, profile: Path | None = None
) -> list[Figure]:
    """100 concurrent publishers; durable and not durable rounds take turns."""
    quiet_logging()
    bus = bench_bus(url)
    await bus.store.connect()
    calls = StoreCalls(bus)
    numbers = iter(range(10**9))

    async def one_round(count: int, durable: bool, profiled: str = "") -> float:
        batch = events(count, start=next(numbers) * count)
        gc.collect()
        start = time.perf_counter_ns()
        work = publish_all(bus, batch, PUBLISHERS, durable=durable)
        await (_profiled(profile, profiled, work) if profiled else work)
        await bus.core.ledger.flush()
        return count / ((time.perf_counter_ns() - start) / 1e9)

    durable: list[float] = []
    plain: list[float] = []
    try:
        await one_round(sizes.concurrent_warmup, True)
        await one_round(sizes.concurrent_warmup, False)
        calls.describe()
        if profile is not None:
            await one_round(sizes.concurrent_events, True, f"publish_throughput_{engine}")
        for _ in range(sizes.concurrent_rounds):
            durable.append(await one_round(sizes.concurrent_events, True))
            plain.append(await one_round(sizes.concurrent_events, False))
        writes = calls.describe()
        left = await bus.store.retry_count()
    finally:
        await bus.close()
    if left:
        raise RuntimeError(f"{left} records left after the durable publishes on {engine}")
    note(
        f"durable publish {engine}, {PUBLISHERS} publishers: {[round(r) for r in durable]} "
        f"events/s ({writes}); durable=False: {[round(r) for r in plain]} events/s"
    )
    return [
        Figure(f"durable_publish_throughput_{engine}", median(durable), "events/s"),
        Figure(f"nondurable_publish_throughput_{engine}", median(plain), "events/s"),
    ]


# worker processes --------------------------------------------------------------


class WorkerProcess:
    """A `retrybus worker` process serving bench/_durable_processes.py's bus;
    its stdout marks are read as they come, its log kept for errors."""

    def __init__(self, process: asyncio.subprocess.Process, what: str) -> None:
        self.process = process
        self.what = what
        self.marks: asyncio.Queue[list[str]] = asyncio.Queue()
        self.log: collections.deque[str] = collections.deque(maxlen=30)
        self.ready = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read_marks()),
            asyncio.create_task(self._read_log()),
        ]

    @classmethod
    async def start(
        cls, url: str, *options: str, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        process = await asyncio.create_subprocess_exec(
            str(RETRYBUS),
            "worker",
            "_durable_processes:bus",
            "--store",
            url,
            "--app-dir",
            str(HERE),
            "--log-level",
            "info",
            *options,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        worker = cls(process, f"retrybus worker {' '.join(options)}".strip())
        await worker._within(worker.ready.wait(), 60, "its start")
        return worker

    async def _read_marks(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.marks.put_nowait(line.decode().split())

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode().rstrip()
            self.log.append(text)
            if "serving the handlers" in text:
                self.ready.set()
            elif " INFO " not in text:
                note(f"{self.what}: {text}")

    async def _within(self, work: Awaitable[T], seconds: float, what: str) -> T:
        """``work``'s result; an error naming ``what`` should the worker exit or
        ``seconds`` pass first."""
        task = asyncio.ensure_future(work)
        exited = asyncio.ensure_future(self.process.wait())
        try:
            await asyncio.wait({task, exited}, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            exited.cancel()
        if task.done():
            return task.result()
        task.cancel()
        log = "\n".join(self.log)
        raise RuntimeError(f"{self.what}: no {what} within {seconds:g}s; its log:\n{log}")

    async def mark(self, kind: str, within: float = 300) -> list[str]:
        """The next stdout mark of this kind (``start``, ``done``, ``fast``)."""
        while True:
            fields = await self._within(self.marks.get(), within, f"'{kind}' mark")
            if fields[0] == kind:
                return fields

    def peak_rss_mb(self) -> float:
        return _peak_rss_mb(self.process.pid)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5)


async def _store_left(url: str) -> int:
    """How many records are left in the store at ``url`` (0 once everything was
    handled and its outcome written)."""
    bus = EventBus(open_store(url))
    try:
        for _ in range(100):  # the worker's last outcomes may be a moment behind
            left = await bus.store.retry_count()
            if not left:
                return 0
            await asyncio.sleep(0.05)
        return left
    finally:
        await bus.close()


async def deferred_throughput(
    engine: str, url: str, sizes: Sizes, *worker_options: str
) -> list[Figure]:
    """A publishing process and a worker process (``worker_options``: more
    `retrybus worker` flags than the defaults); 20,000 events a round."""
    counts = [sizes.deferred_warmup] + [sizes.deferred_events] * sizes.deferred_rounds
    marks = [sum(counts[: n + 1]) for n in range(len(counts))]
    worker = await WorkerProcess.start(
        url, *worker_options, env={"RETRYBUS_BENCH_MARKS": ",".join(map(str, marks))}
    )
    publisher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROCESSES),
        "publish",
        "--store",
        url,
        "--warmup",
        str(sizes.deferred_warmup),
        "--count",
        str(sizes.deferred_events),
        "--rounds",
        str(sizes.deferred_rounds),
        "--concurrency",
        str(PUBLISHERS),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert publisher.stdin is not None
    assert publisher.stdout is not None
    rates: list[float] = []
    details: list[str] = []
    sampler = FloorSampler(engine)
    try:
        await sampler.__aenter__()
        if (await asyncio.wait_for(publisher.stdout.readline(), 60)).strip() != b"ready":
            raise RuntimeError("the publishing process did not start")
        for index, count in enumerate(counts):
            publisher.stdin.write(b"go\n")
            await publisher.stdin.drain()
            sent = json.loads(await asyncio.wait_for(publisher.stdout.readline(), 300))
            done = await worker.mark("done")
            if int(done[1]) != marks[index]:
                raise RuntimeError(f"worker handled {done[1]}, expected {marks[index]}")
            last = float(done[2])
            if index:
                rates.append(count / (last - sent["start"]))
                details.append(
                    f"published in {sent['end'] - sent['start']:.2f}s "
                    f"({count / (sent['end'] - sent['start']):.0f}/s), "
                    f"last handled {last - sent['end']:.3f}s after the last publish"
                )
            await asyncio.sleep(0.2)  # the round's last outcomes are written
        rss = worker.peak_rss_mb()
        publisher.stdin.close()
        await asyncio.wait_for(publisher.wait(), 30)
    finally:
        if publisher.returncode is None:
            publisher.kill()
            await publisher.wait()
        await worker.stop()
        await sampler.__aexit__(None, None, None)
    left = await _store_left(url)
    if left:
        raise RuntimeError(f"{left} deferred deliveries left on {engine}")
    note(
        f"deferred {engine}: {[round(r) for r in rates]} events/s; "
        + "; ".join(details)
        + f"; worker peak RSS {rss:.1f} MB"
    )
    return [
        sampler.figure(f"deferred_floor_{engine}_round_trip_p50"),
        Figure(f"deferred_throughput_{engine}", median(rates), "events/s"),
        Figure(f"durable_worker_peak_rss_{engine}", rss, "MB"),
    ]


async def deferred_start_latency(engine: str, url: str, sizes: Sizes) -> list[Figure]:
    """An idle worker process; publish(defer=True) here to the handler's start
    there. One floor operation in the middle of each pause."""
    quiet_logging()
    worker = await WorkerProcess.start(url, env={"RETRYBUS_BENCH_STARTS": "1"})
    bus = bench_bus(url)
    pauses = random.Random(7)
    timed: list[float] = []
    floor: list[float] = []
    try:
        await bus.store.connect()
        async with FLOORS[engine][0]() as floor_op:
            for event in events(sizes.start_warmup + sizes.start_samples):
                pause = pauses.uniform(0.02, 0.07)  # the worker is idle after it
                await asyncio.sleep(pause / 2)
                began = time.perf_counter_ns()
                await floor_op(event.data["n"])
                floor.append((time.perf_counter_ns() - began) / 1e6)
                await asyncio.sleep(pause / 2)
                start = time.monotonic()
                await bus.publish(event, defer=True)
                fields = await worker.mark("start", within=30)
                if int(fields[1]) != event.data["n"]:
                    raise RuntimeError(f"worker started event {fields[1]}, not {event.data['n']}")
                timed.append((float(fields[2]) - start) * 1000)
    finally:
        await bus.close()
        await worker.stop()
    timed, floor = timed[sizes.start_warmup :], floor[sizes.start_warmup :]
    note(
        f"deferred start {engine}: p50 {percentile(timed, 0.5):.2f} ms, p90 "
        f"{percentile(timed, 0.9):.2f} ms, max {max(timed):.2f} ms ({len(timed)} samples); "
        f"floor ({FLOORS[engine][1]}) meanwhile: p50 {percentile(floor, 0.5):.3f} ms"
    )
    return [
        Figure(f"deferred_start_floor_{engine}_round_trip_p50", percentile(floor, 0.5), "ms"),
        Figure(f"deferred_start_latency_{engine}_p50", percentile(timed, 0.5), "ms"),
        Figure(f"deferred_start_latency_{engine}_p90", percentile(timed, 0.9), "ms"),
    ]


async def _seed_deferred(bus: EventBus, count: int, slow: bool, first: int) -> None:
    """``count`` deferred deliveries, due now, as publish(defer=True) records them,
    in one store write (the worker sees them all at once); with ``slow``, every
    100th handler call sleeps SLOW_SECONDS first."""
    now = bus.clock.now()
    max_retries = bus.policy_for(HANDLER).max_retries
    records = []
    for n in range(first, first + count):
        data: dict[str, Any] = {"n": n}
        if slow and n % SLOW_EVERY == SLOW_EVERY // 2:
            data["sleep"] = SLOW_SECONDS
        event = Event(EVENT_TYPE, data, source="bench")
        records.append(RetryItem.pending(event, HANDLER, max_retries=max_retries, due=now, now=now))
    await bus.store.record_pending(records)


async def slow_items(engine: str, url: str, sizes: Sizes) -> list[Figure]:
    """One worker process; rounds of quick-only and 1 %-slow items take turns,
    each round seeded once the one before is done."""
    quiet_logging()
    count = sizes.slow_items
    kinds = [False, True] * sizes.slow_rounds
    quick_counts = [count - (count // SLOW_EVERY if slow else 0) for slow in kinds]
    marks = []
    for index in range(len(kinds)):
        marks += [index * count + 1, (index + 1) * count]
    fast_marks = [sum(quick_counts[: index + 1]) for index in range(len(kinds))]
    worker = await WorkerProcess.start(
        url,
        "--concurrency",
        str(SLOW_CONCURRENCY),
        env={
            "RETRYBUS_BENCH_MARKS": ",".join(map(str, marks)),
            "RETRYBUS_BENCH_FAST": ",".join(map(str, fast_marks)),
        },
    )
    seeder = bench_bus(url)
    quick: list[float] = []
    slow: list[float] = []
    try:
        for index, with_slow in enumerate(kinds):
            await _seed_deferred(seeder, count, with_slow, index * count)
            first = float((await worker.mark("done"))[2])
            fast = await worker.mark("fast")
            last = float((await worker.mark("done"))[2])
            handled, at = int(fast[2]) - index * count, float(fast[3])
            rate = (handled - 1) / (at - first)
            (slow if with_slow else quick).append(rate)
            note(
                f"worker {engine} {'1 % slow' if with_slow else 'quick only'}: {rate:.0f} "
                f"items/s ({handled} handled in {at - first:.3f}s, all {count} in "
                f"{last - first:.3f}s)"
            )
            await asyncio.sleep(0.2)  # the round's last outcomes are written
    finally:
        await seeder.close()
        await worker.stop()
    left = await _store_left(url)
    if left:
        raise RuntimeError(f"{left} deliveries left after the slow-items runs on {engine}")
    slowdown = (1 - median(slow) / median(quick)) * 100
    note(
        f"worker {engine}: quick only {[round(r) for r in quick]}, 1 % slow "
        f"{[round(r) for r in slow]} items/s: {slowdown:.1f} % slower (medians)"
    )
    return [
        Figure(f"worker_quick_items_throughput_{engine}", median(quick), "items/s"),
        Figure(f"worker_slow_items_throughput_{engine}", median(slow), "items/s"),
        Figure(f"worker_slow_items_slowdown_{engine}", slowdown, "%"),
    ]


# running ---------------------------------------------------------------------


async def reachable(engine: str) -> bool:
    """Whether the engine's server answers (SQLite always does)."""
    try:
        if engine == "postgresql":
            import asyncpg

            from retrybus._stores.postgresql import PostgresStore

            conn = await asyncpg.connect(PostgresStore.from_url(BASE_URL)._dsn, timeout=5)
            await conn.close()
        elif engine == "redis":
            store = open_store(REDIS_SERVER)
            try:
                await store.health()
            finally:
                await store.close()
    except Exception as exc:
        note(f"durable {engine}: skipped, {exc}")
        return False
    return True


async def measure(
    engines: tuple[str, ...] = ENGINES,
    parts: tuple[str, ...] = PARTS,
    sizes: Sizes = Sizes(),
    profile: Path | None = None,
) -> list[Figure]:
    figures: list[Figure] = []
    for engine in engines:
        if not await reachable(engine):
            continue
        started = time.perf_counter()
        if "latency" in parts:
            async with namespace(engine) as url:
                figures += await publish_latency(engine, url, sizes, profile)
        if "concurrent" in parts:
            async with namespace(engine) as url:
                figures += await publish_throughput(engine, url, sizes, profile)
        if "deferred" in parts:
            async with namespace(engine) as url:
                figures += await deferred_throughput(engine, url, sizes)
        if "start" in parts:
            async with namespace(engine) as url:
                figures += await deferred_start_latency(engine, url, sizes)
        if "slow" in parts:
            async with namespace(engine) as url:
                figures += await slow_items(engine, url, sizes)
        note(f"durable {engine}: {time.perf_counter() - started:.1f}s")
    return figures


def run() -> list[Figure]:
    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to try it out")
    parser.add_argument("--profile", type=Path, help="cProfile the in-process publishes here")
    args = parser.parse_args()
    engines = tuple(e for e in args.engines.split(",") if e)
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = (set(engines) - set(ENGINES)) | (set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown engine or part: {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else Sizes()
    emit(asyncio.run(measure(engines, parts, sizes, args.profile)))


if __name__ == "__main__":
    main()
