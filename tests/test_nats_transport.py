"""What only the NATS JetStream transport has: MaxDeliver one above max_claims
and the captured max-deliveries advisories behind ``given_up``, ``Nats-Msg-Id``
deduplication, subject escaping, ``+WPI`` past ``ack_wait``, and a receiver
that rides out a restart of its (private) server."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from retrybus import Event
from retrybus._errors import TransportUnavailable
from retrybus._transports import open_transport
from retrybus._transports.base import Inbound, Receiver, TransportSettings
from retrybus._transports.nats import (
    NatsTransport,
    consumer_name,
    subject_token,
    type_of_subject,
)
from transports.nats import NATS_URL, open_test_transport

SETTINGS = TransportSettings(lease=30.0, max_claims=3, prefetch=16)
CAPPED = TransportSettings(lease=1.0, max_claims=1, prefetch=16)
ODD_TYPES = ["a b", "a\tb", "a*b", "a>b", "a..b", ".a", "a.", "100%", "x.>.*", "ünï cödé"]


async def stream_messages(stream: str) -> int:
    nc = await nats.connect(NATS_URL)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def receive_all(receiver: Receiver, count: int, within: float = 10.0) -> list[Inbound]:
    got: list[Inbound] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += await receiver.receive(count - len(got), 0.5)
    return got


async def test_a_message_past_max_deliver_is_given_up_with_its_payload() -> None:
    async with open_test_transport() as transport:
        await transport.declare("billing", ["like.*"], CAPPED)
        info = await transport._consumer_info(transport.stream, "billing")
        assert info is not None
        assert info.config.max_deliver == CAPPED.max_claims + 1
        event = Event("like.added", {"n": 1}, source="/social")
        [receipt] = await transport.send([event])
        receiver = await transport.receiver("billing", "w1", CAPPED)
        # delivered max_claims + 1 times and never acked (the consumer could not even record)
        first = await receive_all(receiver, 1)
        again = await receive_all(receiver, 1, within=5)
        assert [m.deliveries for m in first] == [1]
        assert [m.token.metadata.sequence.consumer for m in again] == [2]
        # nats-server 2.9.10 sometimes puts 1 in the reply subject of this redelivery
        # (seen with this transport, not reproduced with bare nats-py): see the report
        assert [m.deliveries for m in again] in ([2], [1])
        given: list[Inbound] = []
        deadline = time.monotonic() + 10
        while not given and time.monotonic() < deadline:
            assert await receiver.receive(10, 0.3) == []  # NATS delivers it no more
            given = await receiver.given_up(10)
        assert len(given) == 1
        [message] = given
        assert message.receipt == receipt
        assert message.deliveries == CAPPED.max_claims + 1
        assert message.event is not None
        assert message.event.to_dict() == event.to_dict()
        # the stream keeps every message for its max_age (limits retention)
        assert await stream_messages(transport.stream) == 1
        await receiver.ack(given)
        assert await transport.lag("billing") == 0
        assert await receiver.given_up(10) == []
        report = await transport.check()
        assert report.extra["given_up_waiting"] == {"billing": 0}
        await receiver.close()


async def test_a_given_up_message_stays_for_the_other_services() -> None:
    async with open_test_transport() as transport:
        await transport.declare("billing", ["like.*"], CAPPED)
        await transport.declare("search", ["like.*"], SETTINGS)
        await transport.send([Event("like.added", 1)])
        capped = await transport.receiver("billing", "w1", CAPPED)
        given: list[Inbound] = []
        deadline = time.monotonic() + 15
        while not given and time.monotonic() < deadline:
            await capped.receive(10, 0.3)  # never acked
            given = await capped.given_up(10)
        await capped.ack(given)
        assert await transport.lag("search") == 1  # search has not acked it
        other = await transport.receiver("search", "w2", SETTINGS)
        got = await receive_all(other, 1)
        assert [m.deliveries for m in got] == [1]
        await other.ack(got)
        assert await transport.lag("search") == 0
        assert await stream_messages(transport.stream) == 1  # kept for its max_age
        await capped.close()
        await other.close()


async def test_a_resent_event_is_stored_once() -> None:
    async with open_test_transport() as transport:
        await transport.declare("billing", ["like.*"], SETTINGS)
        event = Event("like.added", {"n": 1})
        first = await transport.send([event])
        again = await transport.send([event, event])
        assert first == again[:1] == again[1:]
        other = Event("like.added", {"n": 1})  # another id: another message
        assert await transport.send([other]) != first
        assert await stream_messages(transport.stream) == 2
        receiver = await transport.receiver("billing", "w1", SETTINGS)
        got = await receive_all(receiver, 3, within=2)
        assert sorted(m.event.id for m in got if m.event) == sorted([event.id, other.id])
        await receiver.ack(got)
        await receiver.close()


def test_subject_tokens_escape_what_nats_forbids_and_read_back() -> None:
    for event_type in [*ODD_TYPES, "like.added", "%41"]:
        token = subject_token(event_type)
        words = token.split(".")
        assert all(words), token
        assert not any(c in word for word in words for c in " \t*>"), token
        assert type_of_subject(token) == event_type
    assert subject_token("like.added") == "like.added"
    assert subject_token("a..b") == "a.%.b"
    assert consumer_name("billing.eu") == "billing~eu"


async def test_odd_types_travel_and_are_filtered_by_their_prefixes() -> None:
    async with open_test_transport() as transport:
        await transport.declare("all", ["*"], SETTINGS)
        await transport.declare("spaced", ["a b", "x.>.*"], SETTINGS)
        sent = [Event(event_type, n) for n, event_type in enumerate(ODD_TYPES)]
        await transport.send(sent)
        everything = await transport.receiver("all", "w1", SETTINGS)
        got = await receive_all(everything, len(sent))
        assert sorted(m.event.type for m in got if m.event) == sorted(ODD_TYPES)
        await everything.ack(got)
        spaced = await transport.receiver("spaced", "w2", SETTINGS)
        got = await receive_all(spaced, 3, within=2)
        assert sorted(m.event.type for m in got if m.event) == ["a b", "x.>.*"]
        await spaced.ack(got)
        assert await transport.lag("spaced") == 0
        await everything.close()
        await spaced.close()


async def test_in_progress_keeps_a_message_past_ack_wait() -> None:
    async with open_test_transport() as transport:
        await transport.declare("billing", ["like.*"], CAPPED)
        await transport.send([Event("like.added", 1)])
        receiver = await transport.receiver("billing", "w1", CAPPED)
        got = await receive_all(receiver, 1)
        deadline = time.monotonic() + CAPPED.lease * 4
        while time.monotonic() < deadline:
            await receiver.extend(got)
            assert await receiver.receive(10, CAPPED.lease / 4) == []
        info = await transport._consumer_info(transport.stream, "billing")
        assert info is not None
        assert (info.num_ack_pending, info.num_redelivered) == (1, 0)
        await receiver.ack(got)
        assert await transport.lag("billing") == 0
        assert await receiver.given_up(10) == []
        await receiver.close()


async def test_the_url_names_its_options_and_hides_its_password() -> None:
    transport = open_transport("nats://me:secret@127.0.0.1:4222?stream=ORDERS")
    assert isinstance(transport, NatsTransport)
    assert (transport.stream, transport.advisories) == ("ORDERS", "ORDERS_ADVISORIES")
    assert "secret" not in transport.url
    with pytest.raises(ValueError, match=r"unknown option\(s\) durable, x") as raised:
        open_transport("nats://me:secret@127.0.0.1:4222?x=1&durable=2")
    assert "secret" not in str(raised.value)


async def test_the_same_receiver_resumes_after_a_server_restart() -> None:
    from private_nats import PrivateNats

    with PrivateNats() as server:
        transport = open_transport(server.url)
        try:
            await transport.declare("billing", ["like.*"], SETTINGS)
            receiver = await transport.receiver("billing", "w1", SETTINGS)
            waiting = asyncio.create_task(receiver.receive(10, 20.0))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await asyncio.to_thread(server.stop, "immediate")
            with pytest.raises(TransportUnavailable):
                await waiting  # not left waiting for its 20 seconds
            assert time.monotonic() - started < 3
            started = time.monotonic()
            with pytest.raises(TransportUnavailable):
                await receiver.receive(10, 5.0)
            with pytest.raises(TransportUnavailable):
                await transport.send([Event("like.added", "down")])
            assert time.monotonic() - started < 3
            await asyncio.to_thread(server.start)
            deadline = time.monotonic() + 20
            while True:  # the same transport reconnects by itself
                try:
                    await transport.send([Event("like.added", "back")])
                    break
                except TransportUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            got = await receive_all(receiver, 1)
            assert {m.event.data for m in got if m.event} == {"back"}
            await receiver.ack(got)
            assert await transport.lag("billing") == 0
            await receiver.close()
        finally:
            await transport.close()
