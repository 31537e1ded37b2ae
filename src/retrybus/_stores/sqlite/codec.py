"""The SQLite store's record encoding: the shared ``RecordCodec`` with times as
fixed-width ISO text (so that they sort), JSON as compact text and flags as 0/1;
and the rows of the services' tables (a stored subscription, a worker's beat)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..._event import compact_json, encode_json
from ..._services import StoredSubscription, WorkerBeat
from .._codec import parse_text_time, text_time
from .._fields import RecordCodec

__all__ = ["CODEC", "beat_fields", "stored_subscription", "subscription_fields", "worker_beat"]


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


def subscription_fields(
    terms: StoredSubscription, *, registered_at: str, now: str, revision: int
) -> dict[str, Any]:
    """The parameters of ``put_subscription`` for ``terms`` (only its terms: the
    store sets the times, given as stored, and the revision)."""
    return {
        "service": terms.service,
        "handler_name": terms.handler_name,
        "patterns": compact_json(list(terms.patterns)),
        "policy": terms.policy,
        "max_retries": terms.max_retries,
        "handler_timeout": terms.handler_timeout,
        "registered_at": registered_at,
        "updated_at": now,
        "revision": revision,
        "details": encode_json(dict(terms.details), f"details of {terms.handler_name}"),
    }


def stored_subscription(row: Mapping[str, Any]) -> StoredSubscription:
    """The subscription a ``retrybus_subscriptions`` row holds."""
    timeout = row["handler_timeout"]
    removed_at = row["removed_at"]
    return StoredSubscription(
        service=row["service"],
        handler_name=row["handler_name"],
        patterns=tuple(json.loads(row["patterns"])),
        policy=row["policy"],
        max_retries=int(row["max_retries"]),
        handler_timeout=None if timeout is None else float(timeout),
        registered_at=parse_text_time(row["registered_at"]),
        updated_at=parse_text_time(row["updated_at"]),
        removed_at=None if removed_at is None else parse_text_time(removed_at),
        removed_by=row["removed_by"],
        revision=int(row["revision"]),
        details=_read_json(row["details"]),
    )


def beat_fields(beat: WorkerBeat) -> dict[str, Any]:
    """The parameters of ``beat`` (the query) for ``beat``."""
    return {
        "name": beat.name,
        "service": beat.service,
        "host": beat.host,
        "pid": beat.pid,
        "started_at": text_time(beat.started_at),
        "last_seen": text_time(beat.last_seen),
        "interval": beat.interval,
        "lanes": beat.lanes,
        "lanes_busy": beat.lanes_busy,
        "handlers": compact_json(list(beat.handlers)),
        "version": beat.version,
    }


def worker_beat(row: Mapping[str, Any]) -> WorkerBeat:
    """The heartbeat a ``retrybus_workers`` row holds."""
    return WorkerBeat(
        name=row["name"],
        service=row["service"],
        host=row["host"],
        pid=int(row["pid"]),
        started_at=parse_text_time(row["started_at"]),
        last_seen=parse_text_time(row["last_seen"]),
        interval=float(row["interval"]),
        lanes=int(row["lanes"]),
        lanes_busy=int(row["lanes_busy"]),
        handlers=tuple(json.loads(row["handlers"])),
        version=row["version"],
    )
