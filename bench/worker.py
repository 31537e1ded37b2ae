"""Retry worker throughput on a fail-once workload.

The parent process seeds the retry queue (items already due, as a handler that
failed once leaves them: error with traceback, attempt 1); a worker then drains
it with RetryWorker.run_once in a loop, calling an async handler that succeeds.

Figures:
  worker_retry_throughput_sqlite        items/s, 2,000 items, worker in its own process
  worker_retry_throughput_sqlite_20k    items/s, 20,000 items, likewise
  worker_peak_rss_sqlite                MB, peak RSS of the 20,000-item worker process
  worker_startup_rss_sqlite             MB, its peak RSS after imports and connect, before work
  worker_retry_throughput_memory        items/s, 2,000 items, memory store, in this process
  worker_cli_peak_rss_sqlite            MB, peak RSS of a `retrybus worker` process that
                                        retried 2,000 items (the command users run)
  worker_cli_peak_rss_sqlite_metrics    MB, the same with --metrics-port (prometheus-client
                                        loaded and serving)

Worker settings are the library defaults: batch_size=100, concurrency=16.

Peak RSS is VmHWM from /proc/self/status (ru_maxrss where there is no /proc):
on Linux a child's ru_maxrss includes its parent's peak, which exec does not reset.

Run alone: .venv/bin/python bench/worker.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from _common import Figure, emit, median, note, quiet_logging
from latency import caught_error

from retrybus import Event, EventBus, RetryItem, RetryWorker, open_store
from retrybus._records import ErrorInfo  # seeding builds the rows as RetryQueue.add does

HANDLER = "bench.handle"
SMALL = 2_000
LARGE = 20_000
ROUNDS_SMALL = 5
BATCH_SIZE = 100
CONCURRENCY = 16
WORKER_SCRIPT = Path(__file__).with_name("_worker_process.py")
RETRYBUS = Path(sys.executable).with_name("retrybus")


async def seed(bus: EventBus, count: int) -> None:
    """Put ``count`` due items in the retry queue, as a first failed call leaves them.

    The rows are those ``bus.retry_queue.add`` writes, built the same way, but
    stored 500 to a transaction so that seeding 20,000 items takes well under a second.
    """
    info = ErrorInfo.from_exception(caught_error())
    policy = bus.policy_for(HANDLER)
    now = bus.clock.now()
    due = now - timedelta(seconds=1)
    items = [
        RetryItem.for_failure(
            Event("bench.failed", {"n": n, "user_id": n % 97}, source="bench"),
            HANDLER,
            info,
            attempt=1,
            max_retries=policy.max_retries,
            next_retry=due,
            now=now,
        )
        for n in range(count)
    ]
    for start in range(0, count, 500):
        await bus.store.record_failures(items[start : start + 500], [])


async def _seed_sqlite(path: str, count: int) -> None:
    quiet_logging()
    bus = EventBus(open_store(f"sqlite:///{path}"))
    try:
        await seed(bus, count)
    finally:
        await bus.close()


def run_worker_process(url: str) -> dict[str, float]:
    """Drain the store at ``url`` in a worker process of its own; its JSON report."""
    completed = subprocess.run(
        [
            sys.executable,
            str(WORKER_SCRIPT),
            "--store",
            url,
            "--handler",
            HANDLER,
            "--batch-size",
            str(BATCH_SIZE),
            "--concurrency",
            str(CONCURRENCY),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if completed.stderr.strip():
        note(completed.stderr.strip())
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def sqlite_run(count: int) -> dict[str, float]:
    """Seed a fresh SQLite file with ``count`` items and drain it in a worker process."""
    with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as tmp:
        path = os.path.join(tmp, "worker.db")
        start = time.perf_counter()
        asyncio.run(_seed_sqlite(path, count))
        seeded = time.perf_counter() - start
        result = run_worker_process(f"sqlite:///{path}")
    if result["items"] != count or result["left"]:
        raise RuntimeError(f"worker handled {result['items']} of {count}, {result['left']} left")
    result["rate"] = result["items"] / result["seconds"]
    note(
        f"worker sqlite: {count} items seeded in {seeded:.2f}s, drained in "
        f"{result['seconds']:.3f}s = {result['rate']:.0f} items/s "
        f"(CPU {result['cpu_seconds']:.3f}s: {result['items'] / result['cpu_seconds']:.0f} items/CPU-s), "
        f"RSS startup {result['startup_rss_mb']:.1f} MB, peak {result['peak_rss_mb']:.1f} MB "
        f"(ru_maxrss {result['ru_maxrss_mb']:.1f} MB, which counts this parent's peak)"
    )
    return result


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc: this figure needs Linux")


def cli_worker_rss(count: int, *options: str) -> float:
    """Peak RSS (MB) of a ``retrybus worker`` process once it has retried ``count``
    seeded items of a SQLite file (``options``: extra command-line flags)."""
    with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as tmp:
        path = os.path.join(tmp, "worker.db")
        asyncio.run(_seed_sqlite(path, count))
        worker = subprocess.Popen(
            [
                str(RETRYBUS),
                "worker",
                "_cli_app:bus",
                "--store",
                f"sqlite:///{path}",
                "--app-dir",
                str(Path(__file__).parent),
                "--check-interval",
                "0.2",
                "--log-level",
                "warning",
                *options,
            ],
        )
        try:
            deadline = time.monotonic() + 120
            while _retry_count(path):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker process stopped or stalled ({options})")
                time.sleep(0.1)
            time.sleep(0.3)  # the last outcomes' bookkeeping
            peak = _peak_rss_mb(worker.pid)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
    note(f"retrybus worker {' '.join(options) or '(no options)'}: peak RSS {peak:.1f} MB")
    return peak


def _retry_count(path: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM retry_queue").fetchone()[0])


async def memory_run(count: int) -> float:
    quiet_logging()
    bus = EventBus(open_store("memory://"))

    async def handle(event: Event) -> None:
        return None

    bus.subscribe("bench.*", handle, name=HANDLER)
    await seed(bus, count)
    worker = RetryWorker(bus, batch_size=BATCH_SIZE, concurrency=CONCURRENCY)
    handled = 0
    start = time.perf_counter_ns()
    while done := await worker.run_once():
        handled += done
    elapsed = (time.perf_counter_ns() - start) / 1e9
    if handled != count:
        raise RuntimeError(f"memory worker handled {handled} of {count}")
    return count / elapsed


def run() -> list[Figure]:
    small = [sqlite_run(SMALL)["rate"] for _ in range(ROUNDS_SMALL)]
    large = sqlite_run(LARGE)
    memory = [asyncio.run(memory_run(SMALL)) for _ in range(ROUNDS_SMALL)]
    note(f"worker memory: {[round(r) for r in memory]} items/s (median reported)")
    cli = cli_worker_rss(SMALL)
    cli_metrics = cli_worker_rss(SMALL, "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    return [
        Figure("worker_retry_throughput_sqlite", median(small), "items/s"),
        Figure("worker_retry_throughput_sqlite_20k", large["rate"], "items/s"),
        Figure("worker_peak_rss_sqlite", large["peak_rss_mb"], "MB"),
        Figure("worker_startup_rss_sqlite", large["startup_rss_mb"], "MB"),
        Figure("worker_retry_throughput_memory", median(memory), "items/s"),
        Figure("worker_cli_peak_rss_sqlite", cli, "MB"),
        Figure("worker_cli_peak_rss_sqlite_metrics", cli_metrics, "MB"),
    ]


if __name__ == "__main__":
    emit(run())
