"""Transports (brokers that carry first deliveries between services) and
``open_transport(url)``."""

from __future__ import annotations

import importlib
from urllib.parse import SplitResult, urlsplit

from .._stores._url import redact
from .base import Inbound, Receiver, Transport, TransportReport, TransportSettings

__all__ = [
    "Inbound",
    "Receiver",
    "Transport",
    "TransportReport",
    "TransportSettings",
    "open_transport",
]

_KNOWN = "memory://, redis://host:6379/0?stream=NAME, amqp://user:pass@host/vhost, nats://host:4222"

# scheme -> (module in this package, transport class, pip extra)
_BROKERS = {
    "redis": ("redis", "RedisTransport", "redis"),
    "rediss": ("redis", "RedisTransport", "redis"),
    "amqp": ("rabbitmq", "RabbitTransport", "rabbitmq"),
    "amqps": ("rabbitmq", "RabbitTransport", "rabbitmq"),
    "nats": ("nats", "NatsTransport", "nats"),
    "tls": ("nats", "NatsTransport", "nats"),
}


def open_transport(url: str) -> Transport:
    """The transport a URL names, not yet connected (it connects on first use).

    ``memory://`` is a broker inside this process (for tests);
    ``redis://host:6379/0?stream=retrybus`` uses Redis Streams
    (``pip install "retrybus[redis]"``), ``amqp://guest:guest@host:5672/vhost?exchange=retrybus``
    RabbitMQ (``retrybus[rabbitmq]``) and ``nats://host:4222?stream=RETRYBUS``
    NATS JetStream (``retrybus[nats]``).

    >>> bus = EventBus(store, service="billing", transport=open_transport("nats://127.0.0.1:4222"))

    Raises ``ValueError`` naming the URL when the scheme is unknown or the URL malformed.
    """
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path or parts.query:
            raise ValueError(f"malformed memory transport URL {url!r}: use exactly 'memory://'")
        from .memory import MemoryTransport

        return MemoryTransport(url)
    if scheme not in _BROKERS:
        raise ValueError(
            f"unknown transport URL scheme {parts.scheme!r} in {redact(url)!r}: use {_KNOWN}"
        )
    module_name, class_name, extra = _BROKERS[scheme]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        raise ImportError(
            f"the {scheme}:// transport needs its client library: "
            f'pip install "retrybus[{extra}]" ({exc})'
        ) from exc
    transport: Transport = getattr(module, class_name)(url)
    return transport


def _split(url: str) -> SplitResult:
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"a transport URL must look like scheme://…, for example {_KNOWN}; got {url!r}"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ValueError(f"malformed transport URL {redact(url)!r}: {exc}") from None
    return parts
