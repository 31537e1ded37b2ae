"""What only the RabbitMQ transport has: the delivery count header, the broker's
delivery limit and its dead-letter queue, queue arguments that cannot change,
routing keys' length, mandatory publishes, and a connection closed under a
receiver (tests/transports/rabbitmq.py says where they run)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator

import pytest

from retrybus import Event
from retrybus._errors import TransportUnavailable
from retrybus._transports import open_transport
from retrybus._transports.base import Inbound, Receiver, TransportSettings
from retrybus._transports.rabbitmq import RabbitTransport, binding_keys
from transports import rabbitmq as hooks

SETTINGS = TransportSettings(lease=30.0, max_claims=3, prefetch=16)


@pytest.fixture
async def transport() -> AsyncIterator[RabbitTransport]:
    async with hooks.open_test_transport() as opened:
        yield opened


async def receive_all(receiver: Receiver, count: int, within: float = 10.0) -> list[Inbound]:
    got: list[Inbound] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += await receiver.receive(count - len(got), 0.5)
    return got


async def test_a_redelivery_carries_the_delivery_count_header(transport: RabbitTransport) -> None:
    # pins what RabbitMQ 3.10 sends: no header on the first delivery, then
    # x-delivery-count = returns so far (a closed channel's requeue counts)
    await transport.declare("billing", ["like.*"], SETTINGS)
    await transport.send([Event("like.added", 1)])
    seen: list[tuple[object, int]] = []
    for n in range(3):
        receiver = await transport.receiver("billing", f"w{n}", SETTINGS)
        [message] = await receive_all(receiver, 1)
        seen.append(((message.token[1].headers or {}).get("x-delivery-count"), message.deliveries))
        if n < 2:
            await receiver.close()
        else:
            await receiver.ack([message])
            await receiver.close()
    assert seen == [(None, 1), (1, 2), (2, 3)]


async def test_past_the_delivery_limit_a_message_is_given_up(transport: RabbitTransport) -> None:
    settings = TransportSettings(lease=30.0, max_claims=2, prefetch=16)
    await transport.declare("billing", ["like.*"], settings)
    event = Event("like.added", {"poison": True})
    await transport.send([event])
    deliveries: list[int] = []
    for n in range(6):
        receiver = await transport.receiver("billing", f"w{n}", settings)
        got = await receiver.receive(1, 1.0)
        await receiver.close()  # returned unacked, as a consumer that died
        if not got:
            break
        deliveries.append(got[0].deliveries)
    # x-delivery-limit = max_claims: the consumer sees delivery max_claims + 1 itself
    assert deliveries == [1, 2, 3]
    keeper = await transport.receiver("billing", "keeper", settings)
    given_up: list[Inbound] = []
    deadline = time.monotonic() + 10
    while not given_up and time.monotonic() < deadline:
        given_up = await keeper.given_up(10)
        await asyncio.sleep(0.1)
    assert [m.event.id for m in given_up if m.event is not None] == [event.id]
    assert given_up[0].deliveries == 3
    assert given_up[0].problem is None
    await keeper.ack(given_up)
    await keeper.close()
    again = await transport.receiver("billing", "again", settings)
    assert await again.given_up(10) == []
    assert await transport.lag("billing") == 0
    await again.close()
    report = await transport.check()
    assert report.extra[f"{transport.exchange}.billing.undeliverable"] == 0


async def test_other_queue_arguments_warn_once_and_keep_working(
    transport: RabbitTransport, caplog: pytest.LogCaptureFixture
) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    other = TransportSettings(lease=30.0, max_claims=7, prefetch=16)
    with caplog.at_level(logging.WARNING, logger="retrybus"):
        await transport.declare("billing", ["like.*"], other)
        await transport.declare("billing", ["like.*", "post.*"], other)
    warnings = [r for r in caplog.records if "other arguments" in r.getMessage()]
    assert len(warnings) == 1
    assert "x-delivery-limit" in warnings[0].getMessage()
    await transport.send([Event("like.added", 1), Event("post.created", 2)])
    receiver = await transport.receiver("billing", "w1", other)
    got = await receive_all(receiver, 2)
    assert sorted(m.event.type for m in got if m.event is not None) == [
        "like.added",
        "post.created",
    ]
    await receiver.ack(got)
    await receiver.close()
    report = await transport.check()
    [billing] = report.services
    assert any("other arguments" in problem for problem in billing.problems)


async def test_a_type_over_255_bytes_is_refused(transport: RabbitTransport) -> None:
    await transport.declare("billing", ["*"], SETTINGS)
    with pytest.raises(ValueError, match="255"):
        await transport.send([Event("like." + "x" * 251, 1)])
    with pytest.raises(ValueError, match="255"):
        await transport.declare("search", ["like." + "x" * 260], SETTINGS)
    assert (await transport.send([Event("like." + "x" * 250, 1)]))[0] is not None


async def test_an_event_no_queue_is_bound_for_gets_no_receipt(
    transport: RabbitTransport,
) -> None:
    await transport.declare("billing", ["like.added"], SETTINGS)
    receipts = await transport.send([Event("like.added", 1), Event("like.removed", 2)])
    assert receipts[0] is not None
    assert receipts[1] is None


async def test_stale_bindings_are_removed_on_declare(transport: RabbitTransport) -> None:
    await transport.declare("billing", ["like.*", "post.created"], SETTINGS)
    # another process (a fresh transport) declares the service with other patterns
    async with RabbitTransport(hooks.namespace_url(transport)) as other:
        await other.declare("billing", ["post.*"], SETTINGS)
    receipts = await transport.send([Event("like.added", 1), Event("post.deleted", 2)])
    assert receipts[0] is None
    assert receipts[1] is not None


def test_binding_keys_follow_the_coarse_filters() -> None:
    assert binding_keys(["like.added"]) == {"like.added"}
    assert binding_keys(["like.*", "like.add*"]) == {"like.#"}
    assert binding_keys(["like.added", "*.removed"]) == {"#"}
    assert binding_keys(["a.#.b"]) == {"#"}


def test_the_url_is_checked_and_its_password_hidden() -> None:
    with pytest.raises(ValueError, match="colour, size") as raised:
        open_transport("amqp://guest:secret@127.0.0.1/%2F?size=1&colour=blue")
    assert "secret" not in str(raised.value)
    transport = open_transport("amqps://guest:secret@broker:5671/prod?exchange=orders")
    assert isinstance(transport, RabbitTransport)
    assert transport.exchange == "orders"
    assert "secret" not in transport.url


async def test_a_receiver_resumes_after_its_connection_is_closed(
    transport: RabbitTransport,
) -> None:
    await transport.declare("billing", ["like.*"], SETTINGS)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    await transport.send([Event("like.added", 1)])
    first = await receive_all(receiver, 1)
    await asyncio.to_thread(_close_connections, hooks.session_vhost())
    # the message held when the connection went comes back; the same objects work
    got: list[Inbound] = []
    deadline = time.monotonic() + 15
    sent = False
    while len(got) < 2 and time.monotonic() < deadline:
        try:
            if not sent:
                await transport.send([Event("like.added", 2)])
                sent = True
            batch = await receiver.receive(10, 0.5)
            await receiver.ack(batch)
            got += batch
        except TransportUnavailable:
            await asyncio.sleep(0.1)
    assert sorted(m.event.data for m in got if m.event is not None) == [1, 2]
    assert [m.deliveries for m in got if m.event is not None and m.event.data == 1] == [2]
    await receiver.ack(first)  # its channel is gone: nothing to do, nothing raised
    assert await transport.lag("billing") == 0
    await receiver.close()


def _close_connections(vhost: str) -> None:
    """Close every connection on the test vhost (this session's only)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "-p", vhost, "pid"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    pids = [pid for pid in listed if pid.startswith("<")]
    assert pids, listed
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "closed by a retrybus test"],
            check=True,
            capture_output=True,
            timeout=60,
        )
