"""The SQLite store's statements: the named queries of ``queries.sql``, the dead
letter filter's ``WHERE``, and reading a cursor's rows by column name."""

from __future__ import annotations

import re
import sqlite3
from datetime import datetime
from typing import Any

from ..._filters import DeadLetterFilter
from .._codec import text_time
from .._queries import load_queries

__all__ = ["CHUNK", "Q", "dead_where", "dict_rows"]

#: the named queries, by name
Q = load_queries("queries.sql", __package__)
#: ids per ``IN (…)`` list, well under SQLite's limit on a statement's parameters
CHUNK = 500
_PARAMETER = re.compile(r":(\w+)")


def _filter_conditions() -> dict[str, str]:
    """The ``dead_filter`` block: the SQL condition of each DeadLetterFilter field,
    the field named by the condition's first parameter."""
    conditions: dict[str, str] = {}
    for line in Q["dead_filter"].splitlines():
        line = line.strip()
        if line and not line.startswith("--"):
            conditions[_PARAMETER.findall(line)[0]] = line
    if set(conditions) != set(DeadLetterFilter.__dataclass_fields__):
        raise RuntimeError("queries.sql: dead_filter must name every DeadLetterFilter field")
    return conditions


_DEAD_CONDITIONS = _filter_conditions()


def dead_where(where: DeadLetterFilter) -> tuple[str, dict[str, Any]]:
    """The ``{where}`` of the dead letter queries for ``where``, and its parameters."""
    conditions: list[str] = []
    params: dict[str, Any] = {}
    for name, condition in _DEAD_CONDITIONS.items():
        value = getattr(where, name)
        if value is None:
            continue
        conditions.append(condition)
        if isinstance(value, bool):
            params[name] = int(value)
        elif isinstance(value, datetime):
            params[name] = text_time(value)
        elif isinstance(value, tuple):  # the cursor: (created_at, id)
            params[name], params[f"{name}_id"] = text_time(value[0]), value[1]
        else:
            params[name] = value
    return " AND ".join(conditions) or "TRUE", params


def dict_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """The rest of ``cursor``'s rows, each a mapping of column name to value."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
