"""What happens to a delivery that failed: another retry, or the dead letter queue."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ._errors import PermanentError, RetryAfter, VersionError
from ._policy import RetryPolicy

__all__ = ["Decision", "decide"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Retry at ``next_retry`` (after ``delay`` seconds), or, when ``next_retry``
    is None, dead-letter for ``reason``."""

    next_retry: datetime | None
    delay: float = 0.0
    reason: str = ""


def decide(
    policy: RetryPolicy,
    error: BaseException,
    attempt: int,
    first_failed_at: datetime,
    now: datetime,
) -> Decision:
    """Decide retry number ``attempt`` (from 1) after ``error``, by the handler's
    current policy.

    ``first_failed_at`` is when the delivery first failed, for the policy's
    ``max_elapsed`` time budget. A policy that raises, or a delay that cannot
    be scheduled, dead-letters the delivery with the reason: nothing is lost
    because of a broken policy.
    """
    try:
        return _decide(policy, error, attempt, first_failed_at, now)
    except Exception as exc:
        return Decision(None, reason=f"retry decision failed: {type(exc).__name__}: {exc}")


def _decide(
    policy: RetryPolicy,
    error: BaseException,
    attempt: int,
    first_failed_at: datetime,
    now: datetime,
) -> Decision:
    budget = policy.max_retries
    if isinstance(error, PermanentError):
        if isinstance(error, VersionError):  # its message says which version, which step
            return Decision(None, reason=str(error))
        return Decision(None, reason=f"non-retryable: {type(error).__name__}")
    if attempt > budget:
        return Decision(None, reason=f"failed after {budget} retries")
    if isinstance(error, RetryAfter):
        delay = error.seconds
    elif policy.should_retry(error, attempt):
        delay = max(0.0, float(policy.delay(attempt)))
    else:
        return Decision(None, reason=f"non-retryable: {type(error).__name__}")
    max_elapsed: float | None = getattr(policy, "max_elapsed", None)
    if max_elapsed is not None:
        elapsed = (now - first_failed_at).total_seconds() + delay
        if elapsed > max_elapsed:
            return Decision(None, reason=f"retry time budget of {max_elapsed:g}s exhausted")
    return Decision(now + timedelta(seconds=delay), delay)
