"""What the Redis store's modules share: reading redis-py's replies, and the batch size."""

from __future__ import annotations

from typing import Any

__all__ = ["CHUNK", "pairs", "text"]

#: ids (or records) a script or command handles at a time when one call works in batches
CHUNK = 500


def text(value: str | bytes) -> str:
    """A reply value as text (the client does not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


def pairs(reply: Any) -> list[tuple[Any, Any]]:
    """The field, value pairs of a hash reply: a dict (redis-py's response callbacks)
    or, in RESP2 without them, a flat list."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))
