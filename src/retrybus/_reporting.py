"""The three observers retrybus has: metrics (a ``Metrics`` back end such as
``retrybus.prometheus.PrometheusMetrics``), tracing (a ``Tracing`` back end such
as ``retrybus.otel.OpenTelemetryTracing``) and the log lines about deliveries.
Each turns the named points of ``_observers`` into what its back end records."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._event import Event
from ._observe import (
    Metrics,
    Tracing,
    failed_attempts,
    is_traceparent,
    last_failed_attempt,
    log_fields,
    publisher,
    reason_kind,
)
from ._observers import Delivery, Observer, Publication, Verdict, Written
from ._outcomes import DeadLettered, Rescheduled
from ._services import DEFAULT_SERVICE

if TYPE_CHECKING:
    from ._outcomes import Outcome
    from ._records import DeadLetterItem, RetryItem

__all__ = ["LogObserver", "MetricsObserver", "TracingObserver", "verdict_of"]

logger = logging.getLogger("retrybus")


class MetricsObserver(Observer):
    """Counts what happens for a ``Metrics`` back end, as ``service``'s (the bus's).

    A back end with a ``for_service(service)`` method (``PrometheusMetrics``) is
    given what each service counts through the object it returns: the bus's own
    service, or a record's service when the bus acts on another service's records
    (a removal's dead letters, a requeue). One without it (``Metrics`` does not
    require it) gets every figure itself, as before services."""

    def __init__(self, metrics: Metrics, service: str = DEFAULT_SERVICE) -> None:
        #: the back end as given (``bus.metrics``)
        self.backend = metrics
        self.service = service
        self._views: dict[str, Metrics] = {}
        #: what counts ``service``'s figures
        self.metrics = self._for(service)
        # retrybus's own back end is plain arithmetic; any other is guarded
        self.never_raises = bool(type(metrics).__dict__.get("_never_raises", False))

    def __repr__(self) -> str:
        return repr(self.backend)

    def _for(self, service: str) -> Metrics:
        """The back end's view of ``service`` (itself when it has no ``for_service``)."""
        view = self._views.get(service)
        if view is None:
            view = self.backend
            for_service = getattr(self.backend, "for_service", None)
            if for_service is not None:
                try:
                    view = for_service(service)
                except Exception:  # a back end that is down must not stop the bus
                    logger.exception(
                        "%r.for_service(%r) failed: %s's figures go to the back end itself",
                        self.backend,
                        service,
                        service,
                    )
                    view = self.backend
            if not isinstance(view, Metrics):
                raise TypeError(
                    f"{self.backend!r}.for_service({service!r}) must return a "
                    f"retrybus.Metrics, got {view!r}"
                )
            self._views[service] = view
        return view

    def _of_record(self, service: str) -> Metrics:
        return self.metrics if service == self.service else self._for(service)

    def publish_started(self, publication: Publication) -> None:
        self.metrics.published(publication.event.type)

    def call_ended(self, delivery: Delivery) -> None:
        event_type = delivery.event.type
        if delivery.due is not None and delivery.started_at is not None:
            lag = (delivery.started_at - delivery.due).total_seconds()
            self.metrics.retry_lag(event_type, delivery.handler, max(lag, 0.0))
        self.metrics.handled(event_type, delivery.handler, delivery.error is None, delivery.seconds)

    def recorded(
        self,
        delivery: Delivery | None,
        outcome: Outcome | None,
        verdict: Verdict,
        written: Written,
        reason: str | None = None,
    ) -> None:
        if delivery is not None and delivery.kind == "reprocess" and written == "applied":
            self.metrics.reprocessed(delivery.event.type, delivery.handler, verdict == "success")

    def retry_scheduled(self, item: RetryItem) -> None:
        self._of_record(item.service).retry_scheduled(item.event_type, item.handler_name)

    def retry_succeeded(self, item: RetryItem) -> None:
        self._of_record(item.service).retry_succeeded(item.event_type, item.handler_name)

    def dead_lettered(self, item: DeadLetterItem) -> None:
        self._of_record(item.service).dead_lettered(
            item.event_type, item.handler_name, reason_kind(item.reason)
        )

    def requeued(self, dead: DeadLetterItem, retry: RetryItem) -> None:
        self._of_record(dead.service).requeued(dead.event_type, dead.handler_name)

    def inbox_skipped(self, service: str, handler: str, event: Event) -> None:
        # not part of ``Metrics`` (a back end written before the inbox has none)
        count = getattr(self._of_record(service), "inbox_skipped", None)
        if count is not None:
            count(event.type, handler)


class TracingObserver(Observer):
    """Spans for a ``Tracing`` back end: one around each publish, one around each
    handler call, ended with what the store recorded. What the back end hands
    back is checked: a span that gives another event, or a malformed
    ``traceparent``, is logged (once) and left out.

    A call's span whose ``awaits_outcome`` is False (one that records nothing,
    such as an OpenTelemetry span of a trace not sampled) is let go once the
    call returns: nothing then waits for what the store records."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self._complained: set[str] = set()
        # retrybus's own back end says when its activity is settled for good
        # (a provider given to it): the hooks then need not ask
        self.always_active = getattr(tracing, "_fixed_activity", None) is True
        # and its spans' traceparents are W3C ones by construction
        self._trusted = bool(type(tracing).__dict__.get("_w3c_traceparents", False))

    def __repr__(self) -> str:
        return repr(self.tracing)

    @property
    def active(self) -> bool:
        return bool(self.tracing.active)

    def _complain(self, what: str) -> None:
        if what not in self._complained:
            self._complained.add(what)
            logger.error("%r: %s; left out of the trace", self.tracing, what)

    def _checked(self, value: object) -> str | None:
        """A span's ``traceparent``, if it is one (None: not sampled)."""
        if self._trusted or value is None or is_traceparent(value):
            return value  # type: ignore[return-value]
        self._complain(f"a span's traceparent is not a W3C traceparent: {value!r}")
        return None

    def publish_started(self, publication: Publication) -> None:
        if not self.always_active and not self.tracing.active:
            return
        event = publication.event
        span = self.tracing.publish(event)
        publication.span = span
        traced = span.event
        if traced is not event:
            if isinstance(traced, Event) and traced.id == event.id:
                publication.event = traced
            else:
                self._complain("its publish span gave an event other than the one published")
        value = span.traceparent
        if value is not None:
            publication.traceparent = self._checked(value)

    def publish_ended(self, publication: Publication, error: BaseException | None) -> None:
        if publication.span is not None:
            publication.span.end(error)

    def call_started(self, delivery: Delivery) -> None:
        if not self.always_active and not self.tracing.active:
            return
        metadata = delivery.metadata
        if metadata:
            span = self.tracing.delivery(
                delivery.event,
                delivery.handler,
                kind=delivery.kind,
                attempt=delivery.attempt,
                failed=failed_attempts(metadata),
                publisher=publisher(metadata),
            )
        else:  # a first call: no trace context stored yet
            span = self.tracing.delivery(
                delivery.event,
                delivery.handler,
                kind=delivery.kind,
                attempt=delivery.attempt,
                failed=(),
                publisher=None,
            )
        delivery.span = span
        span.__enter__()
        value = span.traceparent
        if value is not None:
            delivery.traceparent = self._checked(value)

    def call_ended(self, delivery: Delivery) -> None:
        span = delivery.span
        if span is None:
            return
        error = delivery.error
        if error is None:
            span.__exit__(None, None, None)
        else:
            span.__exit__(type(error), error, None)
        if getattr(span, "awaits_outcome", True) is False:
            delivery.span = None  # nothing waits for its outcome

    def recorded(
        self,
        delivery: Delivery | None,
        outcome: Outcome | None,
        verdict: Verdict,
        written: Written,
        reason: str | None = None,
    ) -> None:
        if delivery is None or delivery.span is None:
            return
        if written == "applied":
            delivery.span.end(verdict, reason)
        else:
            delivery.span.end(written)

    def requeued(self, dead: DeadLetterItem, retry: RetryItem) -> None:
        if self.tracing.active:
            self.tracing.requeue(
                dead.to_event(),
                dead.handler_name,
                failed_attempts(dead.metadata),
                publisher(dead.metadata),
            )


class LogObserver(Observer):
    """The log lines about deliveries: each failure that is retried (info), each
    dead letter (warning), with the delivery's ids as ``extra`` fields."""

    def recorded(
        self,
        delivery: Delivery | None,
        outcome: Outcome | None,
        verdict: Verdict,
        written: Written,
        reason: str | None = None,
    ) -> None:
        if written != "applied" or not isinstance(outcome, Rescheduled):
            return
        item = outcome.item
        delay = (item.next_retry - item.updated_at).total_seconds()
        failed = item.attempt - 1  # the attempt that just failed (0: the first call)
        traceparent = None if delivery is None else delivery.traceparent
        fields = log_fields(item.event_id, item.event_type, item.handler_name, failed, traceparent)
        if failed == 0:
            logger.info(
                "handler %s failed for event %s (%s), retry 1 in %.3gs: %s",
                item.handler_name,
                item.event_id,
                item.event_type,
                delay,
                item.error,
                extra=fields,
            )
        else:
            logger.info(
                "retry %d of handler %s failed for event %s, retry %d in %.3gs: %s",
                failed,
                item.handler_name,
                item.event_id,
                item.attempt,
                delay,
                item.error,
                extra=fields,
            )

    def inbox_skipped(self, service: str, handler: str, event: Event) -> None:
        logger.debug(
            "skipped event %s (%s) for handler %s of service %s: the inbox says it "
            "was handled before",
            event.id,
            event.type,
            handler,
            service,
            extra={
                "event_id": event.id,
                "event_type": event.type,
                "handler": handler,
                "service": service,
            },
        )

    def dead_lettered(self, item: DeadLetterItem) -> None:
        logger.warning(
            "dead-lettered event %s (%s) for handler %s: %s (%s)",
            item.event_id,
            item.event_type,
            item.handler_name,
            item.reason,
            item.error,
            extra={
                **log_fields(
                    item.event_id,
                    item.event_type,
                    item.handler_name,
                    item.attempt,
                    last_failed_attempt(item.metadata),
                ),
                "reason": item.reason,
            },
        )


def verdict_of(outcome: Outcome) -> tuple[Verdict, str | None]:
    """What an outcome means for a delivery's span and logs: the verdict and,
    for a dead letter, its reason."""
    if isinstance(outcome, DeadLettered):
        return "dead_letter", outcome.dead_letter.reason
    if isinstance(outcome, Rescheduled):
        return "retry", None
    return "success", None
