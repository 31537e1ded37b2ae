"""The Redis Streams transport for the transport suites: a stream prefix of its
own per test on the shared server (``RETRYBUS_TEST_REDIS_URL``), its keys deleted
afterwards (SCAN + DEL, never FLUSHDB); restarts use a private ``redis-server``
with an append-only file."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import redis.asyncio as aioredis

from engines._common import unique_name
from engines.redis import REDIS_URL, delete_prefix, ping
from private_servers import PrivateRedis
from retrybus._transports.base import Transport
from retrybus._transports.redis import RedisTransport

from ._common import TransportFeatures

FEATURES = TransportFeatures(
    persistent=True,
    shared_across_processes=True,
    restartable=True,
    has_lease=True,
    # a closed receiver's entries are made idle at once, but another receiver
    # takes them at its next claim (within min(lease / 2, 5 s)), not at once
    requeues_on_close=False,
    broker_cap=False,
    has_url_with_password=True,
)

MALFORMED_URLS = [
    ("redis://127.0.0.1:6379/zero", "must be a database number"),
    ("redis://user:s3cret@127.0.0.1:6379/x", "user:\\*\\*\\*@"),
    ("redis://127.0.0.1:6379/0?stream=a:b", "stream"),
    ("redis://127.0.0.1:6379/0?stream=", "stream"),
    ("redis://127.0.0.1:6379/0?colour=blue&size=2", "unknown options 'colour', 'size'"),
    ("redis://127.0.0.1:6379/0?prefix=x", "unknown option 'prefix'"),
    ("redis://127.0.0.1:6379/0?socket_timeout=1", "unknown option 'socket_timeout'"),
    ("redis://127.0.0.1:6379/0?socket_connect_timeout=soon", "socket_connect_timeout"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://", "no host"),
]
UNREACHABLE_URL = "redis://:secret@127.0.0.1:1/0"


def transport_url(stream: str, base: str = REDIS_URL) -> str:
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}stream={stream}"


@contextlib.asynccontextmanager
async def open_test_transport() -> AsyncIterator[RedisTransport]:
    """A connected transport under a fresh stream prefix; its keys are deleted afterwards."""
    await ping()
    stream = unique_name("rbt")
    transport = RedisTransport(transport_url(stream))
    try:
        await transport.connect()
        yield transport
    finally:
        await transport.close()
        await delete_prefix(stream)


def namespace_url(transport: Transport) -> str:
    assert isinstance(transport, RedisTransport)
    return transport_url(transport.stream)


async def send_raw(transport: Transport, event_type: str, body: bytes) -> None:
    """XADD ``body`` as it is to the stream of ``event_type`` (declared already)."""
    assert isinstance(transport, RedisTransport)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.xadd(transport.stream_key(event_type.split(".", 1)[0]), {"e": body})
    finally:
        await client.aclose()


class PrivateRedisBroker(PrivateRedis):
    """A private persistent ``redis-server`` whose ``url`` is a transport URL."""

    def __init__(self) -> None:
        super().__init__(persistent=True)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def url(self) -> str:
        return transport_url("rbt_private", self.redis_url)


@contextlib.contextmanager
def private_broker() -> Iterator[PrivateRedisBroker]:
    with PrivateRedisBroker() as broker:
        yield broker
