"""Guards around metrics and tracing back ends other than retrybus's own: an
error of theirs is logged (once per operation) and never reaches a delivery,
since a broken back end must not keep a failure from being recorded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._event import Event
from ._observe import DeliveryKind, DeliverySpan, Metrics, PublishSpan, Tracing, is_traceparent

if TYPE_CHECKING:
    from ._bus import EventBus

__all__ = ["GuardedMetrics", "GuardedTracing", "guarded"]

logger = logging.getLogger("retrybus")


def guarded(backend: Any, guard: type[_Guard]) -> Any:
    """``backend`` itself when its class says it never raises (retrybus's own;
    not their subclasses), else ``guard(backend)``."""
    if type(backend).__dict__.get("_never_raises", False):
        return backend
    return guard(backend)


class _Guard:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._failed: set[str] = set()

    def _report(self, operation: str) -> None:
        if operation not in self._failed:
            self._failed.add(operation)
            logger.exception(
                "%r failed in %s(); deliveries go on, what it reports may be off",
                self.inner,
                operation,
            )


class GuardedMetrics(_Guard):
    """Another ``Metrics``, guarded."""

    inner: Metrics

    def published(self, event_type: str) -> None:
        try:
            self.inner.published(event_type)
        except Exception:
            self._report("published")

    def handled(self, event_type: str, handler: str, ok: bool, seconds: float) -> None:
        try:
            self.inner.handled(event_type, handler, ok, seconds)
        except Exception:
            self._report("handled")

    def retry_scheduled(self, event_type: str, handler: str) -> None:
        try:
            self.inner.retry_scheduled(event_type, handler)
        except Exception:
            self._report("retry_scheduled")

    def retry_succeeded(self, event_type: str, handler: str) -> None:
        try:
            self.inner.retry_succeeded(event_type, handler)
        except Exception:
            self._report("retry_succeeded")

    def retry_lag(self, event_type: str, handler: str, seconds: float) -> None:
        try:
            self.inner.retry_lag(event_type, handler, seconds)
        except Exception:
            self._report("retry_lag")

    def dead_lettered(self, event_type: str, handler: str, reason: str) -> None:
        try:
            self.inner.dead_lettered(event_type, handler, reason)
        except Exception:
            self._report("dead_lettered")

    def reprocessed(self, event_type: str, handler: str, ok: bool) -> None:
        try:
            self.inner.reprocessed(event_type, handler, ok)
        except Exception:
            self._report("reprocessed")

    def requeued(self, event_type: str, handler: str) -> None:
        try:
            self.inner.requeued(event_type, handler)
        except Exception:
            self._report("requeued")

    async def refresh(self, bus: EventBus) -> None:
        await self.inner.refresh(bus)  # its callers log a failure themselves


class GuardedTracing(_Guard):
    """Another ``Tracing``, guarded, its spans too; a span it fails to make is
    replaced by none at all."""

    inner: Tracing

    @property
    def active(self) -> bool:
        try:
            return bool(self.inner.active)
        except Exception:
            self._report("active")
            return False

    def publish(self, event: Event) -> PublishSpan:
        try:
            span = self.inner.publish(event)
            traced = span.event
        except Exception:
            self._report("publish")
            return _NoPublishSpan(event)
        if not isinstance(traced, Event) or traced.id != event.id:
            self._report("publish (an event other than the one published)")
            traced = event
        return _GuardedPublishSpan(span, traced, self)

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
        try:
            span = self.inner.delivery(
                event, handler, kind=kind, attempt=attempt, failed=failed, publisher=publisher
            )
        except Exception:
            self._report("delivery")
            return _NO_DELIVERY_SPAN
        return _GuardedDeliverySpan(span, self)

    def requeue(
        self, event: Event, handler: str, failed: Sequence[str], publisher: str | None = None
    ) -> None:
        try:
            self.inner.requeue(event, handler, failed, publisher)
        except Exception:
            self._report("requeue")


def _checked_traceparent(span: PublishSpan | DeliverySpan, guard: GuardedTracing) -> str | None:
    try:
        value = span.traceparent
    except Exception:
        guard._report("traceparent")
        return None
    if value is None or is_traceparent(value):
        return value
    guard._report(f"traceparent (not a W3C traceparent: {value!r})")
    return None


class _GuardedPublishSpan:
    def __init__(self, span: PublishSpan, event: Event, guard: GuardedTracing) -> None:
        self._span, self._guard = span, guard
        self.event = event

    @property
    def traceparent(self) -> str | None:
        return _checked_traceparent(self._span, self._guard)

    def end(self, error: BaseException | None = None) -> None:
        try:
            self._span.end(error)
        except Exception:
            self._guard._report("PublishSpan.end")


class _NoPublishSpan:
    def __init__(self, event: Event) -> None:
        self.event = event

    traceparent = None

    def end(self, error: BaseException | None = None) -> None:
        return None


class _GuardedDeliverySpan:
    def __init__(self, span: DeliverySpan, guard: GuardedTracing) -> None:
        self._span, self._guard = span, guard
        self._entered = self._ended = False

    def __enter__(self) -> DeliverySpan:
        try:
            self._span.__enter__()
            self._entered = True
        except Exception:
            self._guard._report("DeliverySpan.__enter__")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._entered:
            return
        try:
            self._span.__exit__(exc_type, exc, tb)
        except Exception:
            self._guard._report("DeliverySpan.__exit__")

    @property
    def traceparent(self) -> str | None:
        return _checked_traceparent(self._span, self._guard)

    def end(self, outcome: str, reason: str | None = None) -> None:
        if self._ended:  # the first outcome stands, as the protocol says
            return
        self._ended = True
        try:
            self._span.end(outcome, reason)
        except Exception:
            self._guard._report("DeliverySpan.end")


class _NoDeliverySpan:
    def __enter__(self) -> DeliverySpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    traceparent = None

    def end(self, outcome: str, reason: str | None = None) -> None:
        return None


_NO_DELIVERY_SPAN = _NoDeliverySpan()
