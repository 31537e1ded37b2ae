"""The MongoDB store's documents: a retry item, a dead letter or a control record as
a document, and back, on the record codec the engines share (``_stores._fields``).

The shared codec turns a record into its fields and fields into a record; here,
with times and JSON values left as Python has them, its fields are expanded into
a document (``id`` is ``_id``; a time and a JSON value become the fields below)
and a document is collapsed into fields again. Collapsing a retry item checks
each field's type, so that a damaged document raises and is dead-lettered as a
corrupt record; a dead letter is shown whatever it holds, with defaults.

Times. BSON datetimes keep milliseconds, retrybus keeps microseconds (jittered
schedules, event times). Each time field ``t`` is stored as a BSON datetime
(the time truncated to the millisecond: indexes, the TTL and other tools use
it) plus ``t_us``, the microseconds within that millisecond (0–999) that BSON
drops. Records read back equal the records written, and every comparison
(due, lease expired, older than) is exact: ``t < x`` is ``t < ms(x)`` or
``t == ms(x) and t_us < us(x)``. A document without ``t_us`` (written by
another tool) counts as ``t_us = 0``.

JSON values (event data, extensions, metadata) are stored as BSON values, so
they can be read and queried in place; a value BSON cannot hold as such (keys
with ``.``/``$``/NUL, integers beyond 64 bits) is stored as JSON text in
``<field>_json`` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ..._event import compact_json, encode_json
from ..._groups import failure_group_key
from ..._records import DeadLetterItem, RetryItem
from ..._services import DEFAULT_SERVICE, StoredSubscription, WorkerBeat
from .._fields import RecordCodec
from ..base import ControlRecord
from .common import Doc
from .queries import split_time

__all__ = [
    "control_from_document",
    "dead_letter_document",
    "dead_letter_from_document",
    "failure_group_of",
    "json_update",
    "read_time",
    "retry_document",
    "retry_from_document",
    "subscription_document",
    "subscription_from_document",
    "subscription_id",
    "time_fields",
    "worker_document",
    "worker_from_document",
]

_MAX_INT64 = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# the record fields stored as two document fields: ``t`` and ``t_us``
_TIME_FIELDS = frozenset(
    {
        "event_timestamp",
        "next_retry",
        "created_at",
        "updated_at",
        "lease_until",
        "processed_at",
        "first_failed_at",
    }
)
# the record fields holding JSON values: a BSON value, or JSON text in ``<name>_json``
_JSON_FIELDS = frozenset({"event_data", "event_extensions", "metadata"})


def _same(value: Any) -> Any:
    return value


# times and JSON values as Python has them: expanding and collapsing make them BSON
# (a None payload is JSON null, an event without data)
_CODEC = RecordCodec(
    write_time=_same, read_time=_same, write_json=_same, read_json=_same, native_json=True
)


# times -----------------------------------------------------------------------


def time_fields(name: str, moment: datetime | None) -> Doc:
    """The time field ``name`` holding ``moment``: the BSON datetime (milliseconds)
    and ``<name>_us`` (both None for no time)."""
    if moment is None:
        return {name: None, f"{name}_us": None}
    ms, extra = split_time(moment)
    return {name: ms, f"{name}_us": extra}


def read_time(doc: Mapping[str, Any], name: str) -> datetime:
    """The time stored in field ``name`` of ``doc`` (``time_fields``), to the
    microsecond; ``KeyError``, ``TypeError`` or ``ValueError`` when it is damaged."""
    value = doc[name]
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a date, got {value!r}")
    extra = doc.get(f"{name}_us") or 0
    if not isinstance(extra, int) or isinstance(extra, bool) or not 0 <= extra < 1000:
        raise ValueError(f"{name}_us must be an integer 0-999, got {extra!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value + timedelta(microseconds=extra)


def _time_or_none(doc: Mapping[str, Any], name: str) -> datetime | None:
    return None if doc.get(name) is None else read_time(doc, name)


def _lenient_time(doc: Mapping[str, Any], name: str) -> datetime | None:
    try:
        return _time_or_none(doc, name)
    except (TypeError, ValueError):
        return None


# JSON values -------------------------------------------------------------------


def _bson_safe(value: Any) -> bool:
    """Whether a JSON value is stored as the same BSON value and read back equal."""
    if value is None or isinstance(value, str | bool | float):
        return True
    if isinstance(value, int):
        return -_MAX_INT64 - 1 <= value <= _MAX_INT64
    if isinstance(value, list):
        return all(_bson_safe(item) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, str)
            and not key.startswith("$")
            and "." not in key
            and "\x00" not in key
            and _bson_safe(item)
            for key, item in value.items()
        )
    return False


def _json_fields(name: str, value: Any) -> Doc:
    if _bson_safe(value):
        return {name: value}
    return {name: None, f"{name}_json": compact_json(value)}


def json_update(name: str, value: Any) -> tuple[Doc, Doc]:
    """The ``$set`` and ``$unset`` parts of an update storing JSON ``value`` in
    field ``name`` (removing the ``<name>_json`` text an earlier value needed)."""
    fields = _json_fields(name, value)
    unset = {} if f"{name}_json" in fields else {f"{name}_json": ""}
    return fields, unset


def _json_value(doc: Mapping[str, Any], name: str, default: Any = ...) -> Any:
    text = doc.get(f"{name}_json")
    if text is not None:
        if not isinstance(text, str):
            raise TypeError(f"{name}_json must be JSON text, got {text!r}")
        return json.loads(text)
    if default is not ... and doc.get(name) is None:
        return default
    return doc[name]


def _object(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = _json_value(doc, name, {})
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be an object, got {value!r}")
    return value


# other fields ----------------------------------------------------------------------


def _text(doc: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = doc.get(name, default)
    if value is None and default is not None:
        value = default
    if value is None and name not in doc:
        raise KeyError(name)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def _text_or_empty(doc: Mapping[str, Any], name: str) -> str:
    return _text(doc, name, "")


def _optional_text(doc: Mapping[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def _int(doc: Mapping[str, Any], name: str) -> int:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _claims(doc: Mapping[str, Any], name: str) -> int:
    """A retry item's claim count: 0 when the field is missing (a document written
    before layout 2, or by an older process)."""
    value = doc.get(name)
    return 0 if value is None else _int(doc, name)


def _any_text(doc: Mapping[str, Any], name: str, default: str = "") -> str:
    """Field ``name`` if it is a string, else ``default`` (a dead letter is shown anyway)."""
    value = doc.get(name)
    return value if isinstance(value, str) else default


def _any_number(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


# records <-> documents -----------------------------------------------------------


def _document(fields: Mapping[str, Any]) -> Doc:
    """The document of a record's fields (``RecordCodec.retry_fields`` and kin)."""
    doc: Doc = {}
    for name, value in fields.items():
        if name == "id":
            doc["_id"] = value
        elif name in _TIME_FIELDS:
            doc.update(time_fields(name, value))
        elif name in _JSON_FIELDS:
            doc.update(_json_fields(name, value))
        else:
            doc[name] = value
    return doc


def retry_document(item: RetryItem) -> Doc:
    """The document that stores retry item ``item``."""
    return _document(_CODEC.retry_fields(item))


def dead_letter_document(item: DeadLetterItem) -> Doc:
    """The document that stores dead letter ``item``."""
    fields = _CODEC.dead_letter_fields(item)
    # failure_group follows reason, where stored documents have it
    group = fields.pop("failure_group")
    ordered: dict[str, Any] = {}
    for name, value in fields.items():
        ordered[name] = value
        if name == "reason":
            ordered["failure_group"] = group
    return _document(ordered)


# how each field of a stored retry item is read (the order of RETRY_FIELDS: the
# first damaged field names the problem)
_RETRY_READERS: dict[str, Callable[[Mapping[str, Any], str], Any]] = {
    "id": lambda doc, _: _text(doc, "_id"),
    "event_id": _text,
    "event_type": _text,
    "event_data": _json_value,
    "event_source": _text,
    "event_timestamp": read_time,
    "event_subject": _optional_text,
    "event_extensions": _object,
    "handler_name": _text,
    "error": _text_or_empty,
    "error_type": _text_or_empty,
    "traceback": _text_or_empty,
    "attempt": _int,
    "max_retries": _int,
    "next_retry": read_time,
    "created_at": read_time,
    "updated_at": read_time,
    "lease_owner": _optional_text,
    "lease_until": _time_or_none,
    "metadata": _object,
    "claims": _claims,
    # None when missing (a document written before layout 3, or by a layout-2
    # process): the codec reads it as the default service
    "service": lambda doc, name: doc.get(name),
}


def retry_from_document(doc: Mapping[str, Any]) -> RetryItem:
    """The retry item ``doc`` stores; raises (``KeyError``, ``TypeError``,
    ``ValueError``) when it is damaged: the caller dead-letters it."""
    return _CODEC.retry_item({name: read(doc, name) for name, read in _RETRY_READERS.items()})


def dead_letter_from_document(doc: Mapping[str, Any]) -> DeadLetterItem:
    """The dead letter ``doc`` stores; a damaged one (written by hand, say) is still
    shown, with defaults."""
    created_at = (
        read_time(doc, "created_at") if isinstance(doc.get("created_at"), datetime) else _EPOCH
    )
    metadata: dict[str, Any]
    try:
        data = _json_value(doc, "event_data", None)
        metadata = _object(doc, "metadata")
    except (TypeError, ValueError):
        data = doc.get("event_data_json", doc.get("event_data"))
        metadata = {"undecodable": True}
    try:
        extensions = _object(doc, "event_extensions")
    except (TypeError, ValueError):
        extensions = {}
    subject = doc.get("event_subject")
    return _CODEC.dead_letter(
        {
            "id": str(doc["_id"]),
            "event_id": _any_text(doc, "event_id"),
            "event_type": _any_text(doc, "event_type", "unknown"),
            "event_data": data,
            "event_source": _any_text(doc, "event_source"),
            "event_timestamp": _lenient_time(doc, "event_timestamp") or created_at,
            "event_subject": subject if isinstance(subject, str) else None,
            "event_extensions": extensions,
            "handler_name": _any_text(doc, "handler_name", "unknown"),
            "error": _any_text(doc, "error"),
            "error_type": _any_text(doc, "error_type"),
            "traceback": _any_text(doc, "traceback"),
            "attempt": _any_number(doc, "attempt"),
            "max_retries": _any_number(doc, "max_retries"),
            "reason": _any_text(doc, "reason"),
            "processed": doc.get("processed", False),
            "created_at": created_at,
            "processed_at": _lenient_time(doc, "processed_at"),
            "first_failed_at": _lenient_time(doc, "first_failed_at"),
            "metadata": metadata,
            "service": doc.get("service"),
        }
    )


def failure_group_of(doc: Mapping[str, Any]) -> str:
    """The failure group of a stored dead letter, as ``dead_letter_from_document``
    reads it (of its service: the default when it has none, or a damaged one)."""
    service = doc.get("service")
    return failure_group_key(
        _any_text(doc, "handler_name", "unknown"),
        _any_text(doc, "error_type"),
        _any_text(doc, "error"),
        service if isinstance(service, str) and service else DEFAULT_SERVICE,
    )


def control_from_document(doc: Mapping[str, Any]) -> ControlRecord:
    """The control record ``doc`` stores (``_id`` the key, ``version``, ``value``)."""
    value = _object(doc, "value")
    return ControlRecord(key=str(doc["_id"]), version=_int(doc, "version"), value=value)


# subscriptions and heartbeats -------------------------------------------------------


def subscription_id(service: str, handler_name: str) -> str:
    """The ``_id`` of a stored subscription: ``SERVICE/HANDLER`` (unambiguous: a
    service name holds no ``/``)."""
    return f"{service}/{handler_name}"


def subscription_document(subscription: StoredSubscription) -> Doc:
    """The document that stores ``subscription`` whole (times as ``time_fields``;
    ``details`` a JSON object, refused with ``TypeError`` when it is not JSON)."""
    details = json.loads(
        encode_json(dict(subscription.details), f"details of {subscription.handler_name}")
    )
    return {
        "_id": subscription_id(subscription.service, subscription.handler_name),
        "service": subscription.service,
        "handler_name": subscription.handler_name,
        "patterns": list(subscription.patterns),
        "policy": subscription.policy,
        "max_retries": subscription.max_retries,
        "handler_timeout": subscription.handler_timeout,
        **time_fields("registered_at", subscription.registered_at),
        **time_fields("updated_at", subscription.updated_at),
        **time_fields("removed_at", subscription.removed_at),
        "removed_by": subscription.removed_by,
        "revision": subscription.revision,
        **_json_fields("details", details),
    }


def subscription_from_document(doc: Mapping[str, Any]) -> StoredSubscription:
    """The subscription ``doc`` stores (``subscription_document``)."""
    timeout = doc.get("handler_timeout")
    return StoredSubscription(
        service=_text(doc, "service"),
        handler_name=_text(doc, "handler_name"),
        patterns=tuple(doc.get("patterns") or ()),
        policy=_text_or_empty(doc, "policy"),
        max_retries=_int(doc, "max_retries"),
        handler_timeout=None if timeout is None else float(timeout),
        registered_at=read_time(doc, "registered_at"),
        updated_at=read_time(doc, "updated_at"),
        removed_at=_time_or_none(doc, "removed_at"),
        removed_by=_optional_text(doc, "removed_by"),
        revision=_int(doc, "revision"),
        details=_object(doc, "details"),
    )


def worker_document(beat: WorkerBeat) -> Doc:
    """The document that stores heartbeat ``beat`` (``_id`` the worker's name)."""
    return {
        "_id": beat.name,
        "service": beat.service,
        "host": beat.host,
        "pid": beat.pid,
        **time_fields("started_at", beat.started_at),
        **time_fields("last_seen", beat.last_seen),
        "interval": beat.interval,
        "lanes": beat.lanes,
        "lanes_busy": beat.lanes_busy,
        "handlers": list(beat.handlers),
        "version": beat.version,
    }


def worker_from_document(doc: Mapping[str, Any]) -> WorkerBeat:
    """The heartbeat ``doc`` stores (``worker_document``)."""
    return WorkerBeat(
        name=str(doc["_id"]),
        service=_text(doc, "service"),
        host=_text_or_empty(doc, "host"),
        pid=_int(doc, "pid"),
        started_at=read_time(doc, "started_at"),
        last_seen=read_time(doc, "last_seen"),
        interval=float(doc["interval"]),
        lanes=_int(doc, "lanes"),
        lanes_busy=_int(doc, "lanes_busy"),
        handlers=tuple(doc.get("handlers") or ()),
        version=_text_or_empty(doc, "version"),
    )
