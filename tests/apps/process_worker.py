"""A retry worker in its own process, for the multi-process tests.

    python tests/apps/process_worker.py (--db PATH | --store URL) --record PATH [options]

It opens the SQLite store at ``--db`` (or any store at ``--store``), subscribes one handler (``--handler``,
for every event type) that succeeds after sleeping, and runs a ``RetryWorker``
until the retry queue is empty (``--until-empty``) or until SIGTERM, then
stops the worker gracefully.

Every handler call is recorded durably, one ``os.write`` per line to the
append-only file ``--record`` (so a SIGKILL loses no line that was written):

    S <event_id> <pid> <start_ns>                 when the call starts
    E <event_id> <pid> <start_ns> <end_ns>        when it returns

Times are ``time.time_ns()`` (the wall clock the store's leases use too).

With ``--ready PATH --go PATH`` it connects, creates the ready file and waits
for the go file before it claims anything, so that several workers start together.

With ``--publish N`` it is a publisher instead: it publishes events ``e-0`` …
``e-<N-1>`` (``--publish-concurrency`` at a time; durably, with leases of
``--lease`` seconds, or with ``--defer`` deferred; ``--spread`` seconds apart
spreads ``deliver_in`` over them), appends ``<event_id>`` to ``<record>.published``
once each publish has returned, and exits. ``--exit-on ID`` makes the handler end the process
(``os._exit(1)``) when it is called for event ``ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import retrybus
from retrybus import Event, EventBus, FixedDelay, RetryWorker


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="the SQLite file")
    where.add_argument("--store", help="any store URL (server engines)")
    parser.add_argument("--record", required=True, help="file to append handler calls to")
    parser.add_argument("--handler", default="record_item", help="the handler's name")
    parser.add_argument("--sleep-min", type=float, default=0.0, help="handler sleep, seconds")
    parser.add_argument("--sleep-max", type=float, default=0.0, help="handler sleep, seconds")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--check-interval", type=float, default=0.05)
    parser.add_argument(
        "--name", default=None, help="the worker's name (prefix of its owner tokens)"
    )
    parser.add_argument("--until-empty", action="store_true", help="exit once the queue is empty")
    parser.add_argument("--ready", default=None, help="file to create once connected")
    parser.add_argument("--go", default=None, help="file to wait for before claiming")
    parser.add_argument("--publish", type=int, default=0, help="publish this many events")
    parser.add_argument("--publish-concurrency", type=int, default=1)
    parser.add_argument("--defer", action="store_true", help="publish deferred")
    parser.add_argument("--spread", type=float, default=0.0, help="deliver_in up to this")
    parser.add_argument("--exit-on", default=None, help="os._exit(1) when called for this id")
    parser.add_argument("--max-claims", type=int, default=3)
    parser.add_argument("--id-prefix", default="e", help="event ids: <prefix>-<n>")
    args = parser.parse_args(argv)
    if args.db is not None:
        args.store = f"sqlite:///{Path(args.db).resolve()}"
    return args


def wait_for_file(path: Path, stopping: threading.Event) -> None:
    while not path.exists() and not stopping.is_set():
        time.sleep(0.005)


async def main(args: argparse.Namespace) -> int:
    pid = os.getpid()
    record = os.open(args.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def record_item(event: Event) -> None:
        start = time.time_ns()
        os.write(record, f"S {event.id} {pid} {start}\n".encode())
        if event.id == args.exit_on:
            os._exit(1)
        await asyncio.sleep(random.uniform(args.sleep_min, max(args.sleep_min, args.sleep_max)))
        end = time.time_ns()
        os.write(record, f"E {event.id} {pid} {start} {end}\n".encode())

    store = retrybus.open_store(args.store)
    bus = EventBus(
        store,
        default_policy=FixedDelay(max_retries=3, delay=0),
        publish_lease=args.lease,
        max_claims=args.max_claims,
    )
    bus.subscribe("*", record_item, name=args.handler)
    if args.publish:
        try:
            published = os.open(
                f"{args.record}.published", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
            )
            await publish(bus, args, published)
        finally:
            await bus.close()
            os.close(record)
        return 0
    worker = RetryWorker(
        bus,
        check_interval=args.check_interval,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        lease=args.lease,
        name=args.name,
    )
    stopping = asyncio.Event()
    stopping_now = threading.Event()

    def on_sigterm() -> None:
        stopping.set()
        stopping_now.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    await store.connect()
    if args.ready:
        os.close(os.open(args.ready, os.O_WRONLY | os.O_CREAT, 0o644))
    if args.go:
        await asyncio.to_thread(wait_for_file, Path(args.go), stopping_now)
    await worker.start()
    try:
        while not stopping.is_set():
            if args.until_empty and await bus.retry_queue.count() == 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.05)
    finally:
        await worker.stop()
        await store.close()
        os.close(record)
    return 0


async def publish(bus: EventBus, args: argparse.Namespace, published: int) -> None:
    """Publish ``args.publish`` events, ``args.publish_concurrency`` at a time."""
    count = args.publish
    spread = args.spread

    async def one(n: int) -> None:
        event = Event("job.run", {"n": n}, id=f"{args.id_prefix}-{n}", source="publisher")
        if spread:
            await bus.publish(event, deliver_in=spread * n / count)
        else:
            await bus.publish(event, defer=args.defer)
        os.write(published, f"{event.id}\n".encode())

    for start in range(0, count, args.publish_concurrency):
        batch = range(start, min(start + args.publish_concurrency, count))
        await asyncio.gather(*(one(n) for n in batch))


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
