"""A redrive as stored: requeue (or reprocess) every dead letter matching a filter,
at a bounded rate, after an optional probe, with progress, pause, resume and
cancel. ``Redrives`` (``_redrives.py``) starts, steers and drives them.

A redrive's state is a control record in the store, so it survives the process
that started it: whoever runs redrives (the dashboard, ``retrybus dlq requeue
--filter … --rate``, ``retrybus dlq redrive resume``) picks it up where it
stopped. A runner leases the redrive it is driving, so two runners never drive
one at once, and a runner that dies lets go when its lease runs out.

States: ``probing`` → ``running`` → ``completed``; ``paused`` (and back);
``stopped`` (the probe failed again, or no worker handled it within
``probe_timeout``) and ``cancelled`` are final.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._filters import DeadLetterFilter

__all__ = [
    "ACTIONS",
    "ACTIVE",
    "DEFAULT_PROBE_TIMEOUT",
    "FINAL",
    "STATES",
    "Redrive",
    "check_probe_timeout",
    "duration_text",
    "parse_rate",
]

ACTIONS = ("requeue", "reprocess")
ACTIVE = ("probing", "running")
FINAL = ("completed", "stopped", "cancelled")
STATES = (*ACTIVE, "paused", *FINAL)
#: how long a requeue's probe waits for a worker to handle its items (seconds)
DEFAULT_PROBE_TIMEOUT = 600.0


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True, slots=True, kw_only=True)
class Redrive:
    """One redrive, as stored. ``done`` counts dead letters requeued (or reprocessed
    successfully), ``failed`` reprocesses that failed again; ``total`` is how many
    matched when it started (those created later are never taken). ``cursor`` is
    the position (``created_at``, ``id``) of the last dead letter it took, newest
    first: it goes on after it. A requeue's probe waits up to ``probe_timeout``
    seconds (None: for ever) from ``probe_since`` (when its items were requeued,
    or the redrive resumed) for a worker to handle them; ``probe_deliveries``
    are its items' delivery ids (``_records.delivery_id``), by which a success
    is remembered."""

    id: str
    action: str
    where: DeadLetterFilter
    rate: float | None
    probe: int
    state: str
    total: int
    done: int = 0
    failed: int = 0
    probe_ids: tuple[str, ...] = ()
    probe_deliveries: tuple[str, ...] = ()
    probe_timeout: float | None = DEFAULT_PROBE_TIMEOUT
    probe_since: datetime | None = None
    cursor: tuple[datetime, str] | None = None
    message: str = ""
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    resume_state: str | None = None
    runner: str | None = None
    runner_until: datetime | None = None
    allowance: float = 1.0
    last_step_at: datetime | None = None
    version: int = 0

    @property
    def active(self) -> bool:
        """Still to be driven (probing or running)."""
        return self.state in ACTIVE

    @property
    def finished(self) -> bool:
        """Completed, stopped or cancelled: it will not move again."""
        return self.state in FINAL

    @property
    def probe_limit(self) -> str:
        """How long a requeue's probe waits for a worker, as text (``10m``; ``no
        limit``)."""
        return "no limit" if self.probe_timeout is None else duration_text(self.probe_timeout)

    @property
    def progress(self) -> float:
        """Share of ``total`` dealt with, 0.0 to 1.0."""
        if self.total <= 0:
            return 1.0 if self.finished else 0.0
        return min(1.0, (self.done + self.failed) / self.total)

    def to_dict(self) -> dict[str, Any]:
        """The redrive as stored (JSON-ready)."""
        return {
            "id": self.id,
            "action": self.action,
            "where": self.where.to_dict(),
            "rate": self.rate,
            "probe": self.probe,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "probe_ids": list(self.probe_ids),
            "probe_deliveries": list(self.probe_deliveries),
            "probe_timeout": self.probe_timeout,
            "probe_since": _iso(self.probe_since),
            "cursor": None if self.cursor is None else [self.cursor[0].isoformat(), self.cursor[1]],
            "message": self.message,
            "created_by": self.created_by,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": _iso(self.finished_at),
            "resume_state": self.resume_state,
            "runner": self.runner,
            "runner_until": _iso(self.runner_until),
            "allowance": self.allowance,
            "last_step_at": _iso(self.last_step_at),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], version: int) -> Redrive:
        """The redrive ``to_dict`` wrote, at the record's ``version``."""
        created_at = _time(data["created_at"])
        updated_at = _time(data["updated_at"])
        if created_at is None or updated_at is None:
            raise ValueError(f"redrive {data.get('id')!r} has no created_at/updated_at")
        cursor = data.get("cursor")
        position = _time(cursor[0]) if cursor else None
        return cls(
            id=data["id"],
            action=data["action"],
            where=DeadLetterFilter.from_dict(data["where"]),
            rate=data.get("rate"),
            probe=int(data.get("probe", 0)),
            state=data["state"],
            total=int(data["total"]),
            done=int(data.get("done", 0)),
            failed=int(data.get("failed", 0)),
            probe_ids=tuple(data.get("probe_ids", ())),
            # a record written before probe timeouts gets the default
            probe_deliveries=tuple(data.get("probe_deliveries", ())),
            probe_timeout=data.get("probe_timeout", DEFAULT_PROBE_TIMEOUT),
            probe_since=_time(data.get("probe_since")),
            cursor=None if position is None or not cursor else (position, str(cursor[1])),
            message=data.get("message", ""),
            created_by=data.get("created_by"),
            created_at=created_at,
            updated_at=updated_at,
            finished_at=_time(data.get("finished_at")),
            resume_state=data.get("resume_state"),
            runner=data.get("runner"),
            runner_until=_time(data.get("runner_until")),
            allowance=float(data.get("allowance", 1.0)),
            last_step_at=_time(data.get("last_step_at")),
            version=version,
        )


def check_probe_timeout(value: float | None) -> float | None:
    """``value`` as a probe timeout in seconds (> 0, or None: no limit); raises
    ``ValueError`` naming it otherwise."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"probe_timeout must be a number of seconds > 0 or None, got {value!r}")
    return float(value)


def duration_text(seconds: float) -> str:
    """``600`` as ``10m``, ``5400`` as ``1h30m``, ``45`` as ``45s``."""
    whole = round(seconds)
    if whole != seconds or whole < 60:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts)


def parse_rate(text: str | float | None) -> float | None:
    """A rate as ``10``, ``10/s``, ``600/m`` or ``3600/h`` (items per second), or None."""
    if text is None:
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower()
        per = 1.0
        for suffix, seconds in (("/s", 1.0), ("/min", 60.0), ("/m", 60.0), ("/h", 3600.0)):
            if raw.endswith(suffix):
                raw, per = raw[: -len(suffix)], seconds
                break
        try:
            value = float(raw) / per
        except ValueError:
            raise ValueError(
                f"not a rate: {text!r} (use items per second: 10, 10/s, 600/m)"
            ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a rate must be a number of items per second > 0, got {text!r}")
    return value
