"""A retry worker in its own process whose one handler has a global rate, for
tests/test_rate_processes.py.

    python tests/apps/rate_worker.py --store URL --rate 100/s --record PATH --go PATH

The handler (``limited``, for every event type, ``rate=--rate``) appends
``<pid> <time.time_ns()>`` to ``--record`` (one ``os.write`` per line, so that
processes appending to one file never mix their lines). The worker starts
claiming once the file ``--go`` exists (so that several start together) and
stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import retrybus
from retrybus import Event, EventBus, RetryWorker


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--rate", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--go", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    record = os.open(args.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()

    async def limited(event: Event) -> None:
        os.write(record, f"{pid} {time.time_ns()}\n".encode())

    bus = EventBus(retrybus.open_store(args.store))
    bus.subscribe("*", limited, name="limited", rate=args.rate)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await bus.store.connect()
    go = args.go
    # a file another process creates: a stat every 5 ms
    while not os.path.exists(go) and not stop.is_set():  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(0.005)
    worker = RetryWorker(bus, concurrency=args.concurrency, check_interval=1.0)
    await worker.start()
    await stop.wait()
    await worker.stop(timeout=10)
    await bus.close()
    os.close(record)


if __name__ == "__main__":
    asyncio.run(main())
