"""What only the Redis Streams transport has: trimming, XAUTOCLAIM takeovers and
their delivery counts, extensions through XCLAIM, recovery from a stream or group
that vanished, the persistence warning, and a down server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from engines.redis import REDIS_URL
from retrybus import Event
from retrybus._errors import TransportUnavailable
from retrybus._stores.redis.store import KEY_NAMES
from retrybus._transports import open_transport
from retrybus._transports.base import Inbound, Receiver, TransportSettings
from retrybus._transports.redis import RedisTransport
from transports.redis import PrivateRedisBroker, open_test_transport

SETTINGS = TransportSettings(lease=30.0, max_claims=3, prefetch=16)
HALF_SECOND = TransportSettings(lease=0.5, max_claims=3, prefetch=16)
ONE_SECOND = TransportSettings(lease=1.0, max_claims=3, prefetch=16)


@pytest.fixture
async def transport() -> AsyncIterator[RedisTransport]:
    async with open_test_transport() as opened:
        yield opened


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def receive_all(receiver: Receiver, count: int, within: float = 10.0) -> list[Inbound]:
    got: list[Inbound] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += await receiver.receive(count - len(got), 0.5)
    return got


def ids(messages: list[Inbound]) -> set[str]:
    return {m.event.id for m in messages if m.event is not None}


async def pending(raw: aioredis.Redis, key: str, group: str) -> list[dict[str, Any]]:
    return list(await raw.xpending_range(key, group, "-", "+", 1000))


def test_the_default_stream_prefix_is_apart_from_the_stores_keys() -> None:
    transport = open_transport("redis://127.0.0.1:6379/0")
    assert isinstance(transport, RedisTransport)
    assert transport.stream == "retrybus-bus"
    transport_keys = [transport.stream_key("like"), transport._groups_key]
    store_keys = [f"retrybus:{name}" for name in KEY_NAMES] + ["retrybus:changes"]
    assert not any(key.startswith("retrybus:") for key in transport_keys)
    assert not set(transport_keys) & set(store_keys)


async def test_receipts_name_the_word_and_the_entry(transport: RedisTransport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    receipts = await transport.send([Event("like.added", 1), Event("order.placed", 2)])
    assert receipts[1] is None
    assert receipts[0] is not None
    assert receipts[0].startswith("like/")
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    got = await receive_all(receiver, 1)
    assert [m.receipt for m in got] == [receipts[0]]
    await receiver.ack(got)
    await receiver.close()


async def test_a_receive_over_several_streams_keeps_to_its_limit(
    transport: RedisTransport,
) -> None:
    await transport.declare("audit", ["*"], SETTINGS)
    sent = [Event(f"{word}.happened", n) for word in ("like", "post", "order") for n in range(7)]
    await transport.send(sent)
    receiver = await transport.receiver("audit", "w1", SETTINGS)
    got: list[Inbound] = []
    deadline = time.monotonic() + 10
    while len(got) < len(sent) and time.monotonic() < deadline:
        batch = await receiver.receive(5, 0.5)
        assert len(batch) <= 5  # XREADGROUP's COUNT is per stream
        got += batch
    assert sorted(m.receipt for m in got) == sorted({m.receipt for m in got})
    assert ids(got) == {e.id for e in sent}
    await receiver.ack(got)
    assert await transport.lag("audit") == 0
    await receiver.close()


async def test_trimming_never_drops_an_entry_a_group_has_not_acked(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    key = transport.stream_key("like")
    for service in ("billing", "search", "audit"):
        await transport.declare(service, ["like.*"], SETTINGS)
    sent = [Event("like.added", n) for n in range(20)]
    await transport.send(sent)
    billing = await transport.receiver("billing", "b1", SETTINGS)
    held = await receive_all(billing, 10)
    await billing.ack(held[:5])
    search = await transport.receiver("search", "s1", SETTINGS)
    await search.ack(await receive_all(search, 20))
    # audit has read nothing: every entry is still its
    assert await transport.trim() == 0
    assert await raw.xlen(key) == 20
    await transport.forget("audit")
    # billing still holds 5 and has 10 unread: only the 5 it acked go
    assert await transport.trim() == 5
    assert await raw.xlen(key) == 15
    await billing.close()
    taker = await transport.receiver("billing", "b2", HALF_SECOND)
    await asyncio.sleep(0.6)
    rest = await receive_all(taker, 15)
    assert ids(rest) == {e.id for e in sent[5:]}
    assert sorted(m.deliveries for m in rest) == [1] * 10 + [2] * 5
    assert all(m.problem is None for m in rest)
    await taker.ack(rest)
    await transport.trim()
    assert await raw.xlen(key) == 1  # MINID keeps the last delivered entry
    assert await transport.lag("billing") == 0
    await taker.close()
    await search.close()


async def test_idle_entries_are_taken_over_with_their_delivery_counts(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    key = transport.stream_key("like")
    await transport.declare("billing", ["like.*"], HALF_SECOND)
    await transport.send([Event("like.added", n) for n in range(3)])
    receivers = [await transport.receiver("billing", f"w{n}", HALF_SECOND) for n in (1, 2, 3)]
    first = await receive_all(receivers[0], 3)
    assert [m.deliveries for m in first] == [1, 1, 1]
    rounds = [first]
    for number, receiver in enumerate(receivers[1:], start=2):
        await asyncio.sleep(0.6)
        taken = await receive_all(receiver, 3, within=3)
        assert [m.deliveries for m in taken] == [number] * 3
        assert ids(taken) == ids(first)
        entries = await pending(raw, key, "billing")
        assert {e["consumer"] for e in entries} == {f"w{number}"}
        assert {e["times_delivered"] for e in entries} == {number}
        rounds.append(taken)
    # acks of those taken over are too late: the entries stay with w3
    await receivers[0].ack(rounds[0])
    await receivers[1].ack(rounds[1])
    assert len(await pending(raw, key, "billing")) == 3
    await receivers[2].ack(rounds[2])
    assert await pending(raw, key, "billing") == []
    assert await transport.lag("billing") == 0
    for receiver in receivers:
        await receiver.close()


async def test_extend_keeps_a_running_handlers_entries_from_going_idle(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    key = transport.stream_key("like")
    await transport.declare("billing", ["like.*"], ONE_SECOND)
    await transport.send([Event("like.added", n) for n in range(2)])
    holder = await transport.receiver("billing", "w1", ONE_SECOND)
    other = await transport.receiver("billing", "w2", ONE_SECOND)
    held = await receive_all(holder, 2)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        await holder.extend(held)
        entries = await pending(raw, key, "billing")
        assert {e["consumer"] for e in entries} == {"w1"}
        assert max(e["time_since_delivered"] for e in entries) < 500
        assert await other.receive(10, 0.3) == []
    # extensions count no delivery: once they stop, the next one is the second
    await asyncio.sleep(1.1)
    taken = await receive_all(other, 2, within=3)
    assert [m.deliveries for m in taken] == [2, 2]
    await other.ack(taken)
    await holder.close()
    await other.close()


async def test_a_closed_receivers_entries_go_to_the_next_claim_at_once(
    transport: RedisTransport,
) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.send([Event("like.added", n) for n in range(3)])
    first = await transport.receiver("billing", "w1", SETTINGS)
    held = await receive_all(first, 3)
    await first.close()
    second = await transport.receiver("billing", "w2", SETTINGS)  # a 30 s lease
    started = time.monotonic()
    again = await receive_all(second, 3, within=2)
    assert time.monotonic() - started < 1.0
    assert ids(again) == ids(held)
    assert [m.deliveries for m in again] == [2, 2, 2]
    await second.ack(again)
    await second.close()


async def test_a_receiver_recovers_when_its_stream_vanishes(
    transport: RedisTransport, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    key = transport.stream_key("like")
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.declare("search", ["like.*"], SETTINGS)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    await transport.send([Event("like.added", "before")])
    await receiver.ack(await receive_all(receiver, 1))
    await raw.delete(key)
    with caplog.at_level(logging.ERROR, logger="retrybus.transport.redis"):
        assert await receiver.receive(10, 0.3) == []
        await transport.send([Event("like.added", "after")])
        got = await receive_all(receiver, 1)
        await raw.xgroup_destroy(key, "billing")
        await transport.send([Event("like.added", "lost")])  # search's only
        assert await receiver.receive(10, 0.3) == []
        await transport.send([Event("like.added", "again")])
        got += await receive_all(receiver, 1)
    assert [m.event.data for m in got if m.event is not None] == ["after", "again"]
    await receiver.ack(got)
    # the other service's group came back with it, and logged once
    groups = {g["name"] for g in await raw.xinfo_groups(key)}
    assert groups == {"billing", "search"}
    lost = [r for r in caplog.records if "lost its data" in r.getMessage()]
    assert len(lost) == 1
    await receiver.close()


async def test_a_receiver_declares_again_after_the_server_lost_everything(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    assert await receiver.receive(10, 0.1) == []
    keys = [k async for k in raw.scan_iter(match=f"{transport.stream}:*")]
    await raw.delete(*keys)  # what a restart without persistence does
    assert await transport.send([Event("like.added", "unheard")]) == [None]
    got: list[Inbound] = []
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        assert await receiver.receive(10, 0.3) == []
        await transport.send([Event("like.added", "heard")])
        got = await receive_all(receiver, 1, within=1)
    assert [m.event.data for m in got if m.event is not None] == ["heard"]
    await receiver.ack(got)
    await receiver.close()


async def test_a_forgotten_service_is_not_brought_back(transport: RedisTransport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    await transport.forget("billing")
    await asyncio.sleep(1.1)  # the receiver re-reads its service every second
    with pytest.raises(LookupError, match="forgotten"):
        await receiver.receive(10, 0.3)
    assert await transport.send([Event("like.added", 1)]) == [None]
    await receiver.close()
    with pytest.raises(LookupError, match="not declared"):
        await transport.receiver("billing", "w2", SETTINGS)


async def test_narrower_patterns_remove_the_groups_no_pattern_covers(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    await transport.declare("billing", ["like.*", "post.*"], SETTINGS)
    await transport.declare("billing", ["like.*"], SETTINGS)
    assert await raw.exists(transport.stream_key("post")) == 0
    assert await transport.send([Event("post.created", 1)]) == [None]
    report = await transport.check()
    (billing,) = report.services
    assert billing.problems == []
    assert billing.holders == [f"group billing on {transport.stream_key('like')} (like)"]


async def test_check_warns_when_redis_keeps_no_append_only_file(
    transport: RedisTransport,
) -> None:
    report = await transport.check()
    assert any("append-only" in warning for warning in report.warnings), report.warnings
    with PrivateRedisBroker() as broker:
        persistent = open_transport(broker.url)
        try:
            assert (await persistent.check()).warnings == []
        finally:
            await persistent.close()


async def test_a_tests_unread_entries_are_deleted_after_it(raw: aioredis.Redis) -> None:
    async with open_test_transport() as opened:
        await opened.declare("billing", ["like.*", "post.*"], SETTINGS)
        await opened.send([Event("like.added", n) for n in range(5)])
        stream = opened.stream
        assert [k async for k in raw.scan_iter(match=f"{stream}:*")]
    assert [k async for k in raw.scan_iter(match=f"{stream}:*")] == []


async def test_a_receive_while_redis_is_down_raises_promptly_and_then_resumes() -> None:
    with PrivateRedisBroker() as broker:
        transport = open_transport(broker.url)
        try:
            await transport.declare("billing", ["like.*"], SETTINGS)
            receiver = await transport.receiver("billing", "w1", SETTINGS)
            waiting = asyncio.create_task(receiver.receive(10, 5.0))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await asyncio.to_thread(broker.stop)
            with pytest.raises(TransportUnavailable, match="unavailable"):
                await waiting
            with pytest.raises(TransportUnavailable):
                await receiver.receive(10, 5.0)
            assert time.monotonic() - started < 3.0
            with pytest.raises(TransportUnavailable):
                await transport.send([Event("like.added", "down")])
            await asyncio.to_thread(broker.start)
            await transport.send([Event("like.added", "up")])
            got = await receive_all(receiver, 1)
            assert [m.event.data for m in got if m.event is not None] == ["up"]
            await receiver.ack(got)
            await receiver.close()
        finally:
            await transport.close()
