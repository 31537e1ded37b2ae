"""What every system's app shares: its settings (from the environment the
orchestrator sets) and the publisher's three modes.

Environment (set by bench/peers/run.py for each phase):
  PEERS_BROKER  redis | rabbitmq | nats
  PEERS_NS      this phase's namespace (queue, stream, key prefix); fresh per phase
  PEERS_KIND    plain | failonce | latency: which handler the consumer runs
  PEERS_REDIS   redis://127.0.0.1:6379/0
  PEERS_AMQP    amqp://guest:guest@127.0.0.1:5672/<the run's vhost>
  PEERS_NATS    nats://127.0.0.1:4222
  PEERS_PROBE / PEERS_TARGET   the consumer's probe file and hit count (_probe.py)

A publisher runs as ``python systems/<system>_app.py MODE COUNT`` and prints one
JSON object on stdout:
  timed COUNT   COUNT sequential awaited publishes (after 100 untimed ones that
                open connections): {"samples_ns": [...]}
  bulk COUNT    COUNT publishes as fast as the client allows (not timed): {"seconds": s}
  paced COUNT   COUNT publishes one every 2 ms, each carrying ``t``, its
                time.time_ns() at publish: {"seconds": s}
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PEERS = Path(__file__).resolve().parent.parent
if str(PEERS) not in sys.path:
    sys.path.insert(0, str(PEERS))

BROKER = os.environ.get("PEERS_BROKER", "redis")
NS = os.environ.get("PEERS_NS", "rbpeers-dev")
KIND = os.environ.get("PEERS_KIND", "plain")
REDIS_URL = os.environ.get("PEERS_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("PEERS_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
NATS_URL = os.environ.get("PEERS_NATS", "nats://127.0.0.1:4222")

WARMUP = 100
PACE_S = 0.002
BULK_WINDOW = 64  # publishes in flight at once while pre-publishing (async clients)
BULK_THREADS = 8  # threads publishing at once while pre-publishing (sync clients)


def nats_names(ns: str = NS) -> tuple[str, str]:
    """(stream, subject) of a namespace: stream names take no dots."""
    stream = ns.upper().replace("-", "_").replace(".", "_")
    return stream, ns.replace("-", "_") + ".events"


def payload(n: int, mode: str) -> dict[str, Any]:
    if mode == "paced":
        return {"n": n, "t": time.time_ns()}
    return {"n": n}


def run_publisher(
    send: Callable[[int, dict[str, Any]], Any],
    *,
    setup: Callable[[], Any] | None = None,
    close: Callable[[], Any] | None = None,
    argv: list[str] | None = None,
) -> None:
    """Run one publisher mode with ``send(n, data)`` (plain or async) and print its result."""
    args = sys.argv[1:] if argv is None else argv
    mode, count = args[0], int(args[1])
    if inspect.iscoroutinefunction(send):
        result = asyncio.run(_run_async(send, setup, close, mode, count))
    else:
        result = _run_sync(send, setup, close, mode, count)
    print(json.dumps(result), flush=True)


async def _maybe(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def _run_async(
    send: Callable[[int, dict[str, Any]], Awaitable[Any]],
    setup: Callable[[], Any] | None,
    close: Callable[[], Any] | None,
    mode: str,
    count: int,
) -> dict[str, Any]:
    if setup is not None:
        await _maybe(setup())
    try:
        clock = time.perf_counter_ns
        if mode == "timed":
            for n in range(WARMUP):
                await send(-1 - n, payload(n, mode))
            samples = []
            for n in range(count):
                data = payload(n, mode)
                start = clock()
                await send(n, data)
                samples.append(clock() - start)
            return {"samples_ns": samples}
        start = time.monotonic()
        if mode == "bulk":
            for low in range(0, count, BULK_WINDOW):
                await asyncio.gather(
                    *(send(n, payload(n, mode)) for n in range(low, min(count, low + BULK_WINDOW)))
                )
        elif mode == "paced":
            for n in range(count):
                delay = start + n * PACE_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send(n, payload(n, mode))
        else:
            raise SystemExit(f"unknown publisher mode {mode!r}")
        return {"seconds": time.monotonic() - start}
    finally:
        if close is not None:
            await _maybe(close())


def _run_sync(
    send: Callable[[int, dict[str, Any]], Any],
    setup: Callable[[], Any] | None,
    close: Callable[[], Any] | None,
    mode: str,
    count: int,
) -> dict[str, Any]:
    if setup is not None:
        setup()
    try:
        clock = time.perf_counter_ns
        if mode == "timed":
            for n in range(WARMUP):
                send(-1 - n, payload(n, mode))
            samples = []
            for n in range(count):
                data = payload(n, mode)
                start = clock()
                send(n, data)
                samples.append(clock() - start)
            return {"samples_ns": samples}
        start = time.monotonic()
        if mode == "bulk":
            with ThreadPoolExecutor(BULK_THREADS) as pool:
                for _ in pool.map(lambda n: send(n, payload(n, mode)), range(count)):
                    pass
        elif mode == "paced":
            for n in range(count):
                delay = start + n * PACE_S - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                send(n, payload(n, mode))
        else:
            raise SystemExit(f"unknown publisher mode {mode!r}")
        return {"seconds": time.monotonic() - start}
    finally:
        if close is not None:
            close()


class FailOnce(RuntimeError):
    """The fail-once phase's first call of each event."""


def handle(data: dict[str, Any]) -> None:
    """The handler's body in every system: fail the first call in the fail-once
    phase, note the latency of events that carry their publish time, count the hit."""
    import _probe

    _probe.call()
    if KIND == "failonce" and _probe.first(data["n"]):
        raise FailOnce(f"first call of event {data['n']}")
    sent = data.get("t")
    if sent is not None:
        _probe.lap(sent)
    _probe.hit()
