"""The SQLite store's statements: the named queries of ``queries.sql``, the dead
letter filter's ``WHERE``, and reading a cursor's rows by column name."""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from datetime import datetime
from typing import Any

from ..._filters import DeadLetterFilter
from .._codec import text_time
from .._queries import load_queries

__all__ = [
    "CHUNK",
    "MAX_HANDLER_ARMS",
    "Q",
    "dead_where",
    "dict_rows",
    "handler_query",
    "service_query",
]

#: the named queries, by name
Q = load_queries("queries.sql", __package__)
# every claim and next_due query holds back a keyed record behind an earlier one
# of its key: one condition, written once (its comments left out)
_IN_TURN = " ".join(
    line for line in Q["in_turn"].splitlines() if not line.lstrip().startswith("--")
)
Q = {name: query.replace("{in_turn}", _IN_TURN) for name, query in Q.items()}
#: ids per ``IN (…)`` list, well under SQLite's limit on a statement's parameters
CHUNK = 500
#: handlers a worker may name and still get one seek-and-stop arm each (a UNION ALL
#: of that many subqueries, well under SQLite's 500 terms of a compound SELECT);
#: beyond, one ``IN`` over all of them, read whole and sorted
MAX_HANDLER_ARMS = 64
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


def service_query(
    query: str, params: dict[str, Any], service: str | None, *, condition: str
) -> str:
    """Query ``query`` with its ``{service}`` slot filled: ``condition`` (on
    ``:service``, bound in ``params``) for one service, ``TRUE`` for any (None)."""
    if service is None:
        return query.replace("{service}", "TRUE")
    params["service"] = service
    return query.replace("{service}", condition)


def handler_query(
    query: str,
    arm: str,
    many: str,
    handlers: list[str],
    params: dict[str, Any],
    service: str | None,
) -> str:
    """Query ``query`` with its ``{due}``/``{first}`` slot filled for ``handlers`` (at
    least one, no repeats) of ``service``: one ``arm`` per handler (its name bound
    as ``:h0``, ``:h1``…, added to ``params``) joined with ``UNION ALL``, or
    ``many`` for more than ``MAX_HANDLER_ARMS``. ``params`` gets ``:handlers``,
    their JSON array, either way, and ``:service`` when named. Each arm's ``{service}`` is
    ``service = :service``, or for any service (None) every service the queue
    holds (``queued_services``, put before the query); the query's
    ``{leased_service}`` is ``+service = :service``, or ``TRUE``. The text
    depends only on how many handlers there are and whether a service is named,
    so that a worker's statements stay in the connection's statement cache."""
    params["handlers"] = json.dumps(handlers)
    any_service = service is None
    if not any_service:
        params["service"] = service
    if len(handlers) > MAX_HANDLER_ARMS:
        return _filled(query, many, 0, any_service)
    for n, handler in enumerate(handlers):
        params[f"h{n}"] = handler
    return _filled(query, arm, len(handlers), any_service)


@functools.lru_cache(maxsize=64)
def _filled(query: str, part: str, arms: int, any_service: bool) -> str:
    """``query`` with ``part`` (its comments left out) in its slot: ``arms`` copies
    of it, the n-th naming ``:h{n}``, or ``part`` alone for 0; and the service's
    conditions (``handler_query``)."""
    code = "\n".join(line for line in part.splitlines() if not line.lstrip().startswith("--"))
    if any_service:
        code = code.replace("{service}", "service IN (SELECT name FROM queued_services)")
        query = Q["queued_services"] + "\n" + query.replace("{leased_service}", "TRUE")
    else:
        code = code.replace("{service}", "service = :service")
        query = query.replace("{leased_service}", "+service = :service")
    filled = (
        "\nUNION ALL\n".join(code.replace("{n}", str(n)) for n in range(arms)) if arms else code
    )
    return query.replace("{due}", filled).replace("{first}", filled)


def dict_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """The rest of ``cursor``'s rows, each a mapping of column name to value."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
