"""A worker process of the outage runs (tests/outage_run.py), configured by one
JSON object so that a scenario is a few lines:

    python tests/apps/outage_worker.py '{"store": URL, "service": ..., ...}'

Keys (``WorkerConfig`` in tests/outage_run.py writes them): ``store``, ``service``,
``handler`` and ``event_type`` (the one subscription), ``record`` (file the calls
are appended to), ``dependency`` (a file: while it exists the dependency is down
and the handler raises ``ConnectionError``), ``ready`` (a file created once the
worker runs), ``name``, ``policy`` (``ExponentialBackoff`` keyword arguments),
``breaker`` (``CircuitBreaker`` keyword arguments, or null for none), ``worker``
(``RetryWorker`` keyword arguments; ``retry_budget``: ``RetryBudget`` keyword
arguments) and ``handler_sleep`` (seconds per call).

Every call appends one line to ``record`` once it returns (one ``os.write``):

    <event_id> <pid> <start_ns> <end_ns> <ok|fail> <state>

``state`` is the handler's breaker as this process knew it when the call
started (``closed``, ``half_open``, ``open``, ``isolated``; ``none`` without a
breaker): a call made while the process still thought it closed, after another
process had opened it, says ``closed``.

The breakers' transitions are logged (logger ``retrybus.breakers`` at INFO) to
stderr with the rest. SIGTERM stops the worker gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import retrybus
from retrybus import (
    CircuitBreaker,
    Event,
    EventBus,
    ExponentialBackoff,
    RetryBudget,
    RetryWorker,
)


def make_bus(config: dict[str, Any], record: int) -> EventBus:
    """The service's bus with its one handler, which calls the "dependency"."""
    bus = EventBus(
        retrybus.open_store(config["store"]),
        service=config["service"],
        default_policy=ExponentialBackoff(**config["policy"]),
    )
    handler = config["handler"]
    dependency = Path(config["dependency"])

    def dependency_down() -> bool:  # one stat: cheaper than any await
        return dependency.exists()

    pause = float(config["handler_sleep"])
    breaker = None if config["breaker"] is None else CircuitBreaker(**config["breaker"])
    pid = os.getpid()

    async def save(event: Event) -> None:
        shared = bus.breakers.of(handler)
        state = "none" if shared is None else shared.state()
        start = time.time_ns()
        outcome = "fail"
        try:
            await asyncio.sleep(pause)
            if dependency_down():
                raise ConnectionError("the dependency is down")
            outcome = "ok"
        finally:
            line = f"{event.id} {pid} {start} {time.time_ns()} {outcome} {state}\n"
            os.write(record, line.encode())

    bus.subscribe(config["event_type"], save, name=handler, breaker=breaker)
    return bus


async def main(config: dict[str, Any]) -> int:
    record = os.open(config["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bus = make_bus(config, record)
    try:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        options = dict(config["worker"])
        if options.get("retry_budget") is not None:
            options["retry_budget"] = RetryBudget(**options["retry_budget"])
        async with bus, RetryWorker(bus, name=config["name"], **options):
            Path(config["ready"]).write_bytes(b"")  # noqa: ASYNC240 (once, an empty file)
            with contextlib.suppress(asyncio.CancelledError):
                await stopping.wait()
        return 0
    finally:
        os.close(record)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("retrybus.breakers").setLevel(logging.INFO)
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
