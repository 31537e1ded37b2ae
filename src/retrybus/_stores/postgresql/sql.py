"""What every part of the PostgreSQL store shares: its named queries and the small
helpers around them (command status row counts, aware times, quoted identifiers).

The queries are those of ``queries.sql``, loaded once per process.
"""

from __future__ import annotations

from datetime import datetime

from .._queries import load_queries

__all__ = ["Q", "affected", "aware", "aware_or_none", "quote"]

#: the named queries of ``queries.sql``
Q = load_queries("queries.sql", __package__)
# every claim and next_due query holds back a keyed record behind an earlier one
# of its key: one condition, written once (its comments left out)
_IN_TURN = " ".join(
    line for line in Q["in_turn"].splitlines() if not line.lstrip().startswith("--")
)
Q = {name: query.replace("{in_turn}", _IN_TURN) for name, query in Q.items()}


def affected(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3`` or ``DELETE 0``."""
    return int(status.rsplit(" ", 1)[-1])


def aware(moment: datetime) -> datetime:
    """``moment`` itself, or ``ValueError`` when it has no time zone."""
    if moment.tzinfo is None:
        raise ValueError(f"stored times must be timezone-aware, got {moment!r}")
    return moment


def aware_or_none(moment: datetime | None) -> datetime | None:
    """``aware(moment)``, None passing through."""
    return None if moment is None else aware(moment)


def quote(identifier: str) -> str:
    """``identifier`` as a quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'
