"""The worker side of bench/worker.py, run as its own process so that its peak
RSS is its own: drains a retry queue (a SQLite file, or any store URL) with RetryWorker.run_once
and prints one JSON line (items, seconds, peak RSS) on stdout.

    .venv/bin/python bench/_worker_process.py --db /tmp/x.db --handler bench.handle
    .venv/bin/python bench/_worker_process.py --store redis://127.0.0.1:6379/0?prefix=b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import time


def _ru_maxrss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _rss_mb() -> float:
    """Peak RSS of this process, in MiB.

    On Linux ru_maxrss is not reset by exec: a child started by subprocess
    reports its parent's peak if that was higher (the bench parent holds 20,000
    items). /proc/self/status VmHWM is the peak of this process image alone, so
    it is used where it exists; ru_maxrss elsewhere.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _ru_maxrss_mb()


async def drain(
    store_url: str, handler: str, batch_size: int, concurrency: int
) -> dict[str, float]:
    from retrybus import Event, EventBus, RetryWorker, open_store

    logging.getLogger("retrybus").addHandler(logging.NullHandler())
    logging.getLogger("retrybus").propagate = False

    bus = EventBus(open_store(store_url))

    async def handle(event: Event) -> None:
        return None  # the retry succeeds: the first call failed in the parent

    bus.subscribe("bench.*", handle, name=handler)
    worker = RetryWorker(bus, batch_size=batch_size, concurrency=concurrency, check_interval=1.0)
    await bus.store.connect()
    startup_rss = _rss_mb()
    handled = 0
    cpu_start = time.process_time()
    start = time.perf_counter_ns()
    while True:
        done = await worker.run_once()
        if not done:
            break
        handled += done
    elapsed = (time.perf_counter_ns() - start) / 1e9
    cpu = time.process_time() - cpu_start
    left = await bus.retry_queue.count()
    await bus.close()
    return {
        "items": handled,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "left": left,
        "startup_rss_mb": startup_rss,
        "peak_rss_mb": _rss_mb(),
        "ru_maxrss_mb": _ru_maxrss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="a SQLite file")
    where.add_argument("--store", help="any store URL")
    parser.add_argument("--handler", default="bench.handle")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    url = args.store or f"sqlite:///{args.db}"
    result = asyncio.run(drain(url, args.handler, args.batch_size, args.concurrency))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
