"""What happens to a delivery that failed: another retry, or the dead letter queue."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ._errors import PermanentError, RetryAfter
from ._policy import RetryPolicy

__all__ = ["Decision", "decide"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Retry after ``delay`` seconds, or, when ``delay`` is None, dead-letter for ``reason``."""

    delay: float | None
    reason: str = ""


def decide(
    policy: RetryPolicy,
    error: BaseException,
    attempt: int,
    first_failed_at: datetime,
    now: datetime,
) -> Decision:
    """Decide retry number ``attempt`` (from 1) after ``error``.

    ``first_failed_at`` is when the delivery first failed, for the policy's
    ``max_elapsed`` time budget.
    """
    if isinstance(error, PermanentError):
        return Decision(None, f"non-retryable: {type(error).__name__}")
    if attempt > policy.max_retries:
        return Decision(None, f"failed after {policy.max_retries} retries")
    if isinstance(error, RetryAfter):
        delay = error.seconds
    elif policy.should_retry(error, attempt):
        delay = max(0.0, float(policy.delay(attempt)))
    else:
        return Decision(None, f"non-retryable: {type(error).__name__}")
    max_elapsed: float | None = getattr(policy, "max_elapsed", None)
    if max_elapsed is not None:
        elapsed = (now - first_failed_at).total_seconds() + delay
        if elapsed > max_elapsed:
            return Decision(None, f"retry time budget of {max_elapsed:g}s exhausted")
    return Decision(delay)
