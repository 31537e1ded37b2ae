"""Which dead letters an operation means: ``DeadLetterFilter``.

One filter serves listing, counting, grouping and the bulk actions, in code,
in the CLI (``--filter handler=X``) and on the dashboard (its query string), so
that "everything matching the current filter" means the same everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from ._event import check_text
from ._records import DeadLetterItem
from ._services import check_service

__all__ = [
    "DeadLetterFilter",
    "FilterFields",
    "FilterFieldsExceptProcessed",
    "field_name",
    "filter_from",
    "parse_moment",
]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# what the CLI and the dashboard call each field
_ALIASES = {
    "type": "event_type",
    "event_type": "event_type",
    "handler": "handler_name",
    "handler_name": "handler_name",
    "reason": "reason",
    "processed": "processed",
    "since": "created_after",
    "created_after": "created_after",
    "until": "created_before",
    "created_before": "created_before",
    "event_id": "event_id",
    "event": "event_id",
    "group": "failure_group",
    "failure_group": "failure_group",
    "service": "service",
}


def field_name(key: str) -> str | None:
    """The ``DeadLetterFilter`` field a text key (``handler``, ``since`` …) names."""
    return _ALIASES.get(key.strip().lower())


def parse_moment(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (``2026-12-01T10:00:00+00:00``; a time without a zone is
    UTC) or an age before ``now`` (``30m``, ``2h``, ``7d``)."""
    value = text.strip()
    match = _DURATION.match(value)
    if match:
        try:
            return now - timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        except OverflowError:
            raise ValueError(f"the age {text!r} reaches past the calendar") from None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use ISO 8601 such as 2026-12-01T10:00:00Z, "
            "or an age such as 30m, 2h, 7d)"
        ) from None
    try:
        return _aware(moment).astimezone(UTC)
    except OverflowError:
        raise ValueError(f"the time {text!r} is past the calendar in UTC") from None


def _aware(moment: datetime) -> datetime:
    """A stored time; one written without a zone is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "processed"):
        return True
    if lowered in ("false", "no", "0", "unprocessed"):
        return False
    raise ValueError(f"{name} must be true or false, got {text!r}")


class FilterFieldsExceptProcessed(TypedDict, total=False):
    """``FilterFields`` but ``processed`` (for a method that takes it by position)."""

    event_type: str | None
    handler_name: str | None
    reason: str | None
    created_after: datetime | None
    created_before: datetime | None
    event_id: str | None
    failure_group: str | None
    service: str | None


class FilterFields(FilterFieldsExceptProcessed, total=False):
    """The fields of a ``DeadLetterFilter``, as keyword arguments of the methods
    that take one (``bus.dead_letters.count(event_type="x")``)."""

    processed: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterFilter:
    """Dead letters matching every field that is set (None matches anything).

    ``created_after`` is inclusive and ``created_before`` exclusive;
    ``failure_group`` is a group key from ``bus.dead_letters.groups()``;
    ``service`` is the service whose handler the dead letter was for.
    ``cursor`` is a position for keyset paging, the ``(created_at, id)`` of the
    last dead letter seen: only those after it in newest-first order match
    (``created_at`` earlier, or equal with a smaller ``id``).

    >>> DeadLetterFilter(handler_name="CommentNotificationHandler", processed=False)
    """

    event_type: str | None = None
    handler_name: str | None = None
    reason: str | None = None
    processed: bool | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    event_id: str | None = None
    failure_group: str | None = None
    service: str | None = None
    cursor: tuple[datetime, str] | None = None

    def __post_init__(self) -> None:
        for name in ("event_type", "handler_name", "reason", "event_id", "failure_group"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
            if value is not None:
                check_text(value, name)
        if self.service is not None:
            check_service(self.service)
        if self.processed is not None and not isinstance(self.processed, bool):
            raise ValueError(f"processed must be True, False or None, got {self.processed!r}")
        for name in ("created_after", "created_before"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
        if self.cursor is not None:
            cursor = self.cursor
            if (
                not isinstance(cursor, tuple)
                or len(cursor) != 2
                or not isinstance(cursor[0], datetime)
                or cursor[0].tzinfo is None
                or not isinstance(cursor[1], str)
            ):
                raise ValueError(f"cursor must be (timezone-aware created_at, id), got {cursor!r}")

    @property
    def is_empty(self) -> bool:
        """True when the filter matches every dead letter."""
        return all(getattr(self, f.name) is None for f in fields(self))

    def matches(self, item: DeadLetterItem) -> bool:
        """Whether ``item`` is one of the dead letters this filter means."""
        return (
            (self.event_type is None or item.event_type == self.event_type)
            and (self.handler_name is None or item.handler_name == self.handler_name)
            and (self.reason is None or item.reason == self.reason)
            and (self.processed is None or item.processed == self.processed)
            and (self.created_after is None or item.created_at >= self.created_after)
            and (self.created_before is None or item.created_at < self.created_before)
            and (self.event_id is None or item.event_id == self.event_id)
            and (self.failure_group is None or item.failure_group == self.failure_group)
            and (self.service is None or item.service == self.service)
            and (self.cursor is None or (item.created_at, item.id) < self.cursor)
        )

    def narrowed(self, **changes: Any) -> DeadLetterFilter:
        """This filter with some fields replaced; ``created_before`` only ever moves earlier."""
        before = changes.get("created_before")
        if before is not None and self.created_before is not None:
            changes["created_before"] = min(before, self.created_before)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, JSON-ready (times as ISO 8601)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                out[f.name] = [value[0].isoformat(), value[1]]
            else:
                out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeadLetterFilter:
        """The filter ``to_dict`` wrote."""
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"unknown dead letter filter field {key!r}")
            if key in ("created_after", "created_before") and isinstance(value, str):
                value = _aware(datetime.fromisoformat(value))
            elif key == "cursor" and isinstance(value, list | tuple) and len(value) == 2:
                value = (_aware(datetime.fromisoformat(str(value[0]))), str(value[1]))
            values[key] = value
        return cls(**values)

    @classmethod
    def parse(cls, pairs: Mapping[str, str], now: datetime) -> DeadLetterFilter:
        """A filter from text, as the CLI's ``--filter key=value`` and the dashboard's
        query string give it. Keys: ``type``, ``handler``, ``reason``, ``processed``
        (true/false), ``since`` and ``until`` (ISO 8601 or an age: ``2h``), ``event_id``,
        ``group``, ``service``. Empty values are ignored."""
        values: dict[str, Any] = {}
        for key, text in pairs.items():
            name = _ALIASES.get(key.strip().lower())
            if name is None:
                raise ValueError(
                    f"unknown filter {key!r}: use type, handler, reason, processed, since, "
                    "until, event_id, group or service"
                )
            if text is None or not str(text).strip():
                continue
            text = str(text).strip()
            if name == "processed":
                values[name] = _parse_bool(key, text)
            elif name in ("created_after", "created_before"):
                values[name] = parse_moment(text, now)
            else:
                values[name] = text
        return cls(**values)

    def to_query(self) -> dict[str, str]:
        """The filter as the text pairs ``parse`` reads (for links and the CLI)."""
        names = {
            "event_type": "type",
            "handler_name": "handler",
            "reason": "reason",
            "processed": "processed",
            "created_after": "since",
            "created_before": "until",
            "event_id": "event_id",
            "failure_group": "group",
            "service": "service",
        }
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "cursor":
                continue
            if isinstance(value, bool):
                out[names[f.name]] = "true" if value else "false"
            elif isinstance(value, datetime):
                out[names[f.name]] = value.isoformat()
            else:
                out[names[f.name]] = str(value)
        return out


def filter_from(where: DeadLetterFilter | None, fields: Mapping[str, Any]) -> DeadLetterFilter:
    """``where`` narrowed by the filter fields given as keyword arguments (those
    that are None are left out); raises ``TypeError`` naming an unknown one."""
    if where is not None and not isinstance(where, DeadLetterFilter):
        raise TypeError(f"where must be a DeadLetterFilter, got {where!r}")
    unknown = sorted(set(fields) - set(FilterFields.__annotations__))
    if unknown:
        raise TypeError(
            f"unknown dead letter filter field(s) {', '.join(map(repr, unknown))}: "
            f"use {', '.join(sorted(FilterFields.__annotations__))}"
        )
    given = {name: value for name, value in fields.items() if value is not None}
    if where is None:
        return DeadLetterFilter(**given)
    return replace(where, **given) if given else where
