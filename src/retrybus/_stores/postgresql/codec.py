"""The PostgreSQL store's record encoding: retry items and dead letters as the
columns of ``retry_queue`` and ``dead_letter_queue``, and rows back as records.

It is the shared ``RecordCodec`` told how this engine keeps values: times as
aware datetimes (asyncpg's ``timestamptz``), JSON values as JSON text (asyncpg
takes and returns ``json`` and ``jsonb`` columns as text) and ``processed`` as a
boolean. Column order is that of ``RETRY_FIELDS`` and ``DEAD_LETTER_FIELDS``
(``service`` last: the column version 6 of the schema added).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from ..._records import DeadLetterItem, RetryItem
from .._fields import DEAD_LETTER_FIELDS, RETRY_FIELDS, RecordCodec
from .sql import aware

__all__ = [
    "CODEC",
    "dead_letter_columns",
    "dead_letter_values",
    "retry_columns",
    "retry_values",
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
