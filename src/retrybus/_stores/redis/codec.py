"""The Redis store's record encoding: a retry item or a dead letter as one JSON
document, a dead letter's index entry, and times as sorted set scores.

A record holds the shared codec's fields (``RecordCodec``) with times as ISO text
and JSON values kept as values, dumped once. A retry item's record starts with
``attempt``, ``id``, ``handler_name`` and ``event_type``, in this order: the scripts
``complete``, ``claim_due`` and ``group_retry`` read them with an anchored pattern,
without decoding the record. Its lease is not in it (``P:retry:claims``,
``P:retry:leased``), nor its claims count (``P:retry:claim_count``, which a claim
changes without rewriting the record; none there is 0, as for every record of the
layouts before 3); a dead letter's failure group is in its index entry
(``P:dead:index``), not in its record. Records written before must still read back:
keep the names and the order.

A record's ``service`` is its last field, written only when it is not the default
(key layout 4): a record without it is of the default service, as every record of
the layouts before 4 is, and a process of layout 3 reads a default-service record
written now exactly as it reads its own. The scripts read a retry item's service
from the end of its record (``service_of`` in ``scripts.lua``). A dead letter's
index entry ends with its service, always written.

A lane (``lane``) names the due set of one handler of one service: the handler's
name for the default service (the due set layout 3 keeps for it), the service's
name, NUL and the handler's name for another (no handler name holds a NUL).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ..._event import compact_json
from ..._outcomes import CorruptRecord
from ..._records import DeadLetterItem, RetryItem
from ..._services import DEFAULT_SERVICE
from .._codec import parse_text_time, text_time
from .._fields import DEAD_LETTER_FIELDS, RETRY_FIELDS, RecordCodec
from .common import text

__all__ = [
    "CODEC",
    "DEAD_RECORD_FIELDS",
    "EPOCH",
    "RETRY_RECORD_FIELDS",
    "STAMP",
    "dead_json",
    "dead_letter",
    "dead_texts",
    "decode_retry",
    "from_score",
    "lane",
    "retry_from_reply",
    "retry_json",
    "split_lane",
    "strict",
    "to_score",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: characters of a claim time (ISO, UTC, microseconds) at the start of a
#: ``P:retry:claims`` value; the lease owner follows
STAMP = 32


# times -------------------------------------------------------------------------


def to_score(moment: datetime) -> str:
    """Epoch seconds as the text of a float: distinct microseconds give distinct,
    ordered floats (until the year 2255), and ``from_score`` gives the time back."""
    if moment.tzinfo is None:
        raise ValueError(f"stored times must be timezone-aware, got {moment!r}")
    return repr(((moment - EPOCH) // _MICROSECOND) / 1e6)


def from_score(score: str | bytes) -> datetime:
    """The time ``to_score`` wrote as ``score``."""
    return EPOCH + timedelta(microseconds=round(float(score) * 1e6))


# lanes -------------------------------------------------------------------------


def lane(service: str, handler_name: str) -> str:
    """The lane of ``service``'s handler ``handler_name`` (see the module)."""
    return handler_name if service == DEFAULT_SERVICE else f"{service}\0{handler_name}"


def split_lane(name: str) -> tuple[str, str]:
    """The service and the handler name of lane ``name``."""
    service, nul, handler_name = name.partition("\0")
    return (service, handler_name) if nul else (DEFAULT_SERVICE, name)


# the codec ---------------------------------------------------------------------


def _as_is(value: Any) -> Any:
    return value


def _read_time(value: Any) -> datetime:
    # a lease's end comes as a datetime (the caller's, or from its score); the
    # record's times are text
    return value if isinstance(value, datetime) else parse_text_time(value)


#: a retry item or a dead letter as the fields of its JSON record, and back
CODEC = RecordCodec(
    write_time=text_time,
    read_time=_read_time,
    write_json=_as_is,
    read_json=_as_is,
    write_flag=bool,
    native_json=True,  # a null payload is JSON null in the record
)

# first, in this order: the scripts read them without decoding the record (codec docstring)
_FRONT = ("attempt", "id", "handler_name", "event_type")
# kept beside the record (the scripts change them without rewriting it)
_BESIDE = ("lease_owner", "lease_until", "claims")
# last, and only when not the default (the module): the scripts read it from the end
_SERVICE = "service"
#: a retry item record's fields, in the order they are written (``service`` only
#: when it is not the default)
RETRY_RECORD_FIELDS: tuple[str, ...] = (
    *_FRONT,
    *(
        name
        for name in RETRY_FIELDS
        if name not in _FRONT and name not in _BESIDE and name != _SERVICE
    ),
    _SERVICE,
)
#: a dead letter record's fields, in the order they are written (``service`` only
#: when it is not the default)
DEAD_RECORD_FIELDS: tuple[str, ...] = (
    *(name for name in DEAD_LETTER_FIELDS if name not in ("failure_group", _SERVICE)),
    _SERVICE,
)
_RETRY_WRITTEN = RETRY_RECORD_FIELDS[:-1]
_DEAD_WRITTEN = DEAD_RECORD_FIELDS[:-1]

# the fields checked for text when reading: JSON has no schema to do it
_TEXT = ("id", "event_id", "event_type", "event_source", "handler_name")
_RETRY_TEXT = (*_TEXT, "error", "error_type", "traceback")
_DEAD_TEXT = (*_RETRY_TEXT, "reason")


def _row(record: Any, defaults: dict[str, Any], texts: tuple[str, ...]) -> dict[str, Any]:
    """A decoded record as the codec reads it: ``defaults`` for the fields it may
    lack, and its text and object fields checked."""
    if not isinstance(record, dict):
        raise ValueError(f"the record is not a JSON object: {record!r:.80}")
    row = defaults | record
    for name in texts:
        if not isinstance(row[name], str):
            raise ValueError(f"{name} is not a string: {row[name]!r:.80}")
    subject = row["event_subject"]
    if subject is not None and not isinstance(subject, str):
        raise ValueError(f"event_subject is not a string: {subject!r:.80}")
    for name in ("event_extensions", "metadata"):
        if not isinstance(row[name], dict):
            raise ValueError(f"{name} is not a JSON object: {row[name]!r:.80}")
    return row


# retry items -------------------------------------------------------------------


def retry_json(item: RetryItem) -> str:
    """``item``'s record (everything but the lease and the claims count)."""
    fields = CODEC.retry_fields(item)
    record = {name: fields[name] for name in _RETRY_WRITTEN}
    if item.service != DEFAULT_SERVICE:
        record[_SERVICE] = item.service
    return compact_json(record)


def decode_retry(
    item_id: str,
    record_text: str,
    owner: str | None = None,
    lease_until: datetime | None = None,
    touched: str | None = None,
    claims: int = 0,
) -> RetryItem | CorruptRecord:
    """The item stored as ``record_text`` (leased to ``owner`` until ``lease_until``,
    last claimed at ``touched``, its ``updated_at``, claimed ``claims`` times since its
    last outcome), or a ``CorruptRecord`` saying why it cannot be."""
    record: Any = None
    try:
        record = json.loads(record_text)
        row = _row(
            record,
            {
                "event_subject": None,
                "event_extensions": {},
                "error": "",
                "error_type": "",
                "traceback": "",
                "metadata": {},
            },
            _RETRY_TEXT,
        )
        if touched is not None:
            row["updated_at"] = touched
        row["lease_owner"] = owner
        row["lease_until"] = lease_until
        row["claims"] = claims
        return CODEC.retry_item(row)
    except Exception as exc:  # any decoding failure makes the record a dead letter
        if isinstance(record, dict):
            raw = {
                str(key): None if value is None else _raw_text(value)
                for key, value in record.items()
            }
            raw.setdefault("id", item_id)
        else:
            raw = {"id": item_id, "record": record_text}
        return CorruptRecord(id=item_id, raw=raw, problem=f"{type(exc).__name__}: {exc}")


def _raw_text(value: Any) -> str:
    return value if isinstance(value, str) else compact_json(value)


def retry_from_reply(reply: Sequence[Any]) -> list[RetryItem | CorruptRecord]:
    """Items from a ``fetch_retry``-shaped reply: (id, json, claim, lease_until, claims)
    each, a claim being the claim's time (``STAMP`` characters) and the lease owner, if
    any; claims None when there is none."""
    items: list[RetryItem | CorruptRecord] = []
    for start in range(0, len(reply), 5):
        item_id, record_text, claim, lease, claims = reply[start : start + 5]
        if record_text is None:
            continue
        touched = owner = None
        if claim is not None:
            claim = text(claim)
            touched, owner = claim[:STAMP], claim[STAMP:] or None
        items.append(
            decode_retry(
                text(item_id),
                text(record_text),
                owner,
                None if lease is None else from_score(lease),
                touched,
                0 if claims is None else int(claims),
            )
        )
    return items


def strict(records: list[RetryItem | CorruptRecord]) -> list[RetryItem]:
    """``records``, or ``ValueError`` naming the first that cannot be decoded."""
    items: list[RetryItem] = []
    for record in records:
        if isinstance(record, CorruptRecord):
            raise ValueError(f"stored retry item {record.id!r} cannot be decoded: {record.problem}")
        items.append(record)
    return items


# dead letters ------------------------------------------------------------------


def dead_texts(item: DeadLetterItem) -> tuple[str, str]:
    """``item``'s record and what the scripts need to index it without decoding the
    record (the failure group is computed here: Lua cannot)."""
    fields = CODEC.dead_letter_fields(item)
    written = {name: fields[name] for name in _DEAD_WRITTEN}
    if item.service != DEFAULT_SERVICE:
        written[_SERVICE] = item.service
    index = compact_json(
        [
            item.event_type,
            item.handler_name,
            int(item.processed),
            to_score(item.created_at),
            item.reason,
            fields["failure_group"],
            item.event_id,
            item.service,
        ]
    )
    return compact_json(written), index


def dead_json(item: DeadLetterItem) -> str:
    """``item``'s record alone."""
    return dead_texts(item)[0]


def dead_letter(item_id: str, record_text: str) -> DeadLetterItem:
    """A dead letter as stored; a damaged one is still shown, its record as text."""
    try:
        row = _row(
            json.loads(record_text),
            {
                "event_subject": None,
                "event_extensions": {},
                "error": "",
                "error_type": "",
                "traceback": "",
                "max_retries": 0,
                "processed": False,
                "processed_at": None,
                "first_failed_at": None,
                "metadata": {},
            },
            _DEAD_TEXT,
        )
        # the codec reads a null max_retries as 0 (a NULL column); here it is damage
        row["max_retries"] = int(row["max_retries"])
        return CODEC.dead_letter(row)
    except Exception as exc:
        return DeadLetterItem(
            id=item_id,
            event_id="",
            event_type="unknown",
            event_data=record_text,
            event_source="",
            event_timestamp=EPOCH,
            handler_name="unknown",
            error=f"{type(exc).__name__}: {exc}",
            attempt=0,
            reason="undecodable dead letter",
            created_at=EPOCH,
            metadata={"undecodable": True},
        )
