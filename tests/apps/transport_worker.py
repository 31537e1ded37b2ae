"""A worker (or a publisher) of one service consuming from a transport, in its
own process, for the transport process tests (tests/test_transport_processes.py).

    python tests/apps/transport_worker.py --store URL --transport URL --service NAME
        --record PATH [--handler NAME=PATTERN ...] [options]

As a worker it subscribes each ``--handler NAME=PATTERN`` (a handler that
records its call, in call_records.py's format with the key
``<service>/<handler>/<event_id>``, and succeeds after ``--sleep`` seconds) and
runs a ``RetryWorker`` until SIGTERM. ``--poison TYPE``: a handler called with
an event of that type kills its process (SIGKILL) instead. ``--broken NAME=PATTERN``
subscribes a handler that always fails (its retries parked for an hour).
``--kill-before-ack``: the process kills itself at its first ack, after the
store write it follows (a crash between the two).

With ``--publish N`` it is a publisher instead: it publishes ``<prefix>-0`` …
``<prefix>-<N-1>`` of ``--type``, appends each id to ``<record>.published``
once its publish has returned, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Collection, Sequence

import retrybus
from retrybus import Event, EventBus, FixedDelay, RetryWorker
from retrybus._transports.base import (
    Inbound,
    Receiver,
    Transport,
    TransportReport,
    TransportSettings,
)

PARKED = FixedDelay(delay=3600, max_retries=3)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--handler", action="append", default=[], help="NAME=PATTERN")
    parser.add_argument("--broken", action="append", default=[], help="NAME=PATTERN")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--poison", default=None, help="an event type that kills the worker")
    parser.add_argument("--kill-before-ack", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--check-interval", type=float, default=0.1)
    parser.add_argument("--publish", type=int, default=0)
    parser.add_argument("--type", default="job.run")
    parser.add_argument("--id-prefix", default="e")
    return parser.parse_args(argv)


class KillsAtFirstAck(Transport):
    """The transport, except that the process kills itself at its first ack."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner.url)
        self.inner = inner

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def health(self) -> None:
        await self.inner.health()

    async def send(self, events: Sequence[Event]) -> list[str | None]:
        return await self.inner.send(events)

    async def declare(
        self, service: str, patterns: Collection[str], settings: TransportSettings
    ) -> None:
        await self.inner.declare(service, patterns, settings)

    async def forget(self, service: str) -> None:
        await self.inner.forget(service)

    async def receiver(self, service: str, consumer: str, settings: TransportSettings) -> Receiver:
        return _Killing(await self.inner.receiver(service, consumer, settings))

    async def lag(self, service: str) -> int | None:
        return await self.inner.lag(service)

    async def check(self, services: Collection[str] = ()) -> TransportReport:
        return await self.inner.check(services)


class _Killing(Receiver):
    def __init__(self, inner: Receiver) -> None:
        self._inner = inner

    async def receive(self, limit: int, wait: float) -> list[Inbound]:
        return await self._inner.receive(limit, wait)

    async def ack(self, messages: Sequence[Inbound]) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    async def extend(self, messages: Sequence[Inbound]) -> None:
        await self._inner.extend(messages)

    async def close(self) -> None:
        await self._inner.close()


def make_bus(args: argparse.Namespace, record: int) -> EventBus:
    transport = retrybus.open_transport(args.transport)
    if args.kill_before_ack:
        transport = KillsAtFirstAck(transport)
    bus = EventBus(
        retrybus.open_store(args.store),
        service=args.service,
        transport=transport,
        default_policy=FixedDelay(max_retries=3, delay=0),
    )
    pid = os.getpid()
    for spec in args.handler:
        name, _, pattern = spec.partition("=")

        async def record_call(event: Event, name: str = name) -> None:
            key = f"{args.service}/{name}/{event.id}"
            start = time.time_ns()
            os.write(record, f"S {key} {pid} {start}\n".encode())
            if event.type == args.poison:
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(args.sleep)
            os.write(record, f"E {key} {pid} {start} {time.time_ns()}\n".encode())

        bus.subscribe(pattern, record_call, name=name)
    for spec in args.broken:
        name, _, pattern = spec.partition("=")

        async def broken(event: Event) -> None:
            raise ValueError("broken on purpose")

        bus.subscribe(pattern, broken, name=name, policy=PARKED)
    return bus


async def publish(bus: EventBus, args: argparse.Namespace) -> None:
    published = os.open(f"{args.record}.published", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def one(n: int) -> None:
        event = Event(args.type, {"n": n}, id=f"{args.id_prefix}-{n}", source="shop")
        await bus.publish(event)
        os.write(published, f"{event.id}\n".encode())

    try:
        for start in range(0, args.publish, 50):
            await asyncio.gather(*(one(n) for n in range(start, min(start + 50, args.publish))))
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
                concurrency=args.concurrency,
                lease=args.lease,
                heartbeat_interval=1.0,
            ),
        ):
            with contextlib.suppress(asyncio.CancelledError):
                await stopping.wait()
        return 0
    finally:
        os.close(record)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # "… consuming from URL": the tests wait for it instead of sleeping
    logging.getLogger("retrybus.worker").setLevel(logging.INFO)
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
