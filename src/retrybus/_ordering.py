"""Ordering keys (``ordering_key=`` on publish and stage): the events of one key
reach each handler of a service one at a time, in the order they were published
(committed, for a staged event).

The key travels on the event as the CloudEvents partitioning extension
``partitionkey``, so that it goes wherever the event goes (a broker, the outbox
table, a dead letter). A store gives each keyed record a sequence number when it
writes it, and claims a keyed record only while no record of the same
(service, handler, key) with a lower number is in the retry queue: a delivery
waits while an earlier one of its key is pending, leased or waiting for a
retry, and goes once that one has succeeded or been dead-lettered.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._event import Event

__all__ = ["MAX_ORDERING_KEY", "PARTITION_KEY", "check_ordering_key", "keyed", "ordering_key_of"]

#: the CloudEvents partitioning extension that carries the key
PARTITION_KEY = "partitionkey"
#: the longest key accepted, in characters (it is stored in an indexed column)
MAX_ORDERING_KEY = 200


def check_ordering_key(key: object) -> str:
    """``key`` if it is a non-empty str of at most ``MAX_ORDERING_KEY``
    characters; else ``ValueError`` naming it."""
    if not isinstance(key, str):
        raise ValueError(f"ordering_key must be a str, got {key!r}")
    if not key or len(key) > MAX_ORDERING_KEY:
        raise ValueError(
            f"ordering_key must be 1 to {MAX_ORDERING_KEY} characters, got {key[:40]!r}"
            + ("…" if len(key) > 40 else "")
            + f" ({len(key)} characters)"
        )
    return key


def keyed(event: Event, ordering_key: str | None) -> Event:
    """``event`` carrying ``ordering_key`` (checked) as its ``partitionkey``
    extension; ``event`` itself when the key is None."""
    if ordering_key is None:
        return event
    check_ordering_key(ordering_key)
    if event.extensions.get(PARTITION_KEY) == ordering_key:
        return event
    return event.with_extensions({PARTITION_KEY: ordering_key})


def ordering_key_of(extensions: Mapping[str, str]) -> str | None:
    """The ordering key an event's extensions carry (None: none, or one that is
    not a valid key, which orders nothing)."""
    key = extensions.get(PARTITION_KEY)
    if not key or len(key) > MAX_ORDERING_KEY:
        return None
    return key
