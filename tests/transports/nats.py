"""The NATS JetStream transport for the transport suites: a stream of its own
per test (``RBT_<hex>``), on the shared server (``RETRYBUS_TEST_NATS_URL``,
default ``nats://127.0.0.1:4222``), deleted afterwards with its advisory stream.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors

from retrybus._transports.base import Transport
from retrybus._transports.nats import NatsTransport

from ._common import TransportFeatures

NATS_URL = os.environ.get("RETRYBUS_TEST_NATS_URL", "nats://127.0.0.1:4222")

FEATURES = TransportFeatures(
    persistent=True,
    shared_across_processes=True,
    restartable=True,
    has_lease=True,
    requeues_on_close=True,
    broker_cap=True,
    has_url_with_password=True,
)

MALFORMED_URLS = [
    ("nats://127.0.0.1:4222?stream=a.b", "bad stream name"),
    ("nats://127.0.0.1:4222?stream=", "bad stream name"),
    (
        "nats://u:secret@127.0.0.1:4222?exchange=x&stream=S",
        r"unknown option\(s\) exchange.*u:\*\*\*@",
    ),
    ("nats://127.0.0.1:4222/path", "no path"),
    ("nats://:4222", "malformed NATS transport URL"),
    ("tls://127.0.0.1:4222?bogus=1", "bogus"),
]
UNREACHABLE_URL = "nats://u:secret@127.0.0.1:1?stream=RETRYBUS"


def test_stream() -> str:
    """A stream name of one test's own."""
    return f"RBT_{uuid.uuid4().hex[:12].upper()}"


def url_for(stream: str) -> str:
    separator = "&" if urlsplit(NATS_URL).query else "?"
    return f"{NATS_URL}{separator}stream={stream}"


async def delete_streams(stream: str) -> None:
    """Delete ``stream`` and its advisory stream (only those) from the shared server."""
    nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for name in (stream, f"{stream}_ADVISORIES"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
    finally:
        await nc.close()


async def _reachable() -> None:
    from engines._common import unavailable

    try:
        nc = await nats.connect(
            NATS_URL, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        unavailable(f"NATS at {NATS_URL}", repr(exc))
    await nc.close()


@contextlib.asynccontextmanager
async def open_test_transport() -> AsyncIterator[NatsTransport]:
    """A connected transport on a stream of its own, deleted afterwards."""
    await _reachable()
    stream = test_stream()
    transport = NatsTransport(url_for(stream))
    try:
        await transport.connect()
        yield transport
    finally:
        try:
            await transport.close()
        finally:
            await delete_streams(stream)


def namespace_url(transport: Transport) -> str:
    assert isinstance(transport, NatsTransport)
    return url_for(transport.stream)


async def send_raw(transport: Transport, event_type: str, body: bytes) -> None:
    """``body`` published as it is on the subject ``event_type`` maps to."""
    assert isinstance(transport, NatsTransport)
    await transport.send_body(event_type, body)


@contextlib.contextmanager
def private_broker() -> Iterator[object]:
    from private_nats import PrivateNats

    with PrivateNats() as server:
        yield server
