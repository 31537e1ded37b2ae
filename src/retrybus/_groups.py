"""Failure groups: dead letters of one handler failing with one error type and one
message shape, so that one bad deploy shows as one row, not 10,000.

A message's shape is the message with what varies between occurrences (ids,
numbers, times, addresses, quoted values) replaced by placeholders:
``order 8812 not found (id 'a1f…')`` and ``order 17 not found (id 'c9e…')``
both have the shape ``order <n> not found (id '<str>')``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime

from ._errors import UnknownVersion
from ._services import DEFAULT_SERVICE

__all__ = ["FailureGroup", "GroupCount", "failure_group_key", "message_shape"]

MAX_SHAPE_CHARS = 200
# only the start of a long message decides its shape (and bounds the work)
MAX_SOURCE_CHARS = 2_000

# order matters: the specific forms first, bare numbers last
_SHAPE_RULES: tuple[tuple[str, str], ...] = (
    # a quoted value, not the apostrophes of "can't ... won't"
    (r"(?<!\w)'[^']*'(?!\w)", "'<str>'"),
    (r'(?<!\w)"[^"]*"(?!\w)', '"<str>"'),
    (
        r"\b[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\b",
        "<uuid>",
    ),
    (
        r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b",
        "<time>",
    ),
    (r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b", "<ip>"),
    (r"\b0x[0-9a-fA-F]+\b", "<hex>"),
    (r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b", "<hex>"),
    (r"(?<![A-Za-z])[A-Za-z]+_[0-9a-fA-F]{12,}\b", "<id>"),
    (r"(?<![A-Za-z0-9_.])[-+]?\d+(?:[.,]\d+)*", "<n>"),
)


#: the error type (as dead letters record it) whose message keeps its stored version
_UNKNOWN_VERSION_TYPE = f"{UnknownVersion.__module__}.{UnknownVersion.__qualname__}"
_UNKNOWN_VERSION_LEAD = re.compile(r"unknown version \d+ of ")


@functools.cache
def _compiled_rules() -> tuple[tuple[re.Pattern[str], str], ...]:
    # compiled on first use: a worker that never dead-letters never pays for them
    return tuple((re.compile(pattern), placeholder) for pattern, placeholder in _SHAPE_RULES)


def message_shape(message: str, error_type: str = "") -> str:
    """``message`` with its varying parts replaced by placeholders (see the module).

    For an ``UnknownVersion`` (``error_type`` as dead letters record it,
    ``retrybus._errors.UnknownVersion``) the stored version stays: ``unknown
    version 4 of like.added`` and ``unknown version 5 of like.added`` wait for
    different deploys, so they are two groups."""
    if error_type == _UNKNOWN_VERSION_TYPE:
        lead = _UNKNOWN_VERSION_LEAD.match(message)
        if lead is not None:
            rest = message_shape(message[lead.end() : MAX_SOURCE_CHARS])
            return _bounded(lead.group() + rest)
    shape = message[:MAX_SOURCE_CHARS]
    for pattern, placeholder in _compiled_rules():
        shape = pattern.sub(placeholder, shape)
    return _bounded(" ".join(shape.split()))


def _bounded(shape: str) -> str:
    if len(shape) > MAX_SHAPE_CHARS:
        shape = shape[: MAX_SHAPE_CHARS - 1] + "…"
    return shape


def failure_group_key(
    handler_name: str, error_type: str, error: str, service: str = DEFAULT_SERVICE
) -> str:
    """The group a failure belongs to: ``grp_`` and 16 hex digits of a hash of the
    service, the handler, the error type and the message shape (stable across
    processes). The default service is left out of the hash, so that a group's
    key is the one it had before services; another's leads the hashed text,
    joined by NUL, which no handler name, error type or message shape holds: the
    two kinds of key never collide."""
    import hashlib  # on first use, as the rules: most processes never need it

    text = "\x1f".join((handler_name, error_type, message_shape(error, error_type)))
    if service != DEFAULT_SERVICE:
        text = f"{service}\x00{text}"
    return "grp_" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class GroupCount:
    """How many items share one value of a field (a handler, an event type, a
    reason or a failure group), the earliest and latest of their times (dead
    letters: ``created_at``; retry items: ``next_retry``) and one item's id."""

    key: str
    count: int
    first_at: datetime
    last_at: datetime
    sample_id: str

    def to_dict(self) -> dict[str, object]:
        """The count as a JSON-ready dict (times as ISO 8601)."""
        return {
            "key": self.key,
            "count": self.count,
            "first_at": self.first_at.isoformat(),
            "last_at": self.last_at.isoformat(),
            "sample_id": self.sample_id,
        }


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Dead letters of one handler with one error type and one message shape."""

    key: str
    handler_name: str
    error_type: str
    shape: str
    count: int
    first_at: datetime
    last_at: datetime
    sample_id: str
    sample_error: str
    sample_reason: str

    def to_dict(self) -> dict[str, object]:
        """The group as a JSON-ready dict."""
        return {
            "key": self.key,
            "handler_name": self.handler_name,
            "error_type": self.error_type,
            "shape": self.shape,
            "count": self.count,
            "first_at": self.first_at.isoformat(),
            "last_at": self.last_at.isoformat(),
            "sample_id": self.sample_id,
            "sample_error": self.sample_error,
            "sample_reason": self.sample_reason,
        }
