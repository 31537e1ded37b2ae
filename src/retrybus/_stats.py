"""``bus.stats()``: the numbers the seed asks to monitor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._outcomes import Counters
from ._records import RetryKind

__all__ = ["Stats"]


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of both queues and of how retries have gone.

    ``retry_success_rate`` is the share of retry items that ended in success
    rather than in the dead letter queue (None before any ended);
    ``average_attempts`` is how many retries a successful item needed on
    average (None before any succeeded); ``due_within_minute`` and
    ``due_within_hour`` count the retry items falling due that soon (overdue
    ones included). ``retry_queue_retries``, ``retry_queue_pending`` and
    ``retry_queue_scheduled`` split ``retry_queue_size`` by kind (``RetryKind``):
    failed deliveries waiting for their next try, first deliveries due (deferred,
    or running), and first deliveries due later (``deliver_at``/``deliver_in``).
    """

    retry_queue_size: int
    dead_letter_queue_size: int
    unprocessed_dead_letters: int
    retries_scheduled: int
    retries_succeeded: int
    retries_dead_lettered: int
    retry_success_rate: float | None
    average_attempts: float | None
    due_within_minute: int = 0
    due_within_hour: int = 0
    retry_queue_retries: int = 0
    retry_queue_pending: int = 0
    retry_queue_scheduled: int = 0
    #: deliveries this process did not run because the inbox says their handler
    #: succeeded before (remembered successes and ``inbox.claim`` alike)
    inbox_skipped: int = 0

    @classmethod
    def from_counts(
        cls,
        *,
        retry_queue_size: int,
        dead_letter_queue_size: int,
        unprocessed_dead_letters: int,
        counters: Counters,
        due_within_minute: int = 0,
        due_within_hour: int = 0,
        kinds: Mapping[RetryKind, int] | None = None,
        inbox_skipped: int = 0,
    ) -> Stats:
        ended = counters.retry_succeeded + counters.retry_dead_lettered
        return cls(
            retry_queue_size=retry_queue_size,
            dead_letter_queue_size=dead_letter_queue_size,
            unprocessed_dead_letters=unprocessed_dead_letters,
            retries_scheduled=counters.retry_added,
            retries_succeeded=counters.retry_succeeded,
            retries_dead_lettered=counters.retry_dead_lettered,
            retry_success_rate=counters.retry_succeeded / ended if ended else None,
            average_attempts=(
                counters.retry_succeeded_attempts / counters.retry_succeeded
                if counters.retry_succeeded
                else None
            ),
            due_within_minute=due_within_minute,
            due_within_hour=due_within_hour,
            retry_queue_retries=(kinds or {}).get("retry", 0),
            retry_queue_pending=(kinds or {}).get("pending", 0),
            retry_queue_scheduled=(kinds or {}).get("scheduled", 0),
            inbox_skipped=inbox_skipped,
        )

    def to_dict(self) -> dict[str, int | float | None]:
        """The stats as a JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
