"""The Redis store: add latency and worker retry throughput.

Figures:
  retry_add_latency_redis_p50 / _p99   ms, await bus.retry_queue.add(event, handler, error)
  dlq_add_latency_redis_p50 / _p99     ms, await bus.dead_letters.add(retry_item, reason=...)
  worker_retry_throughput_redis        items/s, 2,000 fail-once items, worker in its own process
  worker_peak_rss_redis                MB, peak RSS of that worker process

The server is ``RETRYBUS_BENCH_REDIS_URL`` (default redis://127.0.0.1:6379/0); every
run uses a key prefix of its own and deletes its keys afterwards (never FLUSHDB).
Without a server the figures are skipped with a note on stderr.

Run alone: .venv/bin/python bench/redis_engine.py

(Not bench/redis.py: run from bench/, that name would shadow the redis package.)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import uuid

from _common import Figure, emit, median, note, percentile, quiet_logging
from latency import WARMUP, _time_dlq_adds, _time_retry_adds, caught_error
from worker import run_worker_process, seed

from retrybus import Event, EventBus, StoreUnavailable, open_store

SERVER = os.environ.get("RETRYBUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SAMPLES = 5_000
ITEMS = 2_000
ROUNDS = 5


def _url(prefix: str) -> str:
    return f"{SERVER}{'&' if '?' in SERVER else '?'}prefix={prefix}"


async def _delete_prefix(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(SERVER)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


async def latency(samples: int = SAMPLES, warmup: int = WARMUP) -> list[Figure]:
    quiet_logging()
    prefix = f"retrybus_bench_{uuid.uuid4().hex[:8]}"
    bus = EventBus(open_store(_url(prefix)))
    await bus.store.connect()
    try:
        total = warmup + samples
        events = [
            Event("bench.failed", {"n": n, "user_id": n % 97}, source="bench") for n in range(total)
        ]
        error = caught_error()
        gc.collect()
        retry_all, items = await _time_retry_adds(bus, events, error)
        gc.collect()
        dlq_all = await _time_dlq_adds(bus, items)
    finally:
        await bus.close()
        await _delete_prefix(prefix)
    retry, dlq = retry_all[warmup:], dlq_all[warmup:]
    note(
        f"redis latency: {samples} samples after {warmup} warm-up calls; "
        f"retry add max {max(retry):.3f} ms, dlq add max {max(dlq):.3f} ms"
    )
    return [
        Figure("retry_add_latency_redis_p50", percentile(retry, 0.50), "ms"),
        Figure("retry_add_latency_redis_p99", percentile(retry, 0.99), "ms"),
        Figure("dlq_add_latency_redis_p50", percentile(dlq, 0.50), "ms"),
        Figure("dlq_add_latency_redis_p99", percentile(dlq, 0.99), "ms"),
    ]


async def _seed(url: str, count: int) -> None:
    quiet_logging()
    bus = EventBus(open_store(url))
    try:
        await seed(bus, count)
    finally:
        await bus.close()


def worker_run(count: int = ITEMS) -> dict[str, float]:
    prefix = f"retrybus_bench_{uuid.uuid4().hex[:8]}"
    url = _url(prefix)
    try:
        asyncio.run(_seed(url, count))
        result = run_worker_process(url)
    finally:
        asyncio.run(_delete_prefix(prefix))
    if result["items"] != count or result["left"]:
        raise RuntimeError(f"worker handled {result['items']} of {count}, {result['left']} left")
    result["rate"] = result["items"] / result["seconds"]
    note(
        f"worker redis: {count} items drained in {result['seconds']:.3f}s = "
        f"{result['rate']:.0f} items/s (CPU {result['cpu_seconds']:.3f}s), "
        f"RSS startup {result['startup_rss_mb']:.1f} MB, peak {result['peak_rss_mb']:.1f} MB"
    )
    return result


def run() -> list[Figure]:
    try:
        asyncio.run(open_store(SERVER).health())
    except StoreUnavailable as exc:
        note(f"redis: skipped, {exc}")
        return []
    figures = asyncio.run(latency())
    runs = [worker_run() for _ in range(ROUNDS)]
    figures += [
        Figure("worker_retry_throughput_redis", median([r["rate"] for r in runs]), "items/s"),
        Figure("worker_peak_rss_redis", max(r["peak_rss_mb"] for r in runs), "MB"),
    ]
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    emit(run())
