"""retrybus with a transport: the phase's stream (Redis), exchange (RabbitMQ,
in the run's vhost) or JetStream stream (NATS) carries first deliveries;
retries go to the store: the retrybus Redis store on the same Redis for the
Redis column, an SQLite file for RabbitMQ and NATS (PEERS_STORE names it).

Consumer: ``python retrybus_app.py consume``: ``RetryWorker(bus, concurrency=16)``,
what ``retrybus worker`` runs, started here so that READY is exact (after
``worker.start()``). Publisher: ``python retrybus_app.py MODE COUNT``
(``await bus.publish(event)``, which returns once the broker confirmed it).
Before anything is published the service's holder is declared on the broker
(what the worker declares when it starts), so that events published before
the consumer runs are kept for it. Fail-once: ``FixedDelay(delay=0, max_retries=1)``.

``python retrybus_app.py retryadd COUNT``: ``bus.retry_queue.add`` on the
store, timed one at a time as bench/latency.py does on SQLite.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import time
from typing import Any

from _common import AMQP_URL, BROKER, KIND, NATS_URL, NS, REDIS_URL, handle, nats_names

from retrybus import Event, EventBus, FixedDelay, RetryWorker, open_store, open_transport

SERVICE = "peers"
EVENT_TYPE = "peers.event"
TRANSPORT_MODULES = {"redis": "redis", "rabbitmq": "rabbitmq", "nats": "nats"}


def transport_missing(broker: str = BROKER) -> str | None:
    """Why retrybus cannot run on ``broker`` in this checkout (None: it can)."""
    module = f"retrybus._transports.{TRANSPORT_MODULES.get(broker, broker)}"
    if importlib.util.find_spec(module) is None:
        return f"transport not available in this checkout ({module} is missing)"
    return None


def transport_url() -> str:
    if BROKER == "redis":
        return f"{REDIS_URL}?stream={NS}"
    if BROKER == "rabbitmq":
        return f"{AMQP_URL}?exchange={NS}"
    if BROKER == "nats":
        return f"{NATS_URL}?stream={nats_names()[0]}"
    raise SystemExit(f"no retrybus transport for {BROKER}")


def store_url() -> str:
    if BROKER == "redis":
        return f"{REDIS_URL}?prefix={NS}"
    return os.environ.get("PEERS_STORE") or f"sqlite:////tmp/{NS}.db"


def _quiet() -> None:
    import logging

    logging.getLogger("retrybus").addHandler(logging.NullHandler())
    logging.getLogger("retrybus").propagate = False


async def _handler(event: Event) -> None:
    handle(event.data)


def consumer_bus() -> EventBus:
    bus = EventBus(
        open_store(store_url()), service=SERVICE, transport=open_transport(transport_url())
    )
    policy = FixedDelay(delay=0, max_retries=1) if KIND == "failonce" else None
    bus.subscribe(EVENT_TYPE, _handler, name="handle", policy=policy)
    return bus


async def consume() -> None:
    import _probe

    bus = consumer_bus()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    worker = RetryWorker(bus, concurrency=16)
    await worker.start()
    _probe.ready()
    await stop.wait()
    try:
        await worker.stop(timeout=2.0)
    finally:
        await bus.close()


async def declare(bus: EventBus) -> None:
    """What holds the consumer's messages, as its worker declares it on start."""
    from retrybus._transports.base import TransportSettings

    transport = bus.transport
    assert transport is not None
    await transport.declare(SERVICE, [EVENT_TYPE], TransportSettings(lease=60.0, prefetch=16))


def publish(mode: str, count: int) -> None:
    from _common import run_publisher

    bus = EventBus(
        open_store(store_url()), service="peers-pub", transport=open_transport(transport_url())
    )

    async def setup() -> None:
        await bus.store.connect()
        await declare(bus)

    async def send(n: int, data: dict[str, Any]) -> None:
        result = await bus.publish(Event(EVENT_TYPE, data, source="/peers"))
        if result.receipt is None:
            raise SystemExit(f"the broker kept nothing of event {n}: no service declared for it")

    run_publisher(send, setup=setup, close=bus.close, argv=[mode, str(count)])


def caught_error() -> Exception:
    try:
        raise ConnectionError("downstream unavailable: connection refused")
    except ConnectionError as exc:
        return exc


async def retry_adds(count: int, warmup: int = 200) -> dict[str, Any]:
    bus = EventBus(open_store(store_url()))
    await bus.store.connect()
    try:
        error = caught_error()
        events = [Event("peers.failed", {"n": n}, source="/peers") for n in range(warmup + count)]
        add = bus.retry_queue.add
        clock = time.perf_counter_ns
        samples = []
        for event in events:
            start = clock()
            await add(event, "peers.handle", error)
            samples.append(clock() - start)
        return {"samples_ns": samples[warmup:]}
    finally:
        await bus.close()


def main() -> int:
    _quiet()
    mode = sys.argv[1]
    if mode != "retryadd":
        missing = transport_missing()
        if missing:
            print(missing, file=sys.stderr)
            return 3
    if mode == "consume":
        asyncio.run(consume())
    elif mode == "retryadd":
        print(json.dumps(asyncio.run(retry_adds(int(sys.argv[2])))), flush=True)
    else:
        publish(mode, int(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
