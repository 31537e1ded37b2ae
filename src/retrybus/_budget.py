"""Retry budgets: a handler's retries kept to a share of its first deliveries.

``RetryBudget`` is the setting (``RetryWorker(bus, retry_budget=...)``);
``RetryBudgets`` counts, per handler, the first deliveries and the retries this
process made in the last ``window`` seconds and says whether one more retry
fits: at most ``percent`` of the first deliveries, and never fewer than
``min_per_second`` a second; a retry that succeeded no longer counts (the
budget bounds what a failing dependency gets, not how fast a backlog drains
once it answers again). A retry that does not fit is not called: the
worker puts it back in the queue, due when the budget should have room for it
again, its attempt unused (``postpone_until``).

When every delivery fails (a dependency is down), each first delivery adds a
retry to the queue, but only ``percent`` of them are called again within the
window: the calls the dependency sees stay within ``1 + percent/100`` times the
first deliveries (or the floor), instead of growing with every retry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ._breaker import CallWindow
from ._clock import Clock, SystemClock
from ._outcomes import Rescheduled
from ._records import RetryItem

__all__ = ["WAITS_KEY", "RetryBudget", "RetryBudgets"]

#: the metadata key counting the times a retry waited for the budget
WAITS_KEY = "retry_budget_waits"


def _positive(name: str, value: float, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a finite number {least}, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """How many retries a worker calls, per handler: within any ``window``
    seconds, at most ``percent`` % of the handler's first deliveries in that
    window, but at least ``min_per_second`` a second (so that a handler with
    few first deliveries still gets its retries through). Retries over the
    budget wait in the retry queue: none is lost and no attempt is used.

    >>> RetryWorker(bus, retry_budget=RetryBudget(percent=20, min_per_second=10, window=10))
    """

    percent: float = 20.0
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "percent", _positive("percent", self.percent, zero=True))
        object.__setattr__(
            self, "min_per_second", _positive("min_per_second", self.min_per_second, zero=True)
        )
        object.__setattr__(self, "window", _positive("window", self.window))
        if self.percent == 0 and self.min_per_second == 0:
            raise ValueError(
                "a retry budget with percent=0 and min_per_second=0 never lets a retry "
                "through; leave retry_budget unset or allow one of them"
            )


class RetryBudgets:
    """The retry budget of every handler of one process (``RetryBudget``
    applied per handler name), counted on ``clock``."""

    def __init__(self, budget: RetryBudget, clock: Clock) -> None:
        if not isinstance(budget, RetryBudget):
            raise TypeError(f"retry_budget must be a RetryBudget, got {budget!r}")
        self.budget = budget
        self._clock = clock
        self._windows: dict[str, CallWindow] = {}
        #: per handler, the retries let through that succeeded, in the window
        self._refunds: dict[str, CallWindow] = {}
        #: per handler, until when no more is logged of its waiting retries
        self._quiet_until: dict[str, float] = {}
        self._floor = budget.min_per_second * budget.window
        self._share = budget.percent / 100.0
        #: the clock's time in seconds (the system clock's read without a datetime)
        self._seconds: Callable[[], float] = (
            time.time if type(clock) is SystemClock else lambda: clock.now().timestamp()
        )

    def _window(self, handler: str) -> CallWindow:
        """``handler``'s deliveries in the window: ``calls`` counts all of them,
        ``failures`` (the window's second count) the retries among them."""
        window = self._windows.get(handler)
        if window is None:
            window = self._windows[handler] = CallWindow(self.budget.window)
        return window

    def first_delivery(self, handler: str) -> None:
        """``handler`` is called for a first delivery (it adds to the budget)."""
        window = self._windows.get(handler) or self._window(handler)
        window.add(self._seconds(), False)

    def _counted(self, handler: str) -> tuple[CallWindow, int]:
        """``handler``'s window moved to now, and the retries in it that count
        (let through, less those that succeeded)."""
        now = self._seconds()
        window = self._windows.get(handler) or self._window(handler)
        window.move_to(now)
        refunds = self._refunds.get(handler)
        if refunds is None:
            return window, window.failures
        refunds.move_to(now)
        return window, max(window.failures - refunds.calls, 0)

    def try_retry(self, handler: str) -> bool:
        """Whether one more retry of ``handler`` fits the budget now; counted if it does."""
        window, retries = self._counted(handler)
        retries += 1  # with this one: the budget is never exceeded, even by one
        if retries > self._floor and retries > self._share * (window.calls - window.failures):
            return False
        window.add_now(True)
        return True

    def retry_succeeded(self, handler: str) -> None:
        """A retry of ``handler`` let through succeeded: it no longer counts (the
        budget bounds the calls a failing dependency gets; once it answers again,
        the retries waiting go through as fast as they succeed)."""
        refunds = self._refunds.get(handler)
        if refunds is None:
            refunds = self._refunds[handler] = CallWindow(self.budget.window)
        refunds.add(self._seconds(), False)

    def retries_per_second(self, handler: str) -> float:
        """The retries a second ``handler``'s budget allows at the rate of its
        first deliveries in the window (at least ``min_per_second``)."""
        first_deliveries, _ = self.usage(handler)
        return max(self.budget.min_per_second, self._share * first_deliveries / self.budget.window)

    def postpone_until(self, handler: str, waiting: int) -> datetime:
        """When the ``waiting``-th retry of ``handler`` refused now (from 1) should
        fall due again: spread at the rate the budget allows, so that the retries
        over the budget come back as it has room, not all at once."""
        rate = self.retries_per_second(handler)
        longest = self.budget.window * 10
        seconds = self.budget.window if rate <= 0 else min(waiting / rate, longest)
        return self._clock.now() + timedelta(seconds=max(seconds, 0.05))

    def usage(self, handler: str) -> tuple[int, int]:
        """(first deliveries, retries that count: let through and not succeeded)
        of ``handler`` in the window now."""
        window, retries = self._counted(handler)
        return window.calls - window.failures, retries

    def sort_claimed(self, items: Sequence[RetryItem]) -> tuple[list[RetryItem], list[Rescheduled]]:
        """Of records a worker claimed, those to run and those whose retry does not
        fit the budget: the latter as outcomes that put them back in the queue,
        due when the budget should have room (``postpone_until``), their attempt
        and error unchanged, ``metadata["retry_budget_waits"]`` counting the
        times. First deliveries always run, and so do records claimed again
        without an outcome (let through once already). A first retry claimed for the first
        time is also a first delivery that failed, wherever it was made (a
        publisher's process, this worker, another one): it adds to the budget
        before it asks it for room, which is how the first deliveries of other
        processes count (this process counts its own successes, ``succeeded``)."""
        run: list[RetryItem] = []
        postponed: list[Rescheduled] = []
        refused: dict[str, int] = {}
        for item in items:
            name = item.handler_name
            if item.attempt == 0 or item.claims > 1:
                # a first delivery; or a retry claimed again without an outcome (its
                # worker died or hung): let through before, and postponing it would
                # reset the claims that end a record killing its workers
                run.append(item)
                continue
            waits = item.metadata.get(WAITS_KEY, 0) if item.metadata else 0
            if item.attempt == 1 and not waits:
                self.first_delivery(name)
            if self.try_retry(name):
                run.append(item)
                continue
            waiting = refused[name] = refused.get(name, 0) + 1
            due = self.postpone_until(name, waiting)
            metadata = {**item.metadata, WAITS_KEY: (waits if isinstance(waits, int) else 0) + 1}
            postponed.append(Rescheduled(replace(item, next_retry=due, metadata=metadata)))
        return run, postponed

    def news(self, postponed: Sequence[Rescheduled]) -> list[str]:
        """What to log of ``postponed``: a line per handler whose retries started
        waiting for its budget, at most one per ``window`` seconds (never one per
        retry)."""
        now = self._seconds()
        counts: dict[str, int] = {}
        for outcome in postponed:
            name = outcome.item.handler_name
            counts[name] = counts.get(name, 0) + 1
        lines = []
        for name, count in counts.items():
            if now < self._quiet_until.get(name, 0.0):
                continue
            self._quiet_until[name] = now + self.budget.window
            first_deliveries, retries = self.usage(name)
            lines.append(
                f"retry budget of {name}: {count} retries wait, their attempts unused "
                f"({retries} retries for {first_deliveries} first deliveries in the last "
                f"{self.budget.window:g}s; {self.budget.percent:g} %, at least "
                f"{self.budget.min_per_second:g}/s)"
            )
        return lines

    def succeeded(self, item: RetryItem) -> None:
        """A claimed record's call succeeded: a first delivery adds to the budget,
        a retry no longer counts (``retry_succeeded``)."""
        if item.attempt:
            self.retry_succeeded(item.handler_name)
        else:
            self.first_delivery(item.handler_name)
