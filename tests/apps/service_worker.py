"""A worker (or a publisher) of one service in its own process, for the services
process tests (tests/test_service_processes.py).

    python tests/apps/service_worker.py --store URL --service NAME --record PATH
        [--handler NAME=PATTERN ...] [options]

As a worker it subscribes each ``--handler NAME=PATTERN`` (a handler that
records its call and succeeds after sleeping), registers the service's
subscriptions and runs a ``RetryWorker`` until SIGTERM, then stops gracefully.
Every handler call is recorded durably, one ``os.write`` per line to the
append-only file ``--record``, in call_records.py's format with the key
``<service>/<handler>/<event_id>`` in place of the event id:

    S <key> <pid> <start_ns>
    E <key> <pid> <start_ns> <end_ns>

With ``--publish N`` it is a publisher of its service instead: it publishes the
events ``<prefix>-0`` … ``<prefix>-<N-1>`` (``--types``, a comma-separated list,
in turn; ``--publish-concurrency`` at a time), appends ``<event_id> <type>`` to
``<record>.published`` once each publish has returned, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time

import retrybus
from retrybus import Event, EventBus, FixedDelay, RetryWorker


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True, help="the store's URL")
    parser.add_argument("--service", required=True, help="the bus's service")
    parser.add_argument("--record", required=True, help="file to append handler calls to")
    parser.add_argument("--handler", action="append", default=[], help="NAME=PATTERN (repeatable)")
    parser.add_argument("--sleep-min", type=float, default=0.0, help="handler sleep, seconds")
    parser.add_argument("--sleep-max", type=float, default=0.0, help="handler sleep, seconds")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--check-interval", type=float, default=0.05)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--name", default=None, help="the worker's name")
    parser.add_argument("--publish", type=int, default=0, help="publish this many events")
    parser.add_argument("--types", default="job.run", help="event types, comma-separated")
    parser.add_argument("--publish-concurrency", type=int, default=1)
    parser.add_argument("--id-prefix", default="e", help="event ids: <prefix>-<n>")
    parser.add_argument("--route-refresh", type=float, default=5.0)
    return parser.parse_args(argv)


def make_bus(args: argparse.Namespace, record: int) -> EventBus:
    """The service's bus with its recording handlers."""
    bus = EventBus(
        retrybus.open_store(args.store),
        service=args.service,
        default_policy=FixedDelay(max_retries=3, delay=0),
        publish_lease=args.lease,
        route_refresh=args.route_refresh,
    )
    pid = os.getpid()
    for spec in args.handler:
        name, _, pattern = spec.partition("=")

        async def record_call(event: Event, name: str = name) -> None:
            key = f"{args.service}/{name}/{event.id}"
            start = time.time_ns()
            os.write(record, f"S {key} {pid} {start}\n".encode())
            await asyncio.sleep(random.uniform(args.sleep_min, max(args.sleep_min, args.sleep_max)))
            os.write(record, f"E {key} {pid} {start} {time.time_ns()}\n".encode())

        bus.subscribe(pattern, record_call, name=name)
    return bus


async def publish(bus: EventBus, args: argparse.Namespace) -> None:
    """Publish ``args.publish`` events of ``args.types`` in turn."""
    types = args.types.split(",")
    published = os.open(f"{args.record}.published", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def one(n: int) -> None:
        event = Event(types[n % len(types)], {"n": n}, id=f"{args.id_prefix}-{n}", source="shop")
        await bus.publish(event)
        os.write(published, f"{event.id} {event.type}\n".encode())

    try:
        for start in range(0, args.publish, args.publish_concurrency):
            batch = range(start, min(start + args.publish_concurrency, args.publish))
            await asyncio.gather(*(one(n) for n in batch))
    finally:
        os.close(published)


async def main(args: argparse.Namespace) -> int:
    record = os.open(args.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bus = make_bus(args, record)
    try:
        if args.publish:
            async with bus:
                await publish(bus, args)
            return 0
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        async with (
            bus,
            RetryWorker(
                bus,
                check_interval=args.check_interval,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                lease=args.lease,
                heartbeat_interval=args.heartbeat_interval,
                name=args.name,
            ),
        ):
            with contextlib.suppress(asyncio.CancelledError):
                await stopping.wait()
        return 0
    finally:
        os.close(record)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
