"""What becomes of a claimed retry item (``Succeeded``, ``Rescheduled``,
``DeadLettered``), a stored record that cannot be read (``CorruptRecord``), and
the running totals a store keeps (``Counters``): the words the worker, the
queues and every store engine share. They sit below the stores, which import
them, as the worker and the queues do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._records import DeadLetterItem, RetryItem, dead_letter_id_for
from ._services import DEFAULT_SERVICE, is_service_name

__all__ = [
    "CorruptRecord",
    "Counters",
    "DeadLettered",
    "Outcome",
    "Rescheduled",
    "Succeeded",
    "corrupt_to_dead_letter",
    "outcome_id",
]


@dataclass(frozen=True, slots=True)
class CorruptRecord:
    """A stored retry item that could not be decoded; ``raw`` holds its fields as text."""

    id: str
    raw: Mapping[str, Any]
    problem: str


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The call worked: remove the item (``item`` is the record as claimed;
    ``item.first_delivery``: a first delivery, not a retry, worked)."""

    item: RetryItem


@dataclass(frozen=True, slots=True)
class Rescheduled:
    """The call failed and a retry is allowed: ``item`` carries the new attempt
    and time. ``first_delivery``: the record was a first delivery (a pending
    one), so this adds a retry to the queue's totals."""

    item: RetryItem
    first_delivery: bool = False


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """No more retries: remove retry item ``item_id`` and add ``dead_letter`` in
    one step. ``first_delivery``: the record was a first delivery (it leaves
    the retry totals alone, as a first failure dead-lettered at publish does)."""

    item_id: str
    dead_letter: DeadLetterItem
    first_delivery: bool = False


Outcome = Succeeded | Rescheduled | DeadLettered


def outcome_id(outcome: Outcome) -> str:
    """The id of the retry item an outcome is for."""
    return outcome.item_id if isinstance(outcome, DeadLettered) else outcome.item.id


@dataclass(frozen=True, slots=True)
class Counters:
    """Running totals a store keeps for ``bus.stats()``."""

    retry_added: int = 0
    retry_succeeded: int = 0
    retry_succeeded_attempts: int = 0
    retry_dead_lettered: int = 0


def corrupt_to_dead_letter(record: CorruptRecord, now: datetime, reason: str) -> DeadLetterItem:
    """A dead letter for a stored record that could not be decoded, keeping its raw fields."""
    raw = record.raw
    service = raw.get("service")  # what could be read of it, if a name
    return DeadLetterItem(
        id=dead_letter_id_for(record.id),
        event_id=str(raw.get("event_id") or ""),
        event_type=str(raw.get("event_type") or "unknown"),
        event_data=None,
        event_source=str(raw.get("event_source") or ""),
        event_timestamp=now,
        handler_name=str(raw.get("handler_name") or "unknown"),
        error=record.problem,
        error_type="retrybus.CorruptRecord",
        attempt=0,
        reason=reason,
        created_at=now,
        metadata={"raw_record": dict(raw)},
        service=service if is_service_name(service) else DEFAULT_SERVICE,
    )
