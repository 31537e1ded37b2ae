"""Encoding shared by the engines: times as sortable ISO text, and damaged rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from .._outcomes import CorruptRecord
from .._records import RetryItem


def text_time(moment: datetime) -> str:
    """An aware time as ISO 8601 text in UTC with microseconds: fixed width, so it sorts."""
    zone = moment.tzinfo
    if zone is not UTC:
        if zone is None:
            raise ValueError(f"stored times must be timezone-aware, got {moment!r}")
        if moment.utcoffset():
            moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")


def text_time_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else text_time(moment)


def parse_text_time(text: str) -> datetime:
    """The aware time ``text_time`` wrote."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"stored time {text!r} has no UTC offset")
    return moment


def parse_text_time_or_none(text: str | None) -> datetime | None:
    return None if text is None else parse_text_time(text)


def decode_or_corrupt(
    row: Mapping[str, Any],
    decode: Callable[[Mapping[str, Any]], RetryItem],
    *,
    id_field: str = "id",
) -> RetryItem | CorruptRecord:
    """``decode(row)``, or, when it fails, the row as a ``CorruptRecord`` that the
    caller dead-letters with the reason (its fields kept as text)."""
    try:
        return decode(row)
    except Exception as exc:  # any decoding failure makes the record a dead letter
        raw = {key: None if value is None else str(value) for key, value in row.items()}
        if id_field != "id":
            raw["id"] = raw.pop(id_field, None)
        problem = f"{type(exc).__name__}: {exc}"
        return CorruptRecord(id=str(row.get(id_field)), raw=raw, problem=problem)
