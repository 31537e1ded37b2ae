"""What the bus, the worker and the dead letter queue report to metrics and
tracing, as two small protocols. ``retrybus.prometheus`` and ``retrybus.otel``
implement them with prometheus-client and opentelemetry-api; the observers of
``_reporting`` tell them what happens (a bus without either calls no handler
through an observer at all).

The trace context of each failed handler call is kept in the stored record's
``metadata["trace"]`` (W3C ``traceparent`` strings, newest last), so that a
retry run later in another process links to the attempt before it, and a dead
letter's reprocess or requeue links to the failures that produced it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ._services import UNSUBSCRIBED

if TYPE_CHECKING:
    from ._clock import Clock
    from ._event import Event
    from ._stores.base import Store

__all__ = [
    "BusView",
    "DeliveryKind",
    "DeliverySpan",
    "Metrics",
    "PublishSpan",
    "Tracing",
    "failed_attempts",
    "is_traceparent",
    "last_failed_attempt",
    "log_fields",
    "publisher",
    "reason_kind",
    "trace_metadata",
    "with_failed_attempt",
]


#: the first call at publish, a worker's first call (a deferred or scheduled
#: delivery, or one a publisher left), a retry by a worker, a dead letter's reprocess
DeliveryKind = Literal["publish", "deliver", "retry", "reprocess"]

#: how many failed attempts a record remembers for its trace links
MAX_REMEMBERED_ATTEMPTS = 16

_REASON_KINDS = (
    ("failed after ", "retries_exhausted"),
    ("non-retryable", "non_retryable"),
    ("retry time budget", "time_budget_exhausted"),
    ("expired in retry queue", "expired"),
    ("unknown handler", "unknown_handler"),
    ("undecodable record", "undecodable"),
    ("undecodable message", "undecodable"),
    ("retry decision failed", "policy_error"),
    ("undeliverable", "undeliverable"),
    (UNSUBSCRIBED, "subscription_removed"),
)


def reason_kind(reason: str) -> str:
    """A dead letter's reason reduced to a word that suits a metric label:
    ``retries_exhausted``, ``non_retryable``, ``time_budget_exhausted``,
    ``expired``, ``unknown_handler``, ``undecodable``, ``policy_error``,
    ``undeliverable``, ``subscription_removed`` or ``other`` (reasons carry item-specific text; labels must not)."""
    for prefix, kind in _REASON_KINDS:
        if reason.startswith(prefix):
            return kind
    return "other"


class BusView(Protocol):
    """What reading a bus's queues needs: its store and its clock (an ``EventBus``)."""

    @property
    def store(self) -> Store: ...

    @property
    def clock(self) -> Clock: ...


@runtime_checkable
class Metrics(Protocol):
    """Receives what happens to deliveries, for counters and histograms.

    Every method is called on the event loop's thread, right after the thing
    it reports happened (a count of stored outcomes only once the store wrote
    them). ``retrybus.prometheus.PrometheusMetrics`` implements it; implement
    it yourself to send the same figures elsewhere. A back end may also have
    ``for_service(service) -> Metrics``: the bus of that service then counts
    through what it returns (one service's figures).
    """

    def published(self, event_type: str) -> None:
        """An event was published."""

    def handled(self, event_type: str, handler: str, ok: bool, seconds: float) -> None:
        """A handler was called (first call, retry or reprocess), taking ``seconds``."""

    def retry_scheduled(self, event_type: str, handler: str) -> None:
        """A failed delivery was stored in the retry queue (first failure or a later one)."""

    def retry_succeeded(self, event_type: str, handler: str) -> None:
        """A retry succeeded and its item left the retry queue."""

    def retry_lag(self, event_type: str, handler: str, seconds: float) -> None:
        """A retry started ``seconds`` after its ``next_retry``."""

    def dead_lettered(self, event_type: str, handler: str, reason: str) -> None:
        """A delivery was stored in the dead letter queue; ``reason`` is a ``reason_kind``."""

    def reprocessed(self, event_type: str, handler: str, ok: bool) -> None:
        """A dead letter was reprocessed (its handler called from the DLQ)."""

    def requeued(self, event_type: str, handler: str) -> None:
        """A dead letter was moved back into the retry queue."""

    async def refresh(self, bus: BusView) -> None:
        """Read the queues' depth from ``bus``'s store (called periodically)."""


class PublishSpan(Protocol):
    """The span around one publish; ``event`` carries its trace context."""

    event: Event

    @property
    def traceparent(self) -> str | None:
        """This span's W3C ``traceparent``, stored with failures (None: not sampled)."""

    def end(self, error: BaseException | None = None) -> None: ...


class DeliverySpan(Protocol):
    """The span around one handler call, current while the handler runs.

    A span may say, with a class attribute ``awaits_outcome = False``, that it
    records nothing: it is then let go once the call returns, and neither ended
    nor told the outcome (``end`` is not called)."""

    def __enter__(self) -> DeliverySpan: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    @property
    def traceparent(self) -> str | None:
        """This span's W3C ``traceparent``, to store with a failure (None: not sampled)."""

    def end(self, outcome: str, reason: str | None = None) -> None:
        """End the span, saying what became of the delivery: ``success``, ``retry``,
        ``dead_letter`` (with the ``reason``), ``failure`` (a failed reprocess),
        ``lost`` (another worker took the item over) or ``error`` (the outcome
        could not be recorded). Only the first call counts."""


@runtime_checkable
class Tracing(Protocol):
    """Starts the spans of publishes, handler calls and DLQ actions.
    ``retrybus.otel.OpenTelemetryTracing`` implements it."""

    @property
    def active(self) -> bool:
        """False while spans would go nowhere (no SDK set up): the bus then skips
        tracing altogether."""

    def publish(self, event: Event) -> PublishSpan:
        """Start the span of publishing ``event``."""

    def delivery(
        self,
        event: Event,
        handler: str,
        *,
        kind: DeliveryKind,
        attempt: int,
        failed: Sequence[str] = (),
        publisher: str | None = None,
    ) -> DeliverySpan:
        """A span for calling ``handler`` with ``event``; ``failed`` are the
        ``traceparent``s of the failed attempts before it (newest last),
        ``publisher`` the publish span's."""

    def requeue(
        self, event: Event, handler: str, failed: Sequence[str], publisher: str | None = None
    ) -> None:
        """Record that a dead letter was requeued, linked to its failed attempts."""


def log_fields(
    event_id: str, event_type: str, handler: str, attempt: int, traceparent: str | None = None
) -> dict[str, Any]:
    """The ``extra`` fields of a log record about a delivery; with the
    ``traceparent`` of its handler call, that call's ``trace_id`` and ``span_id``."""
    fields: dict[str, Any] = {
        "event_id": event_id,
        "event_type": event_type,
        "handler": handler,
        "attempt": attempt,
    }
    if traceparent is not None and is_traceparent(traceparent):
        parts = traceparent.split("-")
        fields["trace_id"], fields["span_id"] = parts[1], parts[2]
    return fields


_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?")


def is_traceparent(value: object) -> bool:
    """Whether ``value`` has the W3C ``traceparent`` form (version ``00`` has
    exactly four fields; later versions may add more)."""
    if not isinstance(value, str) or not _TRACEPARENT.fullmatch(value):
        return False
    return not (value.startswith("00-") and len(value) != 55)


def last_failed_attempt(metadata: Mapping[str, Any]) -> str | None:
    """The ``traceparent`` of a record's newest failed attempt."""
    attempts = failed_attempts(metadata)
    return attempts[-1] if attempts else None


def failed_attempts(metadata: Mapping[str, Any]) -> list[str]:
    """The ``traceparent``s of a record's failed attempts, oldest first."""
    trace = metadata.get("trace")
    if not isinstance(trace, Mapping):
        return []
    attempts = trace.get("attempts")
    if not isinstance(attempts, list):
        return []
    return [value for value in attempts if isinstance(value, str)]


def publisher(metadata: Mapping[str, Any]) -> str | None:
    """The ``traceparent`` of the publish span a record's delivery came from."""
    trace = metadata.get("trace")
    value = trace.get("publish") if isinstance(trace, Mapping) else None
    return value if isinstance(value, str) else None


def trace_metadata(publish: str | None, attempt: str | None) -> dict[str, Any] | None:
    """A new record's ``metadata["trace"]``: its publish span and first failed
    attempt (None when neither was sampled)."""
    if publish is None and attempt is None:
        return None
    trace: dict[str, Any] = {"attempts": [] if attempt is None else [attempt]}
    if publish is not None:
        trace["publish"] = publish
    return {"trace": trace}


def with_failed_attempt(metadata: Mapping[str, Any], traceparent: str | None) -> dict[str, Any]:
    """``metadata`` with ``traceparent`` added to its failed attempts (the newest
    ``MAX_REMEMBERED_ATTEMPTS`` are kept)."""
    updated = dict(metadata)
    if traceparent is None:
        return updated
    attempts = [*failed_attempts(metadata), traceparent][-MAX_REMEMBERED_ATTEMPTS:]
    trace = updated.get("trace")
    updated["trace"] = {
        **(trace if isinstance(trace, Mapping) else {}),
        "attempts": attempts,
    }
    return updated
