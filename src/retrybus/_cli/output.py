"""JSON output for scripts (``--json``): records as objects with ISO 8601 timestamps.

This module does not import Rich; ``views`` draws the tables people read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import typer

from .._event_types import Reading
from .._records import DeadLetterItem, RetryItem
from .._services import HandlerSummary, ServiceSummary, WorkerBeat
from .._transports import TransportReport

__all__ = [
    "echo_json",
    "reading_to_dict",
    "record_to_dict",
    "service_to_dict",
    "transport_report_to_dict",
]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def record_to_dict(record: RetryItem | DeadLetterItem) -> dict[str, Any]:
    """Every field of a retry item or dead letter, JSON-ready (times as ISO 8601 strings)."""
    return {field.name: _plain(getattr(record, field.name)) for field in dataclasses.fields(record)}


def reading_to_dict(reading: Reading) -> dict[str, Any]:
    """How an app reads a stored event (``bus.dead_letters.reading``), JSON-ready."""
    return {
        "type": reading.event_type,
        "stored_version": reading.stored_version,
        "current_version": reading.current_version,
        "upcast": reading.upcast,
        "data": reading.data,
        "error": reading.error,
    }


def _utc(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _age(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _worker_dict(beat: WorkerBeat, now: datetime) -> dict[str, Any]:
    return {
        "name": beat.name,
        "host": beat.host,
        "pid": beat.pid,
        "started_at": _utc(beat.started_at),
        "last_seen": _utc(beat.last_seen),
        "last_seen_age": _age(max(0.0, (now - beat.last_seen).total_seconds())),
        "interval": beat.interval,
        "lanes": beat.lanes,
        "lanes_busy": beat.lanes_busy,
        "handlers": list(beat.handlers),
        "version": beat.version,
    }


def _handler_dict(handler: HandlerSummary, now: datetime) -> dict[str, Any]:
    subscription = handler.subscription
    load = handler.load
    return {
        "handler_name": handler.handler_name,
        "patterns": None if subscription is None else list(subscription.patterns),
        "policy": None if subscription is None else subscription.policy,
        "max_retries": None if subscription is None else subscription.max_retries,
        "handler_timeout": None if subscription is None else subscription.handler_timeout,
        "registered_at": None if subscription is None else _utc(subscription.registered_at),
        "removed": handler.removed,
        "removed_at": None if subscription is None else _utc(subscription.removed_at),
        "removed_by": None if subscription is None else subscription.removed_by,
        "pending": load.pending,
        "scheduled": load.scheduled,
        "retrying": load.retrying,
        "leased": load.leased,
        "dead_unprocessed": load.dead_unprocessed,
        "dead_processed": load.dead_processed,
        "oldest_pending_due": _utc(load.oldest_pending_due),
        "oldest_pending_age": _age(handler.oldest_pending_age(now)),
    }


def service_to_dict(summary: ServiceSummary) -> dict[str, Any]:
    """One service of ``bus.services.overview()``, JSON-ready: times as ISO 8601
    UTC strings, ages in seconds (``retrybus services --json`` documents the fields)."""
    return {
        "service": summary.service,
        "at": _utc(summary.at),
        "warning": summary.warning,
        "waiting": summary.waiting,
        "dead": summary.dead,
        "oldest_pending_age": _age(summary.oldest_pending_age),
        "stale_workers": summary.stale_workers,
        "broker_lag": summary.broker_lag,
        "workers": [_worker_dict(beat, summary.at) for beat in summary.workers],
        "handlers": [_handler_dict(handler, summary.at) for handler in summary.handlers],
    }


def transport_report_to_dict(report: TransportReport) -> dict[str, Any]:
    """What ``Transport.check`` found, JSON-ready (``retrybus transport check --json``)."""
    return {
        "url": report.url,
        "kind": report.kind,
        "healthy": report.healthy,
        "services": [dataclasses.asdict(service) for service in report.services],
        "extra": _plain(report.extra),
        "warnings": list(report.warnings),
    }


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    typer.echo(json.dumps(_plain(value), indent=2, ensure_ascii=False))
