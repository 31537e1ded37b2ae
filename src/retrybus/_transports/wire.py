"""How an event travels on a broker: its CloudEvents 1.0 JSON structured form
(any language reads it), and the coarse filters a broker can apply for a
service's type patterns."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .._event import Event, compact_json
from .._patterns import is_glob

__all__ = ["CONTENT_TYPE", "coarse_prefixes", "covers", "decode", "encode"]

#: the content type of a message body (structured-mode CloudEvents, JSON)
CONTENT_TYPE = "application/cloudevents+json"


def encode(event: Event) -> bytes:
    """The message body that carries ``event``."""
    head: dict[str, Any] = {
        "specversion": "1.0",
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "time": event.to_dict()["time"],
        "datacontenttype": "application/json",
    }
    if event.subject is not None:
        head["subject"] = event.subject
    head.update(event.extensions)
    text = compact_json(head)
    return f'{text[:-1]},"data":{event.data_json}}}'.encode()


def decode(body: bytes) -> Event:
    """The event a message body carries; ``ValueError`` saying why when it is
    not a CloudEvent retrybus can read."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    try:
        return Event.from_dict(document)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a CloudEvent retrybus can read: {exc}") from None


def coarse_prefixes(patterns: Iterable[str]) -> frozenset[str] | None:
    """What a broker can filter on for ``patterns``: for each, its dotted words
    before the first wildcard (``like.added`` → ``like.added``, ``like.*`` and
    ``like.add*`` → ``like``). None when a pattern can match any type (``*``,
    ``li*``, ``*.added``). A type is covered when it equals a prefix or starts
    with it and a dot (``covers``); the covered types are a superset of the
    matching ones, since ``*`` crosses dots."""
    prefixes: set[str] = set()
    for pattern in patterns:
        if not is_glob(pattern):
            prefixes.add(pattern)
            continue
        words = pattern.split(".")
        fixed: list[str] = []
        for word in words:
            if is_glob(word):
                break
            fixed.append(word)
        if not fixed:
            return None
        prefixes.add(".".join(fixed))
    return frozenset(prefixes)


def covers(prefixes: frozenset[str] | None, event_type: str) -> bool:
    """Whether a broker filtering on ``prefixes`` (None: everything) lets ``event_type`` through."""
    if prefixes is None:
        return True
    if event_type in prefixes:
        return True
    return any(event_type.startswith(prefix + ".") for prefix in prefixes)
