"""The RabbitMQ transport for the transport suites.

The machine's RabbitMQ (``RETRYBUS_TEST_RABBITMQ_URL``, default
``amqp://guest:guest@127.0.0.1:5672/``) is shared: the session makes a vhost
of its own (``rabbitmqctl add_vhost retrybus_test_<pid>_<hex>``, guest given
every permission on it) on first use and deletes it at exit; each test uses an
exchange prefix of its own there, whose exchanges and queues it deletes after.
Restarts use a private node (tests/private_rabbitmq.py), never the shared one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote, urlsplit

import aio_pika

from retrybus._transports.base import Transport
from retrybus._transports.rabbitmq import RabbitTransport

from ._common import TransportFeatures

RABBITMQ_URL = os.environ.get("RETRYBUS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")

FEATURES = TransportFeatures(
    persistent=True,
    shared_across_processes=True,
    restartable=True,
    has_lease=False,
    requeues_on_close=True,
    broker_cap=True,
    has_url_with_password=True,
)

MALFORMED_URLS = [
    ("amqp://guest:guest@127.0.0.1:5672/%2F?exchange=retrybus&colour=blue", "colour"),
    ("amqp://guest:guest@127.0.0.1:5672/%2F?exchange=", "exchange"),
    ("amqp://guest:guest@127.0.0.1:5672/%2F?exchange=a%20b", "exchange"),
    ("amqp://guest:secret@127.0.0.1:99999/", "malformed"),
    ("amqp://guest:guest@127.0.0.1:5672/a/b", "%2F"),
    ("amqp://guest:guest@127.0.0.1:5672/?timeout=never", "timeout"),
]
UNREACHABLE_URL = "amqp://guest:secret@127.0.0.1:1/%2F?timeout=3"

_vhost: str | None = None


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", *args],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
    )


def _delete_vhost(name: str) -> None:
    with contextlib.suppress(Exception):
        _rabbitmqctl("delete_vhost", name)


def session_vhost() -> str:
    """This session's vhost on the shared broker, made on first use (deleted at exit)."""
    global _vhost
    if _vhost is None:
        from engines._common import unavailable, unique_name

        name = unique_name()
        try:
            _rabbitmqctl("add_vhost", name)
            atexit.register(_delete_vhost, name)
            _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            unavailable("RabbitMQ (rabbitmqctl)", f"{exc} {detail.decode(errors='replace')}")
        _vhost = name
    return _vhost


def vhost_url(exchange: str) -> str:
    """A transport URL on this session's vhost with exchange prefix ``exchange``."""
    parts = urlsplit(RABBITMQ_URL)
    base = parts._replace(path="/" + quote(session_vhost(), safe=""), query="").geturl()
    return f"{base}?exchange={exchange}"


@contextlib.asynccontextmanager
async def open_test_transport() -> AsyncIterator[RabbitTransport]:
    """A connected transport under a fresh exchange prefix; its exchanges and the
    queues of the services it declared are deleted afterwards."""
    transport = RabbitTransport(vhost_url(f"t{uuid.uuid4().hex[:12]}"))
    try:
        await transport.connect()
    except Exception as exc:
        from engines._common import unavailable

        await transport.close()
        unavailable("RabbitMQ at 127.0.0.1:5672", str(exc))
    try:
        yield transport
    finally:
        services = set(transport._declared)  # a forgotten one is deleted already
        await transport.close()
        await delete_namespace(transport.exchange, services)


async def delete_namespace(exchange: str, services: set[str]) -> None:
    """Delete ``exchange``'s exchanges and the queues of ``services`` (what
    another process declared there goes with the session's vhost)."""
    connection = await aio_pika.connect(vhost_url(exchange).split("?")[0])
    try:
        channel = await connection.channel()
        for service in services:
            for suffix in ("", ".undeliverable", ".bindings"):
                await channel.queue_delete(f"{exchange}.{service}{suffix}")
        await channel.exchange_delete(exchange)
        await channel.exchange_delete(f"{exchange}.dlx")
    finally:
        await connection.close()


def namespace_url(transport: Transport) -> str:
    assert isinstance(transport, RabbitTransport)
    return vhost_url(transport.exchange)


async def send_raw(transport: Transport, event_type: str, body: bytes) -> None:
    """Publish ``body`` as it is to the transport's exchange, routed by ``event_type``."""
    assert isinstance(transport, RabbitTransport)
    connection = await aio_pika.connect(vhost_url(transport.exchange).split("?")[0])
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(transport.exchange)
        await exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=event_type)
    finally:
        await connection.close()


@contextlib.contextmanager
def private_broker() -> Iterator[object]:
    from private_rabbitmq import PrivateRabbit

    with PrivateRabbit() as broker:
        yield broker
