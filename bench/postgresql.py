"""The PostgreSQL store: add latency, and worker throughput and memory on a fail-once workload.

Figures:
  retry_add_latency_postgresql_p50 / _p99   ms, await bus.retry_queue.add(event, handler, error)
  dlq_add_latency_postgresql_p50 / _p99     ms, await bus.dead_letters.add(retry_item, reason=...)
  worker_retry_throughput_postgresql        items/s, 2,000 items, worker in its own process
                                            (median of 5 runs)
  worker_retry_throughput_postgresql_20k    items/s, 20,000 items, likewise
  worker_peak_rss_postgresql                MB, peak RSS (VmHWM) of the 20,000-item worker
  worker_startup_rss_postgresql             MB, its peak RSS after imports and connect
  …_async_commit                            the latency and 2,000-item throughput figures again
                                            with ?synchronous_commit=off (a server crash may
                                            lose the last commits; the default waits for fsync)

Everything runs in a schema of its own (dropped afterwards) of the server at
RETRYBUS_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test).
Worker settings are those of bench/worker.py: batch_size=100, concurrency=16.

Run alone: .venv/bin/python bench/postgresql.py
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import uuid

from _common import Figure, emit, median, note, percentile, quiet_logging
from latency import SAMPLES, WARMUP, _time_dlq_adds, _time_retry_adds, caught_error
from worker import (
    LARGE,
    ROUNDS_SMALL,
    SMALL,
    run_worker_process,
    seed,
)

from retrybus import Event, EventBus, open_store

BASE_URL = os.environ.get(
    "RETRYBUS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


ASYNC_COMMIT = "&synchronous_commit=off"


def schema_url(schema: str, extra: str = "") -> str:
    return f"{BASE_URL}{'&' if '?' in BASE_URL else '?'}schema={schema}{extra}"


async def drop_schema(schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    from retrybus._stores.postgresql import PostgresStore

    conn = await asyncpg.connect(PostgresStore.from_url(BASE_URL)._dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def new_schema() -> str:
    return f"retrybus_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"


async def latency(
    samples: int = SAMPLES, warmup: int = WARMUP, extra: str = "", suffix: str = ""
) -> list[Figure]:
    quiet_logging()
    error = caught_error()
    schema = new_schema()
    bus = EventBus(open_store(schema_url(schema, extra)))
    try:
        await bus.store.connect()
        total = warmup + samples
        events = [
            Event("bench.failed", {"n": n, "user_id": n % 97}, source="bench") for n in range(total)
        ]
        gc.collect()
        retry_all, items = await _time_retry_adds(bus, events, error)
        gc.collect()
        dlq_all = await _time_dlq_adds(bus, items)
    finally:
        await bus.close()
        await drop_schema(schema)
    retry = retry_all[warmup:]
    dlq = dlq_all[warmup:]
    note(
        f"latency postgresql{suffix}: {samples} samples after {warmup} warm-up calls; "
        f"retry add max {max(retry):.3f} ms, dlq add max {max(dlq):.3f} ms"
    )
    return [
        Figure(f"retry_add_latency_postgresql{suffix}_p50", percentile(retry, 0.50), "ms"),
        Figure(f"retry_add_latency_postgresql{suffix}_p99", percentile(retry, 0.99), "ms"),
        Figure(f"dlq_add_latency_postgresql{suffix}_p50", percentile(dlq, 0.50), "ms"),
        Figure(f"dlq_add_latency_postgresql{suffix}_p99", percentile(dlq, 0.99), "ms"),
    ]


async def _seed(url: str, count: int) -> None:
    quiet_logging()
    bus = EventBus(open_store(url))
    try:
        await seed(bus, count)
    finally:
        await bus.close()


def worker_run(count: int, extra: str = "") -> dict[str, float]:
    """Seed a fresh schema with ``count`` items and drain it in a worker process."""
    schema = new_schema()
    url = schema_url(schema, extra)
    try:
        asyncio.run(_seed(url, count))
        result = run_worker_process(url)
    finally:
        asyncio.run(drop_schema(schema))
    if result["items"] != count or result["left"]:
        raise RuntimeError(f"worker handled {result['items']} of {count}, {result['left']} left")
    result["rate"] = result["items"] / result["seconds"]
    note(
        f"worker postgresql{extra}: {count} items drained in {result['seconds']:.3f}s = "
        f"{result['rate']:.0f} items/s (CPU {result['cpu_seconds']:.3f}s), "
        f"RSS startup {result['startup_rss_mb']:.1f} MB, peak {result['peak_rss_mb']:.1f} MB"
    )
    return result


def run() -> list[Figure]:
    figures = asyncio.run(latency())
    small = [worker_run(SMALL)["rate"] for _ in range(ROUNDS_SMALL)]
    large = worker_run(LARGE)
    async_figures = asyncio.run(latency(extra=ASYNC_COMMIT, suffix="_async_commit"))
    async_small = [worker_run(SMALL, ASYNC_COMMIT)["rate"] for _ in range(ROUNDS_SMALL)]
    return [
        *figures,
        *async_figures,
        Figure("worker_retry_throughput_postgresql", median(small), "items/s"),
        Figure("worker_retry_throughput_postgresql_20k", large["rate"], "items/s"),
        Figure("worker_peak_rss_postgresql", large["peak_rss_mb"], "MB"),
        Figure("worker_startup_rss_postgresql", large["startup_rss_mb"], "MB"),
        Figure("worker_retry_throughput_postgresql_async_commit", median(async_small), "items/s"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    emit(run())


if __name__ == "__main__":
    main()
