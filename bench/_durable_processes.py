"""The other processes of bench/durable.py: the app its `retrybus worker`
processes serve, and the publishing process of its deferred run.

As an app (``retrybus worker _durable_processes:bus --app-dir bench``; its
service is ``RETRYBUS_BENCH_SERVICE``, default ``default``): one
async handler, ``bench.handle``, for ``bench.*`` events. An event's data is
``{"n": N}``, plus ``"sleep": S`` for a call that awaits ``asyncio.sleep(S)``
(a slow item); every other call returns at once. The handler writes marks on
stdout, one line each, times from ``time.monotonic()`` (CLOCK_MONOTONIC, which
every process of the machine shares):

  start N T              as each call starts, when RETRYBUS_BENCH_STARTS=1
  done COUNT T           when COUNT calls have returned, for each COUNT in
                         RETRYBUS_BENCH_MARKS (comma-separated, ascending)
  fast FAST COUNT T      when FAST calls without "sleep" have returned, for each
                         FAST in RETRYBUS_BENCH_FAST (likewise), and COUNT calls in all

As a script, the publishing process:

    python bench/_durable_processes.py publish --store URL --warmup 2000 --count 20000 --rounds 3

builds its events, says ``ready``, then for each line ``go`` read on stdin
publishes a round (``--warmup`` events, then ``--rounds`` rounds of ``--count``)
with ``publish(event, defer=True)`` from ``--concurrency`` tasks (with
``--service NAME``: durable publishes from a bus of that service, which has no
handlers, so that each only records the deliveries other services' stored
subscriptions route), and writes
``{"start": T, "end": T, "cpu": S}`` (monotonic: before the first publish,
after the last returned; the process's CPU time so far).

Nothing else is imported: the worker's peak RSS is retrybus's and Python's.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from retrybus import Event, EventBus, open_store

HANDLER = "bench.handle"
EVENT_TYPE = "bench.deferred"

#: the worker's --store replaces the store; RETRYBUS_BENCH_SERVICE names its service
bus = EventBus(open_store("memory://"), service=os.environ.get("RETRYBUS_BENCH_SERVICE", "default"))

_starts = os.environ.get("RETRYBUS_BENCH_STARTS") == "1"
_marks = [int(mark) for mark in os.environ.get("RETRYBUS_BENCH_MARKS", "").split(",") if mark]
_fast_marks = [int(mark) for mark in os.environ.get("RETRYBUS_BENCH_FAST", "").split(",") if mark]
_next_mark = _marks.pop(0) if _marks else 0
_next_fast = _fast_marks.pop(0) if _fast_marks else 0
_done = 0
_fast = 0


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@bus.handler("bench.*", name=HANDLER)
async def handle(event: Event) -> None:
    global _done, _fast, _next_mark, _next_fast
    data = event.data
    if _starts:
        _say(f"start {data['n']} {time.monotonic()}")
    pause = data.get("sleep")
    if pause:
        await asyncio.sleep(pause)
        _done += 1
    else:
        _done += 1
        _fast += 1
        if _fast == _next_fast:
            _say(f"fast {_fast} {_done} {time.monotonic()}")
            _next_fast = _fast_marks.pop(0) if _fast_marks else 0
    if _done == _next_mark:
        _say(f"done {_done} {time.monotonic()}")
        _next_mark = _marks.pop(0) if _marks else 0


# the publishing process ------------------------------------------------------


async def publish_all(
    publisher: EventBus,
    events: list[Event],
    concurrency: int,
    *,
    durable: bool | None = None,
    defer: bool = False,
) -> None:
    """Publish ``events`` from ``concurrency`` tasks, each taking its share in turn."""

    async def publish_share(share: list[Event]) -> None:
        for event in share:
            await publisher.publish(event, durable=durable, defer=defer)

    await asyncio.gather(*(publish_share(events[n::concurrency]) for n in range(concurrency)))


async def _publish_rounds(
    url: str, sizes: list[int], concurrency: int, service: str | None = None
) -> None:
    import json

    logging_quiet()
    if service is None:
        publisher, defer = bus, True
        publisher.use_store(open_store(url))
    else:  # a service with no handlers of its own: its publishes only route
        publisher, defer = EventBus(open_store(url), service=service), False
    await publisher.store.connect()
    try:
        numbers = iter(range(sum(sizes)))
        rounds_events = [
            [Event(EVENT_TYPE, {"n": next(numbers)}, source="bench") for _ in range(size)]
            for size in sizes
        ]
        _say("ready")
        for events in rounds_events:
            if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
                return
            start = time.monotonic()
            await publish_all(publisher, events, concurrency, defer=defer)
            end = time.monotonic()
            _say(json.dumps({"start": start, "end": end, "cpu": time.process_time()}))
    finally:
        await publisher.close()


def logging_quiet() -> None:
    import logging

    logging.getLogger("retrybus").addHandler(logging.NullHandler())
    logging.getLogger("retrybus").propagate = False


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["publish"])
    parser.add_argument("--store", required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--service",
        default=None,
        help="publish durably from a bus of this service, which has no handlers "
        "(default: publish(defer=True) from the app's bus)",
    )
    args = parser.parse_args()
    sizes = ([args.warmup] if args.warmup else []) + [args.count] * args.rounds
    asyncio.run(_publish_rounds(args.store, sizes, args.concurrency, args.service))


if __name__ == "__main__":
    main()
