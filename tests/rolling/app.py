"""The application both releases run in the rolling-upgrade tests.

    python tests/rolling/app.py publish URL --handler H --prefix P [--count N]
        [--kinds retry,dead,pending,scheduled] [--redrive]
    python tests/rolling/app.py work URL --handler H --record PATH

It uses only what both releases have (the previous one is named in
``previous_release.py``); the tests run it as a script under either release's
``src``, or call ``publish`` and ``work`` in their own process (today's release).

``publish`` subscribes handler H (every event type), publishes COUNT events of
each kind, ids ``P-<kind>-<n>``, prints ``{"schema_version": V}`` (the store's) and
exits; nothing works on them in its process:

- ``retry``: the handler fails (retryable): a retry item, due at once;
- ``dead``: the handler raises ``PermanentError``: a dead letter;
- ``pending``: published deferred: a pending first delivery, due at once;
- ``scheduled``: published with ``deliver_in`` of ``SCHEDULE`` seconds.

With ``--redrive`` it then starts a requeue redrive of every dead letter (a
control record in the store), which it does not drive.

``work`` runs a ``RetryWorker`` with handler H, which succeeds and appends the
event's id and a newline to PATH (one ``os.write`` per line), until SIGTERM. A
store it cannot use: the error's message on stderr and exit status 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterable

import retrybus
from retrybus import Event, EventBus, FixedDelay, PermanentError, RetryWorker, StoreUnusable

KINDS = ("retry", "dead", "pending", "scheduled")
#: seconds after its publish a ``scheduled`` event is due
SCHEDULE = 1.0
#: the exit status of ``work`` on a store it refuses
REFUSED = 3


def event_ids(prefix: str, count: int, kinds: Iterable[str] = KINDS) -> set[str]:
    """The ids ``publish`` gives its events."""
    return {f"{prefix}-{kind}-{n}" for kind in kinds for n in range(count)}


def _bus(url: str) -> EventBus:
    return EventBus(retrybus.open_store(url), default_policy=FixedDelay(max_retries=3, delay=0))


async def publish(
    url: str,
    handler: str,
    prefix: str,
    count: int,
    kinds: Iterable[str] = KINDS,
    *,
    redrive: bool = False,
) -> None:
    """Publish ``count`` events of each of ``kinds`` for ``handler`` (see the module)."""
    bus = _bus(url)

    async def failing(event: Event) -> None:
        if event.data["kind"] == "dead":
            raise PermanentError(f"no such thing as {event.id}")
        raise RuntimeError("the dependency is down")

    bus.subscribe("*", failing, name=handler)
    try:
        for kind in kinds:
            for n in range(count):
                event = Event(
                    "rolling.job",
                    {"kind": kind, "n": n},
                    id=f"{prefix}-{kind}-{n}",
                    source="rolling",
                )
                if kind == "pending":
                    await bus.publish(event, defer=True)
                elif kind == "scheduled":
                    await bus.publish(event, deliver_in=SCHEDULE)
                else:
                    await bus.publish(event)
        if redrive:
            await bus.redrives.start(action="requeue", actor="rolling")
        print(json.dumps({"schema_version": await bus.store.schema_version()}), flush=True)
    finally:
        await bus.close()


async def work(url: str, handler: str, record: str, stop: asyncio.Event) -> None:
    """Work on ``handler``'s deliveries, recording each event handled, until ``stop``."""
    bus = _bus(url)
    written = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def succeeding(event: Event) -> None:
        os.write(written, f"{event.id}\n".encode())

    bus.subscribe("*", succeeding, name=handler)
    worker = RetryWorker(bus, check_interval=0.05, batch_size=20, lease=30.0)
    try:
        await bus.store.connect()
        await worker.start()
        try:
            await stop.wait()
        finally:
            await worker.stop()
    finally:
        await bus.close()
        os.close(written)


async def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["publish", "work"])
    parser.add_argument("url")
    parser.add_argument("--handler", required=True)
    parser.add_argument("--prefix", default="e")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--redrive", action="store_true")
    parser.add_argument("--record", default=os.devnull)
    args = parser.parse_args(argv)
    try:
        if args.command == "publish":
            kinds = [kind for kind in args.kinds.split(",") if kind]
            await publish(
                args.url, args.handler, args.prefix, args.count, kinds, redrive=args.redrive
            )
        else:
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await work(args.url, args.handler, args.record, stop)
    except StoreUnusable as exc:
        print(f"StoreUnusable: {exc}", file=sys.stderr, flush=True)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main(sys.argv[1:])))
