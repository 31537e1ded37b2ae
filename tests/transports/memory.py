"""The in-process transport for the transport suites."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from retrybus._transports.base import Transport
from retrybus._transports.memory import MemoryTransport

from ._common import TransportFeatures

FEATURES = TransportFeatures(
    persistent=False,
    shared_across_processes=False,
    restartable=False,
    has_lease=True,
    requeues_on_close=True,
    broker_cap=False,
    has_url_with_password=False,
)

MALFORMED_URLS = [
    ("memory://somewhere", "memory://"),
    ("memory://?x=1", "memory://"),
]
UNREACHABLE_URL = None  # nothing to reach


@contextlib.asynccontextmanager
async def open_test_transport() -> AsyncIterator[MemoryTransport]:
    transport = MemoryTransport()
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


def namespace_url(transport: Transport) -> str:
    raise NotImplementedError("an in-process broker has no URL another transport can open")


async def send_raw(transport: Transport, event_type: str, body: bytes) -> None:
    assert isinstance(transport, MemoryTransport)
    await transport.send_body(event_type, body)


@contextlib.contextmanager
def private_broker() -> Iterator[None]:
    raise NotImplementedError("an in-process broker cannot be restarted")
    yield
