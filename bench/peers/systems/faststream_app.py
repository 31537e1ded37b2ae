"""FastStream on Redis Streams (a consumer group, read from the start), RabbitMQ
(a durable queue, channel prefetch 16, persistent messages, publisher confirms:
FastStream's default) or NATS JetStream (a durable pull consumer,
``max_workers=16``).

Consumer: ``faststream run faststream_app:app`` (READY from ``@app.after_startup``).
Publisher: ``python faststream_app.py MODE COUNT`` (``broker.publish(...,
stream=/queue=/subject=)``, each awaited: XADD, a confirmed publish, a
JetStream publish awaiting its ack). Fail-once: ``NackMessage()`` (RabbitMQ
requeues, NATS naks); on Redis Streams FastStream redelivers nothing without a
claimer, so the orchestrator prints n/a there.

Concurrency 16: ``max_workers=16`` on NATS; RabbitMQ subscribers take no
``max_workers`` in 0.7 (aio-pika runs each delivery of the channel's 16 in a
task of its own); a Redis stream subscriber takes neither: one message at a time.
"""

from __future__ import annotations

from typing import Any

from _common import (
    AMQP_URL,
    BROKER,
    NATS_URL,
    NS,
    REDIS_URL,
    FailOnce,
    handle,
    nats_names,
    run_publisher,
)
from faststream import FastStream
from faststream.exceptions import NackMessage

GROUP = "peers"


def _body(data: dict[str, Any]) -> None:
    try:
        handle(data)
    except FailOnce:
        raise NackMessage() from None


if BROKER == "redis":
    from faststream.redis import RedisBroker, StreamSub

    broker: Any = RedisBroker(REDIS_URL)

    @broker.subscriber(stream=StreamSub(NS, group=GROUP, consumer="c1"))
    async def on_event(data: dict[str, Any]) -> None:
        _body(data)

    async def prepare() -> None:
        """The group exists before anything is published, reading from the start."""
        from redis.asyncio import Redis
        from redis.exceptions import ResponseError

        client = Redis.from_url(REDIS_URL)
        try:
            await client.xgroup_create(NS, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        finally:
            await client.aclose()

    async def send(n: int, data: dict[str, Any]) -> None:
        await broker.publish(data, stream=NS)

elif BROKER == "rabbitmq":
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(AMQP_URL)
    QUEUE = RabbitQueue(NS, durable=True)

    @broker.subscriber(QUEUE, channel=Channel(prefetch_count=16))
    async def on_event(data: dict[str, Any]) -> None:
        _body(data)

    async def prepare() -> None:
        await broker.declare_queue(QUEUE)

    async def send(n: int, data: dict[str, Any]) -> None:
        await broker.publish(data, queue=NS, persist=True)

elif BROKER == "nats":
    from faststream.nats import JStream, NatsBroker

    STREAM, SUBJECT = nats_names()
    broker = NatsBroker(NATS_URL)
    JSTREAM = JStream(STREAM, subjects=[SUBJECT])

    @broker.subscriber(SUBJECT, stream=JSTREAM, durable=GROUP, pull_sub=True, max_workers=16)
    async def on_event(data: dict[str, Any]) -> None:
        _body(data)

    async def prepare() -> None:
        import nats

        client = await nats.connect(NATS_URL)
        try:
            js = client.jetstream()
            try:
                await js.stream_info(STREAM)
            except Exception:
                await js.add_stream(name=STREAM, subjects=[SUBJECT])
        finally:
            await client.close()

    async def send(n: int, data: dict[str, Any]) -> None:
        await broker.publish(data, subject=SUBJECT, stream=STREAM)

else:
    raise SystemExit(f"FastStream has no {BROKER} broker here")

app = FastStream(broker)


@app.after_startup
async def _ready() -> None:
    import _probe

    _probe.ready()


async def _setup() -> None:
    await broker.connect()
    await prepare()


if __name__ == "__main__":
    run_publisher(send, setup=_setup, close=broker.stop)
