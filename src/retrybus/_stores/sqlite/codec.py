"""The SQLite store's record encoding: the shared ``RecordCodec`` with times as
fixed-width ISO text (so that they sort), JSON as compact text and flags as 0/1."""

from __future__ import annotations

import json
from typing import Any

from ..._event import compact_json
from ..._records import RetryItem
from .._codec import parse_text_time, text_time
from .._fields import RecordCodec

__all__ = ["CODEC", "reschedule_fields"]


def _read_json(text: str | bytes) -> Any:
    if text == "{}":  # most extensions and metadata: no parse
        return {}
    return json.loads(text)


#: a retry item or a dead letter as the columns of its table (``retry_fields``,
#: ``dead_letter_fields``), and a row back (``retry_item``, ``dead_letter``)
CODEC = RecordCodec(
    write_time=text_time,
    read_time=parse_text_time,
    write_json=compact_json,
    read_json=_read_json,
    write_flag=int,
)


def reschedule_fields(item: RetryItem) -> dict[str, Any]:
    """What a reschedule changes in ``item``'s row (the ``reschedule`` query's
    parameters, without the fencing ones)."""
    return {
        "id": item.id,
        "attempt": item.attempt,
        "next_retry": text_time(item.next_retry),
        "error": item.error,
        "error_type": item.error_type,
        "traceback": item.traceback,
        "updated_at": text_time(item.updated_at),
        "metadata": compact_json(dict(item.metadata)),
    }
