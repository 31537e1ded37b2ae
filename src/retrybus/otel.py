"""OpenTelemetry tracing for retrybus (``pip install "retrybus[otel]"``).

>>> from retrybus.otel import OpenTelemetryTracing
>>> bus = EventBus(store, tracing=OpenTelemetryTracing())

It uses only ``opentelemetry-api``: spans go wherever the application's
tracer provider sends them (without an SDK configured, nowhere, at almost no cost).

The spans:

* ``publish <type>`` (PRODUCER) around ``bus.publish``. An event without a
  ``traceparent`` extension gets this span's, so the trace context travels with
  the event into the retry queue and the dead letter queue.
* ``handle <type>`` (CONSUMER), a child of it, for each handler's first call.
* ``retry <type>`` (CONSUMER) for each retry a worker makes, a **child of the
  publish span** (its ``traceparent`` is kept in the record's
  ``metadata["trace"]["publish"]``; else the event's), with a **link to the
  failed attempt before it**; it ends once the store has the outcome. A retry that runs an hour later in another
  process is thus part of the trace of the publish that caused it: one trace
  tells an event's whole story, and the link leads from each attempt to the
  one that failed before it.
* ``reprocess <type>`` (CONSUMER) and ``requeue <type>`` (INTERNAL) for a dead
  letter's reprocess and requeue, children of the publish span too, linked
  to every failed attempt the dead letter remembers (the newest 16).

A failed handler call has the exception recorded and an ERROR status;
``retrybus.outcome`` says what became of the delivery (``success``,
``retry``, ``dead_letter``, ``failure``, ``lost``, ``error``),
``retrybus.dead_letter.reason`` why it was dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(f"retrybus tracing needs {exc.name}: pip install 'retrybus[otel]'") from exc

from ._observe import DeliveryKind, is_traceparent

if TYPE_CHECKING:
    from ._event import Event

__all__ = ["OpenTelemetryTracing"]

_KINDS = {
    "publish": ("handle", trace.SpanKind.CONSUMER),
    "retry": ("retry", trace.SpanKind.CONSUMER),
    "reprocess": ("reprocess", trace.SpanKind.CONSUMER),
}


def _traceparent(context: trace.SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _span_context(traceparent: str, tracestate: str | None = None) -> trace.SpanContext | None:
    """The span context a W3C ``traceparent`` names (None: malformed or invalid)."""
    if not is_traceparent(traceparent):
        return None
    _version, trace_hex, span_hex, flags_hex = traceparent.split("-")[:4]
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    flags = int(flags_hex, 16)
    if not trace_id or not span_id:
        return None
    state = trace.TraceState.from_header([tracestate]) if tracestate else None
    return trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags), trace_state=state
    )


def _remote_context(extensions: Any) -> otel_context.Context | None:
    """The context an event's ``traceparent`` names (None: it has none)."""
    traceparent = extensions.get("traceparent")
    if traceparent is None:
        return None
    return _context_of(traceparent, extensions.get("tracestate"))


def _context_of(traceparent: str, tracestate: str | None = None) -> otel_context.Context | None:
    span_context = _span_context(traceparent, tracestate)
    if span_context is None:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def _origin(event: Event, publisher: str | None) -> otel_context.Context | None:
    """The publish span's context: as the record kept it, else the event's own."""
    if publisher is not None:
        context = _context_of(publisher)  # the event's tracestate is its origin's
        if context is not None:
            return context
    return _remote_context(event.extensions)


def _links(traceparents: Sequence[str]) -> list[trace.Link]:
    links = []
    for value in traceparents:
        context = _span_context(value)
        if context is not None:
            links.append(trace.Link(context, {"retrybus.link": "failed_attempt"}))
    return links


def _attributes(event: Event, handler: str | None = None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "retrybus",
        "messaging.destination.name": event.type,
        "messaging.message.id": event.id,
    }
    if handler is not None:
        attributes["retrybus.handler"] = handler
    return attributes


_NO_SPANS = (trace.NoOpTracerProvider, trace.ProxyTracerProvider)


def _makes_spans(provider: trace.TracerProvider) -> bool:
    # the global provider is a proxy until the application sets one
    return not isinstance(provider, _NO_SPANS)


def _sampled_traceparent(span: trace.Span) -> str | None:
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return _traceparent(context)


class _PublishSpan:
    __slots__ = ("_span", "_token", "event")

    def __init__(self, span: trace.Span, event: Event) -> None:
        self._span = span
        self.event = event
        # current until end(): the handlers' spans become its children
        self._token = otel_context.attach(trace.set_span_in_context(span))

    @property
    def traceparent(self) -> str | None:
        return _sampled_traceparent(self._span)

    def end(self, error: BaseException | None = None) -> None:
        otel_context.detach(self._token)
        if error is not None:
            self._span.record_exception(error)
            self._span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
        self._span.end()


class _DeliverySpan:
    __slots__ = ("_ended", "_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token: object | None = None
        self._ended = False

    def __enter__(self) -> _DeliverySpan:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        if exc is not None:
            self._span.record_exception(exc)
            self._span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")

    @property
    def traceparent(self) -> str | None:
        return _sampled_traceparent(self._span)

    def end(self, outcome: str, reason: str | None = None) -> None:
        if self._ended:  # the first outcome stands
            return
        self._ended = True
        span = self._span
        if span.is_recording():
            span.set_attribute("retrybus.outcome", outcome)
            if reason is not None:
                span.set_attribute("retrybus.dead_letter.reason", reason)
        span.end()


class _UntracedPublish:
    """A publish the tracer made no span for (no SDK: the API's no-op tracer)."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    @property
    def traceparent(self) -> str | None:
        return None

    def end(self, error: BaseException | None = None) -> None:
        return None


class _Untraced:
    """A handler call the tracer made no span for: nothing to attach or end."""

    __slots__ = ()

    def __enter__(self) -> _Untraced:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    @property
    def traceparent(self) -> str | None:
        return None

    def end(self, *args: object) -> None:
        return None


_NOT_TRACED = _Untraced()


class OpenTelemetryTracing:
    """Spans for publishes, handler calls, retries and dead-letter actions, made
    by ``tracer_provider`` (default: the global one, as set by the application's
    OpenTelemetry SDK or ``opentelemetry-instrument``)."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        from . import __version__

        if tracer_provider is not None and not isinstance(tracer_provider, trace.TracerProvider):
            raise TypeError(
                f"tracer_provider must be an opentelemetry TracerProvider, got {tracer_provider!r}"
            )
        if isinstance(tracer_provider, trace.ProxyTracerProvider):
            tracer_provider = None  # the global one, as it will be once the SDK is set up
        self._provider = tracer_provider
        self._tracer = trace.get_tracer("retrybus", __version__, tracer_provider)
        self._fixed_activity = None if tracer_provider is None else _makes_spans(tracer_provider)

    @property
    def active(self) -> bool:
        """Whether spans go anywhere: False with the API's no-op provider, or with
        the global one before the application sets up an SDK."""
        if self._fixed_activity is not None:
            return self._fixed_activity
        return _makes_spans(trace.get_tracer_provider())

    def publish(self, event: Event) -> _PublishSpan | _UntracedPublish:
        """Start the span of publishing ``event``; the event it hands back carries
        the span's ``traceparent`` unless it had a valid one already."""
        carried = _remote_context(event.extensions)
        parent = None
        links: list[trace.Link] = []
        if carried is not None:
            if trace.get_current_span().get_span_context().is_valid:
                # published from inside another trace: that one is the parent,
                # the event's own origin a link
                links.append(
                    trace.Link(
                        trace.get_current_span(carried).get_span_context(),
                        {"retrybus.link": "event_origin"},
                    )
                )
            else:
                parent = carried
        span = self._tracer.start_span(
            f"publish {event.type}",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            attributes=_attributes(event),
            links=links,
        )
        span_context = span.get_span_context()
        if not span_context.is_valid:  # no SDK: the API's no-op tracer
            return _UntracedPublish(event)
        if carried is None:  # none, or one that names no valid span: start afresh
            extensions = {"traceparent": _traceparent(span_context)}
            if span_context.trace_state:
                extensions["tracestate"] = span_context.trace_state.to_header()
            event = event.with_extensions(extensions)
        return _PublishSpan(span, event)

    def delivery(
        self,
        event: Event,
        handler: str,
        *,
        kind: DeliveryKind,
        attempt: int,
        failed: Sequence[str] = (),
        publisher: str | None = None,
    ) -> _DeliverySpan | _Untraced:
        """A span for calling ``handler`` (made current by ``with``, ended by ``end``):
        for a retry or reprocess, a child of ``publisher`` (the publish span's
        ``traceparent``, else the event's)."""
        verb, span_kind = _KINDS[kind]
        if kind == "publish":
            parent = None  # the publish span is current
            links: list[trace.Link] = []
        else:
            parent = _origin(event, publisher)
            links = _links(failed[-1:] if kind == "retry" else failed)
        attributes = _attributes(event, handler)
        attributes["retrybus.attempt"] = attempt
        span = self._tracer.start_span(
            f"{verb} {event.type}",
            context=parent,
            kind=span_kind,
            attributes=attributes,
            links=links,
        )
        if not span.get_span_context().is_valid:
            return _NOT_TRACED
        return _DeliverySpan(span)

    def requeue(
        self, event: Event, handler: str, failed: Sequence[str], publisher: str | None = None
    ) -> None:
        """Record a dead letter's requeue as a span linked to its failed attempts."""
        self._tracer.start_span(
            f"requeue {event.type}",
            context=_origin(event, publisher),
            kind=trace.SpanKind.INTERNAL,
            attributes=_attributes(event, handler),
            links=_links(failed),
        ).end()
