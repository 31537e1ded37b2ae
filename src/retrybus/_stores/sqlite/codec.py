"""The SQLite store's record encoding: the shared ``RecordCodec`` with times as
fixed-width ISO text (so that they sort), JSON as compact text and flags as 0/1."""

from __future__ import annotations

import json
from typing import Any

from ..._event import compact_json
from .._codec import parse_text_time, text_time
from .._fields import RecordCodec

__all__ = ["CODEC"]


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
