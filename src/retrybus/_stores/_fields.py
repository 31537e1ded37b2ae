"""The one record codec every engine shares: a retry item or a dead letter as a
flat mapping of named fields, and back. An engine says only how it keeps a time,
a JSON value and a flag (ISO text or ``timestamptz``, JSON text or a document,
0/1 or a boolean); the field names, their order, what is required and how a
damaged dead letter is still shown are decided here once.

``service`` (issue 12) comes last in both records, where a column added to a
table goes. A record without it (a row or document written before services)
reads as one of the default service."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .._event import compact_json
from .._records import DeadLetterItem, RetryItem
from .._services import DEFAULT_SERVICE, is_service_name

__all__ = ["DEAD_LETTER_FIELDS", "RETRY_FIELDS", "RecordCodec", "json_object"]

#: a retry item's fields, in the order of the SQL engines' columns
RETRY_FIELDS: tuple[str, ...] = (
    "id",
    "event_id",
    "event_type",
    "event_data",
    "event_source",
    "event_timestamp",
    "event_subject",
    "event_extensions",
    "handler_name",
    "error",
    "error_type",
    "traceback",
    "attempt",
    "max_retries",
    "next_retry",
    "created_at",
    "updated_at",
    "lease_owner",
    "lease_until",
    "metadata",
    "claims",
    "service",
)

#: a dead letter's fields (with its failure group, stored for filtering), likewise
DEAD_LETTER_FIELDS: tuple[str, ...] = (
    "id",
    "event_id",
    "event_type",
    "event_data",
    "event_source",
    "event_timestamp",
    "event_subject",
    "event_extensions",
    "handler_name",
    "error",
    "error_type",
    "traceback",
    "attempt",
    "max_retries",
    "reason",
    "processed",
    "created_at",
    "processed_at",
    "first_failed_at",
    "metadata",
    "failure_group",
    "service",
)

_REQUIRED = ("event_id", "event_type", "event_data", "event_source", "handler_name")


def _same(value: Any) -> Any:
    return value


def json_object(value: Any) -> dict[str, Any]:
    """A JSON object: the text of one, or one already decoded; else ``ValueError``."""
    if isinstance(value, str):
        value = {} if value == "{}" else json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {str(value)[:80]!r}")
    return value


def _service(row: Mapping[str, Any]) -> str:
    """A record's service: the default when it has none (missing, or NULL)."""
    value = row.get("service")
    if value is None:
        return DEFAULT_SERVICE
    if not is_service_name(value):
        raise ValueError(f"service is not a service name: {str(value)[:80]!r}")
    return value


def _object(value: Any) -> dict[str, Any]:
    """A decoded JSON value that must be an object (a string is not decoded again)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {str(value)[:80]!r}")
    return value


@dataclass(frozen=True, slots=True)
class RecordCodec:
    """How one engine keeps a record's times, JSON values and flag; with it, a
    record to its fields (``retry_fields``, ``dead_letter_fields``) and back
    (``retry_item``, ``dead_letter``). The defaults keep each value as Python
    has it (an engine whose driver takes datetimes and documents)."""

    write_time: Callable[[datetime], Any] = _same
    read_time: Callable[[Any], datetime] = _same
    write_json: Callable[[Any], Any] = compact_json
    read_json: Callable[[Any], Any] = json.loads
    write_flag: Callable[[bool], Any] = bool
    #: True where JSON values are kept natively, so that None is JSON's null (a
    #: payload of None); False where they are text, so that None is a missing field
    native_json: bool = False

    def _time_or_none(self, moment: datetime | None) -> Any:
        return None if moment is None else self.write_time(moment)

    def _parsed_time_or_none(self, value: Any) -> datetime | None:
        return None if value is None else self.read_time(value)

    def retry_fields(self, item: RetryItem) -> dict[str, Any]:
        """``item`` as the engine stores it, field by field (``RETRY_FIELDS``)."""
        write_time = self.write_time
        # a new record's times are mostly one moment: written once
        created_at = write_time(item.created_at)
        return {
            "id": item.id,
            "event_id": item.event_id,
            "event_type": item.event_type,
            "event_data": self.write_json(item.event_data),
            "event_source": item.event_source,
            "event_timestamp": write_time(item.event_timestamp),
            "event_subject": item.event_subject,
            "event_extensions": self.write_json(dict(item.event_extensions)),
            "handler_name": item.handler_name,
            "error": item.error,
            "error_type": item.error_type,
            "traceback": item.traceback,
            "attempt": item.attempt,
            "max_retries": item.max_retries,
            "next_retry": (
                created_at if item.next_retry is item.created_at else write_time(item.next_retry)
            ),
            "created_at": created_at,
            "updated_at": (
                created_at if item.updated_at is item.created_at else write_time(item.updated_at)
            ),
            "lease_owner": item.lease_owner,
            "lease_until": self._time_or_none(item.lease_until),
            "metadata": self.write_json(dict(item.metadata)),
            "claims": item.claims,
            "service": item.service,
        }

    def dead_letter_fields(self, item: DeadLetterItem) -> dict[str, Any]:
        """``item`` as the engine stores it, field by field (``DEAD_LETTER_FIELDS``)."""
        return {
            "id": item.id,
            "event_id": item.event_id,
            "event_type": item.event_type,
            "event_data": self.write_json(item.event_data),
            "event_source": item.event_source,
            "event_timestamp": self.write_time(item.event_timestamp),
            "event_subject": item.event_subject,
            "event_extensions": self.write_json(dict(item.event_extensions)),
            "handler_name": item.handler_name,
            "error": item.error,
            "error_type": item.error_type,
            "traceback": item.traceback,
            "attempt": item.attempt,
            "max_retries": item.max_retries,
            "reason": item.reason,
            "processed": self.write_flag(item.processed),
            "created_at": self.write_time(item.created_at),
            "processed_at": self._time_or_none(item.processed_at),
            "first_failed_at": self._time_or_none(item.first_failed_at),
            "metadata": self.write_json(dict(item.metadata)),
            "failure_group": item.failure_group,
            "service": item.service,
        }

    def retry_item(self, row: Mapping[str, Any]) -> RetryItem:
        """The retry item ``row`` holds; raises (``KeyError``, ``ValueError``,
        ``TypeError``) when it is damaged: the caller dead-letters it. A row
        without ``service`` (or with NULL) is a default-service record."""
        for name in _REQUIRED:
            if row[name] is None and not (name == "event_data" and self.native_json):
                raise ValueError(f"{name} is missing")
        return RetryItem(
            id=str(row["id"]),
            event_id=row["event_id"],
            event_type=row["event_type"],
            event_data=self.read_json(row["event_data"]),
            event_source=row["event_source"],
            event_timestamp=self.read_time(row["event_timestamp"]),
            event_subject=row["event_subject"],
            event_extensions=_object(self._decoded(row["event_extensions"])),
            handler_name=row["handler_name"],
            error=row["error"] or "",
            error_type=row["error_type"] or "",
            traceback=row["traceback"] or "",
            attempt=int(row["attempt"]),
            max_retries=int(row["max_retries"]),
            next_retry=self.read_time(row["next_retry"]),
            created_at=self.read_time(row["created_at"]),
            updated_at=self.read_time(row["updated_at"]),
            lease_owner=row["lease_owner"],
            lease_until=self._parsed_time_or_none(row["lease_until"]),
            metadata=_object(self._decoded(row["metadata"])),
            claims=int(row.get("claims") or 0),
            service=_service(row),
        )

    def dead_letter(self, row: Mapping[str, Any]) -> DeadLetterItem:
        """The dead letter ``row`` holds. One whose payload or metadata cannot be
        decoded is still shown: its payload as the stored text, and
        ``metadata == {"undecodable": True}``; one whose service is damaged, as
        one of the default service. A row without ``service`` (or with NULL) is
        a default-service dead letter."""
        metadata: dict[str, Any]
        try:
            service = _service(row)
        except ValueError:
            service = DEFAULT_SERVICE
        try:
            data = None if row["event_data"] is None else self.read_json(row["event_data"])
            metadata = _object(self._decoded(row["metadata"]))
        except ValueError:
            data = row["event_data"]
            metadata = {"undecodable": True}
        return DeadLetterItem(
            id=str(row["id"]),
            event_id=row["event_id"],
            event_type=row["event_type"],
            event_data=data,
            event_source=row["event_source"],
            event_timestamp=self.read_time(row["event_timestamp"]),
            event_subject=row["event_subject"],
            event_extensions=_object(self._decoded(row["event_extensions"])),
            handler_name=row["handler_name"],
            error=row["error"] or "",
            error_type=row["error_type"] or "",
            traceback=row["traceback"] or "",
            attempt=int(row["attempt"]),
            max_retries=int(row["max_retries"] or 0),
            reason=row["reason"],
            processed=bool(row["processed"]),
            created_at=self.read_time(row["created_at"]),
            processed_at=self._parsed_time_or_none(row["processed_at"]),
            first_failed_at=self._parsed_time_or_none(row["first_failed_at"]),
            metadata=metadata,
            service=service,
        )

    def _decoded(self, value: Any) -> Any:
        """A stored JSON object: text goes through ``read_json`` (the empty object,
        the usual case, without it); a document as it is."""
        if value == "{}":
            return {}
        return self.read_json(value) if isinstance(value, str | bytes) else value
