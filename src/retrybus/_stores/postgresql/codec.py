"""The PostgreSQL store's record encoding: retry items and dead letters as the
columns of ``retry_queue`` and ``dead_letter_queue``, and rows back as records;
and the rows of the services' tables (a stored subscription, a worker's beat).

It is the shared ``RecordCodec`` told how this engine keeps values: times as
aware datetimes (asyncpg's ``timestamptz``), JSON values as JSON text (asyncpg
takes and returns ``json`` and ``jsonb`` columns as text) and ``processed`` as a
boolean. Column order is that of ``RETRY_FIELDS`` and ``DEAD_LETTER_FIELDS``
(``service`` last: the column version 6 of the schema added).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from ..._event import compact_json, encode_json
from ..._records import DeadLetterItem, RetryItem
from ..._services import StoredSubscription, WorkerBeat
from .._fields import DEAD_LETTER_FIELDS, RETRY_FIELDS, RecordCodec
from .sql import aware

__all__ = [
    "CODEC",
    "beat_values",
    "dead_letter_columns",
    "dead_letter_values",
    "retry_columns",
    "retry_values",
    "stored_subscription",
    "subscription_columns",
    "worker_beat",
]


def _stored_time(value: Any) -> datetime:
    # a required time may still be NULL in a damaged retry_queue row
    # (event_timestamp is nullable): that row must not decode
    if not isinstance(value, datetime):
        raise ValueError(f"expected a stored time, got {value!r}")
    return value


def _read_json(text: Any) -> Any:
    # most records have no extensions and no metadata: "{}" skips the parser
    # (two calls fewer per claimed item, a measurable share of a worker's CPU)
    return {} if text == "{}" else json.loads(text)


#: how this engine writes and reads a record's times, JSON values and flag
CODEC = RecordCodec(write_time=aware, read_time=_stored_time, read_json=_read_json, write_flag=bool)

# the columns of this engine's tables: all the codec's fields
_RETRY_COLUMNS = RETRY_FIELDS
_DEAD_LETTER_COLUMNS = DEAD_LETTER_FIELDS


def retry_values(item: RetryItem) -> list[Any]:
    """``item``'s column values, in the order of ``retry_queue``'s columns."""
    fields = CODEC.retry_fields(item)
    return [fields[name] for name in _RETRY_COLUMNS]


def dead_letter_values(item: DeadLetterItem) -> list[Any]:
    """``item``'s column values, in the order of ``dead_letter_queue``'s columns
    (``failure_group`` and ``service`` last: the columns versions 2 and 6 of the
    schema added)."""
    fields = CODEC.dead_letter_fields(item)
    return [fields[name] for name in _DEAD_LETTER_COLUMNS]


def retry_columns(items: Sequence[RetryItem]) -> list[list[Any]]:
    """The items as one array per ``retry_queue`` column (the parameters of an
    insert from ``unnest``); 22 empty arrays for no items (``claims`` and
    ``service`` last: the columns versions 4 and 6 of the schema added)."""
    return _columns(map(retry_values, items), len(_RETRY_COLUMNS))


def dead_letter_columns(items: Sequence[DeadLetterItem]) -> list[list[Any]]:
    """The dead letters as one array per ``dead_letter_queue`` column, likewise (22)."""
    return _columns(map(dead_letter_values, items), len(_DEAD_LETTER_COLUMNS))


def _columns(rows: Iterable[list[Any]], width: int) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


# the services' tables ----------------------------------------------------------


def subscription_columns(
    puts: Sequence[tuple[StoredSubscription, datetime]],
) -> list[list[Any]]:
    """The subscriptions written whole by ``write_subscriptions``, each with its
    ``registered_at``, as one array per column (``$4..$10``): handler_name,
    patterns, policy, max_retries, handler_timeout, registered_at, details (only
    their terms: the store sets the other times and the revision)."""
    rows = (
        [
            terms.handler_name,
            compact_json(list(terms.patterns)),
            terms.policy,
            terms.max_retries,
            terms.handler_timeout,
            aware(registered_at),
            encode_json(dict(terms.details), f"details of {terms.handler_name}"),
        ]
        for terms, registered_at in puts
    )
    return _columns(rows, 7)


def stored_subscription(row: Mapping[str, Any]) -> StoredSubscription:
    """The subscription a ``retrybus_subscriptions`` row holds."""
    timeout = row["handler_timeout"]
    return StoredSubscription(
        service=row["service"],
        handler_name=row["handler_name"],
        patterns=tuple(json.loads(row["patterns"])),
        policy=row["policy"],
        max_retries=int(row["max_retries"]),
        handler_timeout=None if timeout is None else float(timeout),
        registered_at=row["registered_at"],
        updated_at=row["updated_at"],
        removed_at=row["removed_at"],
        removed_by=row["removed_by"],
        revision=int(row["revision"]),
        details=_read_json(row["details"]),
    )


def beat_values(beat: WorkerBeat) -> list[Any]:
    """The parameters of ``beat`` (the query) for ``beat``, in its columns' order."""
    return [
        beat.name,
        beat.service,
        beat.host,
        beat.pid,
        aware(beat.started_at),
        aware(beat.last_seen),
        beat.interval,
        beat.lanes,
        beat.lanes_busy,
        compact_json(list(beat.handlers)),
        beat.version,
    ]


def worker_beat(row: Mapping[str, Any]) -> WorkerBeat:
    """The heartbeat a ``retrybus_workers`` row holds."""
    return WorkerBeat(
        name=row["name"],
        service=row["service"],
        host=row["host"],
        pid=int(row["pid"]),
        started_at=row["started_at"],
        last_seen=row["last_seen"],
        interval=float(row["interval"]),
        lanes=int(row["lanes"]),
        lanes_busy=int(row["lanes_busy"]),
        handlers=tuple(json.loads(row["handlers"])),
        version=row["version"],
    )
