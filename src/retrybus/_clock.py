"""Where retrybus reads the time: a clock that tests replace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "ManualClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Anything with a ``now()`` returning an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told, so retry schedules are tested without sleeping.

    >>> clock = ManualClock()
    >>> clock.advance(2.5)
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime(2025, 1, 7, 10, 0, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError(f"ManualClock start must be timezone-aware, got {start!r}")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> datetime:
        """Move the clock forward by ``seconds`` and return the new time."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards: seconds={seconds!r}")
        self._now += timedelta(seconds=seconds)
        return self._now

    def set(self, when: datetime) -> None:
        """Jump to ``when`` (aware)."""
        if when.tzinfo is None:
            raise ValueError(f"ManualClock.set needs an aware datetime, got {when!r}")
        self._now = when.astimezone(UTC)
