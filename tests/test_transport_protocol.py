"""Every transport, through the protocol alone (send, declare, receive, ack,
extend, close): what the consumer above relies on. Each transport plugs in as
tests/transports/<kind>.py (tests/transports/_common.py says how)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from retrybus import Event
from retrybus._errors import TransportUnavailable
from retrybus._transports import open_transport
from retrybus._transports.base import Inbound, Receiver, Transport, TransportSettings
from transports._common import all_transports

TRANSPORTS = all_transports()
#: room for every message a test holds at once (a receiver holds at most ``prefetch``)
SETTINGS = TransportSettings(lease=30.0, max_claims=3, prefetch=200)
SHORT_LEASE = TransportSettings(lease=1.0, max_claims=3, prefetch=16)


@pytest.fixture(params=list(TRANSPORTS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def transport(kind: str) -> AsyncIterator[Transport]:
    async with TRANSPORTS[kind].open_test_transport() as opened:
        yield opened


def features(transport: Transport) -> object:
    return TRANSPORTS[transport.kind].FEATURES


async def receive_all(
    receiver: Receiver, count: int, within: float = 10.0, limit: int = 100
) -> list[Inbound]:
    """Receive until ``count`` messages came (or ``within`` seconds passed)."""
    got: list[Inbound] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += await receiver.receive(min(limit, count - len(got)), 0.5)
    return got


def redelivered(transport: Transport, messages: list[Inbound]) -> int:
    """The delivery count a second delivery must carry: 2, except that
    nats-server 2.9.10 sometimes reports a first redelivery as 1 (README)."""
    if transport.kind == "nats" and [m.deliveries for m in messages] == [1]:
        return 1
    return 2


async def test_sent_events_arrive_whole(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    events = [
        Event(
            "like.added",
            {"n": n, "text": "héllo", "nested": [1, {"a": None}]},
            source="/social",
            subject=f"post-{n}",
            extensions={
                "traceparent": f"00-{n:032x}-{n + 1:016x}-01",
                "tenant": "acme",
            },
        )
        for n in range(100)
    ]
    receipts = await transport.send(events)
    assert all(isinstance(receipt, str) and receipt for receipt in receipts)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    got = await receive_all(receiver, 100)
    assert len(got) == 100
    by_id = {message.event.id: message for message in got if message.event is not None}
    for event in events:
        message = by_id[event.id]
        assert message.deliveries == 1
        assert message.problem is None
        arrived = message.event
        assert arrived is not None
        assert arrived.to_dict() == event.to_dict()
    await receiver.ack(got)
    assert await transport.lag("billing") in (0, None)
    await receiver.close()


async def test_every_declared_service_gets_every_event(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.declare("search", ["like.added", "post.*"], SETTINGS)
    await transport.declare("audit", ["*"], SETTINGS)
    sent = [Event("like.added", n) for n in range(20)] + [
        Event("post.created", n) for n in range(5)
    ]
    await transport.send(sent)
    expected = {
        "billing": {e.id for e in sent if e.type == "like.added"},
        "search": {e.id for e in sent},
        "audit": {e.id for e in sent},
    }
    for service, ids in expected.items():
        receiver = await transport.receiver(service, f"{service}-1", SETTINGS)
        got = await receive_all(receiver, len(ids), within=5)
        # a broker may filter coarsely (a superset); the consumer matches exactly
        assert ids <= {m.event.id for m in got if m.event is not None}, service
        await receiver.ack(got)
        await receiver.close()


async def test_an_event_no_service_subscribes_to_reaches_none(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.send([Event("order.placed", 1)])
    await transport.send([Event("like.added", 2)])
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    got = await receive_all(receiver, 1)
    assert [m.event.type for m in got if m.event is not None] == ["like.added"]
    await receiver.ack(got)
    assert await receiver.receive(10, 0.3) == []
    await receiver.close()


async def test_events_sent_before_a_receiver_opens_wait_for_it(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.send([Event("like.added", n) for n in range(10)])
    if (lag := await transport.lag("billing")) is not None:
        assert lag == 10
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    got = await receive_all(receiver, 10)
    assert len(got) == 10
    await receiver.ack(got)
    await receiver.close()


async def test_receive_keeps_to_its_limit_and_waits_at_most_wait(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    started = time.monotonic()
    assert await receiver.receive(5, 0.3) == []
    assert time.monotonic() - started < 3.0
    await transport.send([Event("like.added", n) for n in range(12)])
    first = await receive_all(receiver, 5, limit=5)
    assert len(first) == 5
    rest = await receive_all(receiver, 7)
    assert len(rest) == 7
    assert len({m.receipt for m in first + rest}) == 12
    await receiver.ack(first + rest)
    await receiver.close()


async def test_a_waiting_receive_returns_when_an_event_is_sent(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    waiting = asyncio.create_task(receiver.receive(10, 5.0))
    await asyncio.sleep(0.3)
    sent_at = time.monotonic()
    await transport.send([Event("like.added", 1)])
    got = await waiting
    if not got:  # a broker may need one more poll for the first message
        got = await receive_all(receiver, 1)
    assert len(got) == 1
    assert time.monotonic() - sent_at < 2.0
    await receiver.ack(got)
    await receiver.close()


async def test_an_unacked_message_comes_back_after_its_receiver_closes(
    transport: Transport,
) -> None:
    settings = SHORT_LEASE
    await transport.declare("billing", ["like.*"], settings)
    await transport.send([Event("like.added", 1)])
    first = await transport.receiver("billing", "w1", settings)
    got = await receive_all(first, 1)
    assert [m.deliveries for m in got] == [1]
    await first.close()
    second = await transport.receiver("billing", "w2", settings)
    again = await receive_all(second, 1, within=settings.lease + 10)
    assert [m.deliveries for m in again] == [redelivered(transport, again)]
    assert again[0].event is not None
    assert got[0].event is not None
    assert again[0].event.id == got[0].event.id
    await second.ack(again)
    assert await second.receive(10, settings.lease + 0.5) == []
    await second.close()


async def test_a_message_held_past_its_lease_goes_to_another_consumer(
    transport: Transport,
) -> None:
    if not TRANSPORTS[transport.kind].FEATURES.has_lease:
        pytest.skip(f"{transport.kind} has no lease: a live consumer keeps its messages")
    settings = SHORT_LEASE
    await transport.declare("billing", ["like.*"], settings)
    await transport.send([Event("like.added", 1)])
    hung = await transport.receiver("billing", "w1", settings)
    got = await receive_all(hung, 1)
    other = await transport.receiver("billing", "w2", settings)
    taken = await receive_all(other, 1, within=settings.lease + 10)
    assert [m.deliveries for m in taken] == [redelivered(transport, taken)]
    await other.ack(taken)
    await hung.ack(got)  # too late: the message is the other consumer's; nothing breaks
    assert await other.receive(10, settings.lease + 0.5) == []
    await hung.close()
    await other.close()


async def test_extend_keeps_a_message_past_its_lease(transport: Transport) -> None:
    settings = SHORT_LEASE
    await transport.declare("billing", ["like.*"], settings)
    await transport.send([Event("like.added", 1)])
    holder = await transport.receiver("billing", "w1", settings)
    got = await receive_all(holder, 1)
    other = await transport.receiver("billing", "w2", settings)
    stolen: list[Inbound] = []
    deadline = time.monotonic() + settings.lease * 2.5
    while time.monotonic() < deadline:
        await holder.extend(got)
        stolen += await other.receive(10, settings.lease / 4)
    assert stolen == []
    await holder.ack(got)
    assert await other.receive(10, settings.lease + 0.5) == []
    await holder.close()
    await other.close()


async def test_an_unreadable_body_arrives_with_its_problem(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await TRANSPORTS[transport.kind].send_raw(transport, "like.added", b"\xff not json")
    await TRANSPORTS[transport.kind].send_raw(transport, "like.added", b'{"specversion": "0.3"}')
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    got = await receive_all(receiver, 2)
    assert len(got) == 2
    for message in got:
        assert message.event is None
        assert message.problem
        assert message.deliveries == 1
    assert {m.body for m in got} == {b"\xff not json", b'{"specversion": "0.3"}'}
    await receiver.ack(got)
    await receiver.close()


async def test_declare_again_is_harmless_and_forget_removes_the_service(
    transport: Transport,
) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.send([Event("like.added", 1)])
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.declare("billing", ["like.*", "post.*"], SETTINGS)
    await transport.send([Event("post.created", 2)])
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    got = await receive_all(receiver, 2)
    assert sorted(m.event.type for m in got if m.event is not None) == [
        "like.added",
        "post.created",
    ]
    await receiver.ack(got)
    await receiver.close()
    report = await transport.check(["billing"])
    assert [s.service for s in report.services if not s.problems] == ["billing"]
    await transport.forget("billing")
    await transport.send([Event("like.added", 3)])  # reaches no one; must not fail
    report = await transport.check(["billing"])
    assert [s.problems != [] for s in report.services if s.service == "billing"] == [True]


async def test_a_service_declared_later_gets_only_what_is_sent_after(
    transport: Transport,
) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.send([Event("like.added", "before")])
    await transport.declare("search", ["like.*"], SETTINGS)
    await transport.send([Event("like.added", "after")])
    receiver = await transport.receiver("search", "w1", SETTINGS)
    got = await receive_all(receiver, 2, within=1.5)
    assert [m.event.data for m in got if m.event is not None] == ["after"]
    await receiver.ack(got)
    await receiver.close()


async def test_lag_counts_what_waits_and_what_is_held(transport: Transport) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.send([Event("like.added", n) for n in range(5)])
    lag = await transport.lag("billing")
    if lag is None:
        pytest.skip(f"{transport.kind} does not report lag")
    assert lag == 5
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    got = await receive_all(receiver, 5)
    await receiver.ack(got[:2])
    lag = await transport.lag("billing")
    assert lag is not None
    assert 3 <= lag <= 5
    await receiver.ack(got[2:])
    assert await transport.lag("billing") == 0
    await receiver.close()


async def test_a_malformed_url_is_refused_naming_it(kind: str) -> None:
    for url, fragment in TRANSPORTS[kind].MALFORMED_URLS:
        with pytest.raises(ValueError, match=fragment):
            open_transport(url)


async def test_an_unreachable_broker_raises_transport_unavailable(kind: str) -> None:
    url = TRANSPORTS[kind].UNREACHABLE_URL
    if url is None:
        pytest.skip(f"{kind} cannot be unreachable")
    transport = open_transport(url)
    started = time.monotonic()
    with pytest.raises(TransportUnavailable) as raised:
        await transport.health()
    assert time.monotonic() - started < 15
    assert "***" in str(raised.value) or "@" not in url
    with pytest.raises(TransportUnavailable):
        await transport.send([Event("like.added", 1)])
    await transport.close()


def test_the_url_hides_its_password(kind: str) -> None:
    module = TRANSPORTS[kind]
    if not module.FEATURES.has_url_with_password:
        pytest.skip(f"{kind} URLs carry no password")
    url = module.UNREACHABLE_URL
    assert url is not None
    assert ":secret@" in url, "UNREACHABLE_URL must carry the password 'secret'"
    assert "secret" not in open_transport(url).url


async def test_messages_survive_a_broker_restart_and_a_receiver_resumes(kind: str) -> None:
    module = TRANSPORTS[kind]
    if not module.FEATURES.restartable:
        pytest.skip(f"{kind} cannot be restarted by the tests")
    with module.private_broker() as broker:
        transport = open_transport(broker.url)
        try:
            await transport.declare("billing", ["like.*"], SETTINGS)
            await transport.send([Event("like.added", n) for n in range(50)])
            receiver = await transport.receiver("billing", "w1", SETTINGS)
            first = await receive_all(receiver, 10, limit=10)
            await receiver.ack(first)
            await asyncio.to_thread(broker.restart)
            got: list[Inbound] = []
            deadline = time.monotonic() + 30
            while len(got) < 40 and time.monotonic() < deadline:
                try:
                    batch = await receiver.receive(100, 0.5)
                    await receiver.ack(batch)
                    got += batch
                except TransportUnavailable:
                    await asyncio.sleep(0.2)
            assert len({m.event.id for m in got if m.event is not None}) == 40
            deadline = time.monotonic() + 30
            while True:  # sending works again once the broker answers
                try:
                    await transport.send([Event("like.added", "after")])
                    break
                except TransportUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            after = await receive_all(receiver, 1)
            assert [m.event.data for m in after if m.event is not None] == ["after"]
            await receiver.ack(after)
            await receiver.close()
        finally:
            await transport.close()
