"""Latency of adding one item at a time to the SQLite store's two queues.

Figures (milliseconds, per call, nearest-rank percentiles):
  retry_add_latency_sqlite_p50 / _p99   await bus.retry_queue.add(event, handler, error)
  dlq_add_latency_sqlite_p50 / _p99     await bus.dead_letters.add(retry_item, reason=...)

The error is an exception that was raised and caught (so it carries a traceback,
as a handler's error does). The SQLite file is in a temporary directory, in
WAL mode with synchronous=NORMAL (the store's defaults).

Run alone: .venv/bin/python bench/latency.py
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time

from _common import Figure, emit, note, percentile, quiet_logging

from retrybus import Event, EventBus, RetryItem, open_store

WARMUP = 500
SAMPLES = 5_000
HANDLER = "bench.handle"


def caught_error() -> Exception:
    """An exception with a traceback, as a failing handler produces."""

    def handler() -> None:
        raise ConnectionError("downstream unavailable: connection refused")

    try:
        handler()
    except ConnectionError as exc:
        return exc
    raise AssertionError("unreachable")


async def _time_retry_adds(
    bus: EventBus, events: list[Event], error: Exception
) -> tuple[list[float], list[RetryItem]]:
    add = bus.retry_queue.add
    samples: list[float] = []
    items: list[RetryItem] = []
    clock = time.perf_counter_ns
    for event in events:
        start = clock()
        item = await add(event, HANDLER, error)
        samples.append((clock() - start) / 1e6)
        items.append(item)
    return samples, items


async def _time_dlq_adds(bus: EventBus, items: list[RetryItem]) -> list[float]:
    add = bus.dead_letters.add
    samples: list[float] = []
    clock = time.perf_counter_ns
    for item in items:
        start = clock()
        await add(item, reason="failed after 3 retries")
        samples.append((clock() - start) / 1e6)
    return samples


async def measure(samples: int = SAMPLES, warmup: int = WARMUP) -> list[Figure]:
    quiet_logging()
    error = caught_error()
    with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as tmp:
        path = os.path.join(tmp, "latency.db")
        bus = EventBus(open_store(f"sqlite:///{path}"))
        await bus.store.connect()
        try:
            total = warmup + samples
            events = [
                Event("bench.failed", {"n": n, "user_id": n % 97}, source="bench")
                for n in range(total)
            ]
            gc.collect()
            retry_all, items = await _time_retry_adds(bus, events, error)
            gc.collect()
            dlq_all = await _time_dlq_adds(bus, items)
            retry = retry_all[warmup:]
            dlq = dlq_all[warmup:]
            note(
                f"latency: {samples} samples after {warmup} warm-up calls; "
                f"retry add max {max(retry):.3f} ms, dlq add max {max(dlq):.3f} ms"
            )
        finally:
            await bus.close()
    return [
        Figure("retry_add_latency_sqlite_p50", percentile(retry, 0.50), "ms"),
        Figure("retry_add_latency_sqlite_p99", percentile(retry, 0.99), "ms"),
        Figure("dlq_add_latency_sqlite_p50", percentile(dlq, 0.50), "ms"),
        Figure("dlq_add_latency_sqlite_p99", percentile(dlq, 0.99), "ms"),
    ]


def run() -> list[Figure]:
    return asyncio.run(measure())


if __name__ == "__main__":
    emit(run())
