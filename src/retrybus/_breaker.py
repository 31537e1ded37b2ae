"""Circuit breakers, the pure part: a breaker's settings (``CircuitBreaker``),
its shared status (``BreakerStatus``) and the transitions between states, the
sliding window of calls a process counts (``CallWindow``), and a local state
machine (``BreakerMachine``) that puts them together on an injected clock.

Nothing here reads a store: ``_breakers`` shares the status between processes
with compare-and-set control records, applying the same transitions.

closed ──(failures/calls >= failure_ratio, calls >= min_calls, in window)──► open
open ──(open_for seconds)──► half-open ──(probes all succeed)──► closed
half-open ──(a probe fails)──► open, open_for doubled up to max_open_for
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from ._clock import Clock, SystemClock
from ._errors import PermanentError, RetryAfter
from ._policy import RetryPolicy

__all__ = [
    "BreakerMachine",
    "BreakerState",
    "BreakerStatus",
    "CallWindow",
    "CircuitBreaker",
    "Transition",
    "counts_as_failure",
]

#: what a breaker is at some moment: ``half_open`` is ``open`` once ``open_for`` passed
BreakerState = Literal["closed", "open", "half_open", "isolated"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: a change of a breaker's status, applied to the status it finds (None: it
#: does not apply to that status)
Transition = Callable[["BreakerStatus"], "BreakerStatus | None"]

#: the window is counted in this many slices (its oldest slice leaves whole)
WINDOW_SLICES = 10


def _seconds(name: str, value: float, *, least: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= least:
        raise ValueError(f"{name} must be a number of seconds > {least:g}, got {value!r}")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """A breaker that handlers share by ``name`` (one database, one breaker).

    It opens when, within the last ``window`` seconds, at least ``min_calls``
    calls were made and at least ``failure_ratio`` of them failed with a
    retryable error (a ``PermanentError``, or an error the handler's policy
    does not retry, is bad data, not an outage, and counts as a call only).
    Open, the handlers' deliveries wait in the retry queue without being
    called and without using an attempt. After ``open_for`` seconds it is
    half-open: ``probes`` deliveries go through; it closes when all of them
    succeed, and opens again for twice as long (up to ``max_open_for``) when
    one fails.

    >>> bus.subscribe("order.paid", save_order, breaker=CircuitBreaker("orders-db"))
    """

    name: str
    failure_ratio: float = 0.5
    min_calls: int = 20
    window: float = 30.0
    open_for: float = 30.0
    max_open_for: float = 600.0
    probes: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"a breaker name is 1 to 64 letters, digits, '.', '_' or '-', got {self.name!r}"
            )
        ratio = self.failure_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise TypeError(f"failure_ratio must be a number, got {ratio!r}")
        if not 0 < ratio <= 1:
            raise ValueError(f"failure_ratio must be > 0 and <= 1, got {ratio!r}")
        object.__setattr__(self, "failure_ratio", float(ratio))
        _count("min_calls", self.min_calls)
        _count("probes", self.probes)
        for field in ("window", "open_for", "max_open_for"):
            object.__setattr__(self, field, _seconds(field, getattr(self, field)))
        if self.max_open_for < self.open_for:
            raise ValueError(
                f"max_open_for ({self.max_open_for:g}s) must be >= open_for ({self.open_for:g}s)"
            )

    @property
    def probe_timeout(self) -> float:
        """Seconds after which probes taken without a verdict (their process died)
        may be taken again."""
        return max(self.open_for, 60.0)


def counts_as_failure(error: BaseException, policy: RetryPolicy) -> bool:
    """Whether ``error`` out of a handler call counts against its breaker: a
    retryable failure does; a ``PermanentError`` (``VersionError`` among them)
    or an error the policy would not retry does not."""
    if isinstance(error, PermanentError):
        return False
    if isinstance(error, RetryAfter):
        return True
    is_retryable = getattr(policy, "is_retryable", None)
    if callable(is_retryable):
        return bool(is_retryable(error))
    try:
        return bool(policy.should_retry(error, 1))
    except Exception:
        return True


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _when(text: Any) -> datetime | None:
    return None if text is None else datetime.fromisoformat(str(text))


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A breaker's state as every process of the service shares it.

    ``state`` is what is stored (``closed``, ``open`` or ``isolated``);
    ``state_at(now)`` reads an ``open`` breaker past ``half_open_at`` as
    ``half_open``, so that no one has to write that transition. ``open_for`` is
    the current open period (doubled by each reopening, back to the setting
    when it closes); ``trips`` counts openings; ``probes_taken`` and
    ``probes_passed`` count the half-open period's probes.
    """

    state: Literal["closed", "open", "isolated"] = "closed"
    open_for: float = 0.0
    opened_at: datetime | None = None
    half_open_at: datetime | None = None
    trips: int = 0
    probes_taken: int = 0
    probes_passed: int = 0
    probe_at: datetime | None = None
    reason: str = ""
    changed_at: datetime | None = None

    @classmethod
    def initial(cls, breaker: CircuitBreaker) -> BreakerStatus:
        """A closed breaker that never opened."""
        return cls(open_for=breaker.open_for)

    def state_at(self, now: datetime) -> BreakerState:
        """The state at ``now``."""
        if self.state == "open" and self.half_open_at is not None and now >= self.half_open_at:
            return "half_open"
        return self.state

    # transitions: each returns the new status, or None when it does not apply

    def trip(
        self, now: datetime, breaker: CircuitBreaker, calls: int, failures: int
    ) -> BreakerStatus | None:
        """Closed → open (``failures`` of ``calls`` failed in the window)."""
        if self.state != "closed":
            return None
        return self._opened(
            now,
            breaker.open_for,
            f"{failures} of {calls} calls failed in {breaker.window:g}s",
        )

    def take_probe(self, now: datetime, breaker: CircuitBreaker) -> BreakerStatus | None:
        """Half-open: one more probe goes through (None: all are out)."""
        if self.state_at(now) != "half_open":
            return None
        taken = self.probes_taken
        if (
            taken >= breaker.probes
            and self.probe_at is not None
            and (now - self.probe_at).total_seconds() >= breaker.probe_timeout
        ):
            taken = self.probes_passed  # those probes' processes never said: take them again
        if taken >= breaker.probes:
            return None
        return replace(self, probes_taken=taken + 1, probe_at=now)

    def return_probes(self, count: int) -> BreakerStatus | None:
        """Probes taken but not used (nothing was due) are given back."""
        if self.state != "open" or count <= 0:
            return None
        return replace(self, probes_taken=max(self.probes_passed, self.probes_taken - count))

    def probe_passed(self, now: datetime, breaker: CircuitBreaker) -> BreakerStatus | None:
        """Half-open: a probe succeeded; the last of ``probes`` closes the breaker."""
        if self.state_at(now) != "half_open":
            return None
        passed = self.probes_passed + 1
        if passed >= breaker.probes:
            return replace(
                self,
                state="closed",
                open_for=breaker.open_for,
                half_open_at=None,
                probes_taken=0,
                probes_passed=0,
                probe_at=None,
                reason=f"{passed} probes succeeded",
                changed_at=now,
            )
        return replace(self, probes_passed=passed, probes_taken=max(self.probes_taken, passed))

    def probe_failed(
        self, now: datetime, breaker: CircuitBreaker, error: str
    ) -> BreakerStatus | None:
        """Half-open: a probe failed; open again for twice as long (up to
        ``max_open_for``)."""
        if self.state_at(now) != "half_open":
            return None
        return self._opened(
            now, min(self.open_for * 2, breaker.max_open_for), f"a probe failed: {error}"
        )

    def isolate(self, now: datetime, reason: str) -> BreakerStatus:
        """An operator holds the breaker open until it is reset."""
        return self._settled(now, reason, state="isolated")

    def reset(self, now: datetime, breaker: CircuitBreaker, reason: str) -> BreakerStatus:
        """An operator closes the breaker (the doubling starts over)."""
        return self._settled(now, reason, state="closed", open_for=breaker.open_for)

    def _settled(self, now: datetime, reason: str, **changes: Any) -> BreakerStatus:
        """This status set by an operator: no half-open time, no probes."""
        return replace(
            self,
            half_open_at=None,
            probes_taken=0,
            probes_passed=0,
            probe_at=None,
            reason=reason,
            changed_at=now,
            **changes,
        )

    def _opened(self, now: datetime, open_for: float, reason: str) -> BreakerStatus:
        return BreakerStatus(
            state="open",
            open_for=open_for,
            opened_at=now,
            half_open_at=now + timedelta(seconds=open_for),
            trips=self.trips + 1,
            reason=reason,
            changed_at=now,
        )

    # storage

    def to_json(self) -> dict[str, Any]:
        """The status as a JSON object (a control record's value)."""
        return {
            "state": self.state,
            "open_for": self.open_for,
            "opened_at": _iso(self.opened_at),
            "half_open_at": _iso(self.half_open_at),
            "trips": self.trips,
            "probes_taken": self.probes_taken,
            "probes_passed": self.probes_passed,
            "probe_at": _iso(self.probe_at),
            "reason": self.reason,
            "changed_at": _iso(self.changed_at),
        }

    @classmethod
    def from_json(cls, value: Any) -> BreakerStatus:
        """A status read back (``to_json``); raises ``ValueError`` naming what is wrong."""
        try:
            state = value["state"]
            if state not in ("closed", "open", "isolated"):
                raise ValueError(f"unknown breaker state {state!r}")
            return cls(
                state=state,
                open_for=float(value["open_for"]),
                opened_at=_when(value.get("opened_at")),
                half_open_at=_when(value.get("half_open_at")),
                trips=int(value.get("trips", 0)),
                probes_taken=int(value.get("probes_taken", 0)),
                probes_passed=int(value.get("probes_passed", 0)),
                probe_at=_when(value.get("probe_at")),
                reason=str(value.get("reason", "")),
                changed_at=_when(value.get("changed_at")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable breaker status {value!r}: {exc}") from exc


class CallWindow:
    """Calls and failures of the last ``seconds``, counted in ``WINDOW_SLICES``
    slices: a slice leaves the window whole, so the window holds between 9/10
    of ``seconds`` and ``seconds`` of calls."""

    __slots__ = (
        "_calls",
        "_current",
        "_failures",
        "_position",
        "_until",
        "_width",
        "calls",
        "failures",
    )

    def __init__(self, seconds: float) -> None:
        self._width = seconds / WINDOW_SLICES
        self._calls = [0] * WINDOW_SLICES
        self._failures = [0] * WINDOW_SLICES
        #: the current slice: its number since the clock's 0, its place in the
        #: lists, and when the next one begins (the hot path compares times only)
        self._current = -1
        self._position = 0
        self._until = -math.inf
        #: calls and failures in the window
        self.calls = 0
        self.failures = 0

    def add(self, at: float, failed: bool) -> None:
        """Count a call made at ``at`` (seconds on the clock's scale)."""
        if at >= self._until:
            self._advance(int(at // self._width))
        position = self._position  # a clock gone back counts as now
        self._calls[position] += 1
        self.calls += 1
        if failed:
            self._failures[position] += 1
            self.failures += 1

    def move_to(self, at: float) -> None:
        """Let the calls older than the window at ``at`` leave it, counting nothing
        (``add_now`` then counts a call at ``at``)."""
        if at >= self._until:
            self._advance(int(at // self._width))

    def add_now(self, failed: bool) -> None:
        """Count a call at the time of the last ``add`` or ``move_to``."""
        position = self._position
        self._calls[position] += 1
        self.calls += 1
        if failed:
            self._failures[position] += 1
            self.failures += 1

    def _advance(self, index: int) -> None:
        if index <= self._current:
            return
        if self._current < 0 or index - self._current >= WINDOW_SLICES:
            self.clear()
        else:
            for slot in range(self._current + 1, index + 1):
                position = slot % WINDOW_SLICES
                self.calls -= self._calls[position]
                self.failures -= self._failures[position]
                self._calls[position] = self._failures[position] = 0
        self._current = index
        self._position = index % WINDOW_SLICES
        self._until = (index + 1) * self._width

    def clear(self) -> None:
        """Forget every call."""
        for position in range(WINDOW_SLICES):
            self._calls[position] = self._failures[position] = 0
        self.calls = self.failures = 0


class BreakerMachine:
    """One breaker's state machine in one process, on ``clock``: ``allows()``
    before a call, ``record(failed)`` after it. ``status`` is what would be
    shared; ``_breakers`` shares it through the store, this class alone does not.

    >>> machine = BreakerMachine(CircuitBreaker("db", min_calls=2), ManualClock())
    """

    def __init__(self, breaker: CircuitBreaker, clock: Clock) -> None:
        self.breaker = breaker
        self.clock = clock
        self.status = BreakerStatus.initial(breaker)
        self.window = CallWindow(breaker.window)
        #: the clock's time in seconds: the hot path counts calls by it (the
        #: system clock's is read without building a datetime)
        self.seconds: Callable[[], float] = (
            time.time if type(clock) is SystemClock else lambda: clock.now().timestamp()
        )

    @property
    def state(self) -> BreakerState:
        """The state now."""
        return self.status.state_at(self.clock.now())

    def allows(self) -> bool:
        """Whether a call may go through now (half-open: it takes a probe)."""
        status = self.status
        if status.state == "closed":
            return True
        taken = status.take_probe(self.clock.now(), self.breaker)
        if taken is None:
            return False
        self.status = taken
        return True

    def record(self, failed: bool, error: BaseException | str = "") -> BreakerStatus | None:
        """Count a call's outcome (``failed``: a failure that counts,
        ``counts_as_failure``); returns the new status when it changed state."""
        transition = self.after_call(failed, error)
        if transition is None:
            return None
        status = self.status
        change = transition(status)
        if change is None:
            return None
        self.status = change
        if change.state == "closed" and status.state != "closed":
            self.window.clear()
        return change

    def after_call(self, failed: bool, error: BaseException | str = "") -> Transition | None:
        """The transition a call's outcome asks for (None: none). A closed
        breaker counts the call in its window and asks to trip past the
        threshold; a half-open one takes it as a probe's verdict; an open one
        ignores it (a call started before it opened). The transition is a
        function of the status, so that a process that loses a compare-and-set
        applies it again to the status it reads back."""
        breaker = self.breaker
        if self.status.state == "closed":
            window = self.window
            window.add(self.seconds(), failed)
            if (
                failed
                and window.calls >= breaker.min_calls
                and window.failures >= breaker.failure_ratio * window.calls
            ):
                now = self.clock.now()
                calls, failures = window.calls, window.failures
                return lambda s: s.trip(now, breaker, calls, failures)
            return None
        now = self.clock.now()
        if self.status.state_at(now) != "half_open":
            return None
        if failed:
            text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            return lambda s: s.probe_failed(now, breaker, text)
        return lambda s: s.probe_passed(now, breaker)
