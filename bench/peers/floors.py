"""The floors: each broker's raw client alone, the least any system on it can do.

  floor_<broker>_publish_p50          one confirmed publish, awaited, one after another
                                      (WARMUP untimed, then PUBLISHES timed)
  floor_<broker>_consume_throughput   EVENTS published beforehand, then received and
                                      acked by one client, 16 at a time, from the
                                      first receive to the last ack

Redis: XADD; XREADGROUP COUNT 16 and one XACK of the 16 ids (redis-py asyncio).
RabbitMQ: a persistent message to a durable queue on a channel with publisher
confirms, awaited; consume with prefetch 16 and ``message.ack()`` each (aio-pika).
NATS: ``js.publish`` awaiting the stream's ack; a durable pull consumer,
``fetch(16)`` and ``msg.ack()`` each (nats-py).

Every name lives under the namespace it is given; the caller removes it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

WARMUP = 100
BATCH = 16
BODY = b'{"n": 0, "pad": "floor"}'


def _p50_ms(samples: list[int]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, (len(ordered) + 1) // 2 - 1)] / 1e6


async def redis_floor(url: str, ns: str, publishes: int, events: int) -> dict[str, float]:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        stream = f"{ns}-pub"
        clock = time.perf_counter_ns
        samples = []
        for _ in range(WARMUP + publishes):
            start = clock()
            await client.xadd(stream, {"body": BODY})
            samples.append(clock() - start)
        stream = f"{ns}-consume"
        await client.xgroup_create(stream, "floor", id="0", mkstream=True)
        for low in range(0, events, 500):
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(min(500, events - low)):
                    pipe.xadd(stream, {"body": BODY})
                await pipe.execute()
        done = 0
        start_s = time.monotonic()
        while done < events:
            reply = await client.xreadgroup("floor", "c1", {stream: ">"}, count=BATCH, block=1000)
            if not reply:
                raise RuntimeError(f"redis floor: stream ran dry after {done} of {events}")
            ids = [entry_id for entry_id, _ in reply[0][1]]
            await client.xack(stream, "floor", *ids)
            done += len(ids)
        seconds = time.monotonic() - start_s
    finally:
        await client.aclose()
    return {"publish_p50": _p50_ms(samples[WARMUP:]), "consume_throughput": events / seconds}


async def rabbitmq_floor(url: str, ns: str, publishes: int, events: int) -> dict[str, float]:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"{ns}-floor", durable=True)
        exchange = channel.default_exchange
        clock = time.perf_counter_ns
        samples = []

        def message() -> aio_pika.Message:
            return aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        for _ in range(WARMUP + publishes):
            start = clock()
            await exchange.publish(message(), routing_key=queue.name)
            samples.append(clock() - start)
        await queue.purge()
        for low in range(0, events, 256):
            await asyncio.gather(
                *(
                    exchange.publish(message(), routing_key=queue.name)
                    for _ in range(min(256, events - low))
                )
            )
        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=BATCH)
        consumer_queue = await consumer_channel.get_queue(queue.name)
        finished = asyncio.get_running_loop().create_future()
        count = 0

        async def on_message(incoming: Any) -> None:
            nonlocal count
            await incoming.ack()
            count += 1
            if count == events and not finished.done():
                finished.set_result(time.monotonic())

        start_s = time.monotonic()
        tag = await consumer_queue.consume(on_message)
        end_s = await asyncio.wait_for(finished, timeout=300)
        await consumer_queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return {
        "publish_p50": _p50_ms(samples[WARMUP:]),
        "consume_throughput": events / (end_s - start_s),
    }


async def nats_floor(url: str, ns: str, publishes: int, events: int) -> dict[str, float]:
    import nats

    stream = ns.upper().replace("-", "_")
    subject = ns.replace("-", "_") + ".floor"
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        try:
            clock = time.perf_counter_ns
            samples = []
            for _ in range(WARMUP + publishes):
                start = clock()
                await js.publish(subject, BODY)
                samples.append(clock() - start)
            await js.purge_stream(stream)
            for low in range(0, events, 256):
                await asyncio.gather(
                    *(js.publish(subject, BODY) for _ in range(min(256, events - low)))
                )
            subscription = await js.pull_subscribe(subject, durable="floor", stream=stream)
            done = 0
            start_s = time.monotonic()
            while done < events:
                messages = await subscription.fetch(BATCH, timeout=5)
                for msg in messages:
                    await msg.ack()
                done += len(messages)
            await client.flush()
            seconds = time.monotonic() - start_s
        finally:
            await js.delete_stream(stream)
    finally:
        await client.close()
    return {"publish_p50": _p50_ms(samples[WARMUP:]), "consume_throughput": events / seconds}


FLOORS = {"redis": redis_floor, "rabbitmq": rabbitmq_floor, "nats": nats_floor}
