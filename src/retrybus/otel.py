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

What it costs: each span goes through the SDK as the application set it up,
with one exception that changes no span. With the SDK's ``ParentBased`` sampler
(its default, and ``parentbased_traceidratio``), a span whose parent is not
sampled is dropped whatever it is; retrybus makes that dropped span itself (the
``NonRecordingSpan`` the SDK would make: same trace, its own span id, the
parent's flags and trace state), without asking the sampler. So with 1 % of
traces sampled, a handler's span or a retry's in the other 99 % costs about a
tenth of an SDK span, and so does a publish span inside a request span not
sampled. Such spans record nothing, so nothing waits for their outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
    from opentelemetry.trace.span import DEFAULT_TRACE_STATE
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(f"retrybus tracing needs {exc.name}: pip install 'retrybus[otel]'") from exc

from ._observe import DeliveryKind, is_traceparent

if TYPE_CHECKING:
    from ._event import Event

__all__ = ["OpenTelemetryTracing"]

_KINDS = {
    "publish": ("handle", trace.SpanKind.CONSUMER),
    "deliver": ("handle", trace.SpanKind.CONSUMER),
    "retry": ("retry", trace.SpanKind.CONSUMER),
    "reprocess": ("reprocess", trace.SpanKind.CONSUMER),
}

_PRODUCER = trace.SpanKind.PRODUCER
_attach, _detach = otel_context.attach, otel_context.detach
_current_context, _current_span = otel_context.get_current, trace.get_current_span
_in_context = trace.set_span_in_context
_SAMPLED = TraceFlags.SAMPLED
#: the W3C "random trace id" flag (0 where the API predates it)
_RANDOM = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_NOT_SAMPLED_RANDOM = TraceFlags(TraceFlags.DEFAULT | _RANDOM)


def _traceparent(context: SpanContext) -> str:
    # %-formatting: a third cheaper than an f-string here, and this runs for every publish
    return "00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags)  # noqa: UP031


def _span_context(traceparent: str, tracestate: str | None = None) -> SpanContext | None:
    """The span context a W3C ``traceparent`` names (None: malformed or invalid)."""
    if not is_traceparent(traceparent):
        return None
    _version, trace_hex, span_hex, flags_hex = traceparent.split("-")[:4]
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    flags = int(flags_hex, 16)
    if not trace_id or not span_id:
        return None
    state = TraceState.from_header([tracestate]) if tracestate else None
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags), trace_state=state
    )


def _carried(extensions: Any) -> SpanContext | None:
    """The span context an event's ``traceparent`` names (None: it has none)."""
    traceparent = extensions.get("traceparent")
    if traceparent is None:
        return None
    return _span_context(traceparent, extensions.get("tracestate"))


def _origin(event: Event, publisher: str | None) -> SpanContext | None:
    """The publish span's context: as the record kept it, else the event's own."""
    if publisher is not None:
        context = _span_context(publisher)  # the event's tracestate is its origin's
        if context is not None:
            return context
    return _carried(event.extensions)


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


def _sampled_traceparent(context: SpanContext) -> str | None:
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return _traceparent(context)


class _Unsampled:
    """The spans the SDK makes for the children of a parent that is not sampled,
    made here without its whole path (sampler, span limits, processors), when
    that gives the very spans it would give.

    That is so for the SDK's own tracer with a ``ParentBased`` sampler whose
    delegates for a parent not sampled (remote or local) are ``ALWAYS_OFF``
    (the default, and what ``parentbased_traceidratio`` sets up): for such a
    parent the SDK makes a ``NonRecordingSpan`` with the parent's trace id and
    trace state, a span id from the tracer's id generator, and flags that only
    say whether the trace id is random, as the parent's do. It is checked once
    against the SDK itself (``find``), and before each use that the tracer
    still has that sampler and is enabled; the SDK's own metrics about spans
    (opt-in) rule it out."""

    __slots__ = ("_config", "_sampler", "_tracer")

    def __init__(self, tracer: Any, sampler: object, configurable: bool) -> None:
        self._tracer = tracer
        self._sampler = sampler
        self._config = configurable

    @classmethod
    def find(cls, tracer: trace.Tracer) -> _Unsampled | None:
        """The short cut for ``tracer``, if it holds there."""
        try:
            from opentelemetry.sdk.trace import Tracer as SdkTracer
            from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
        except ImportError:  # pragma: no cover - an API without the SDK makes no spans
            return None
        if type(tracer) is not SdkTracer:
            return None
        sampler = tracer.sampler
        if type(sampler) is not ParentBased:
            return None
        for delegate in ("_local_parent_not_sampled", "_remote_parent_not_sampled"):
            if getattr(sampler, delegate, None) is not ALWAYS_OFF:
                return None
        metrics = getattr(tracer, "_tracer_metrics", None)
        if metrics is not None and type(metrics).__name__ != "NoOpTracerMetrics":
            return None  # each span the SDK starts is counted
        config = getattr(tracer, "_tracer_config", None)
        if config is not None and not isinstance(getattr(config, "is_enabled", None), bool):
            return None
        shortcut = cls(tracer, sampler, config is not None)
        # what this SDK makes for such children, against what the short cut makes
        state = TraceState([("retrybus", "probe")])
        for remote in (False, True):
            for flags in sorted({TraceFlags.DEFAULT, _RANDOM}):
                parent = SpanContext(0x7E7B05, 0xB05, remote, TraceFlags(flags), state)
                made = tracer.start_span(
                    "retrybus probe",
                    context=_in_context(NonRecordingSpan(parent)),
                    kind=trace.SpanKind.CONSUMER,
                    attributes={"messaging.system": "retrybus"},
                )
                made.end()
                ours = shortcut.child(parent)
                if type(made) is not NonRecordingSpan or ours is None:
                    return None
                got, want = made.get_span_context(), ours.get_span_context()
                if (
                    not got.is_valid
                    or got.span_id == parent.span_id
                    or tuple(got)[:1] + tuple(got)[2:] != tuple(want)[:1] + tuple(want)[2:]
                ):
                    return None
        return shortcut

    def child(self, parent: SpanContext) -> NonRecordingSpan | None:
        """The span the SDK makes for a child of ``parent``, which is not sampled
        (None: the tracer no longer samples, or is no longer enabled, as when it
        was checked)."""
        tracer = self._tracer
        if tracer.sampler is not self._sampler or (
            self._config and tracer._tracer_config.is_enabled is not True
        ):
            return None
        flags = _NOT_SAMPLED_RANDOM if parent.trace_flags & _RANDOM else _NOT_SAMPLED
        span_id = tracer.id_generator.generate_span_id()
        return NonRecordingSpan(
            SpanContext(parent.trace_id, span_id, False, flags, parent.trace_state)
        )


class _PublishSpan:
    __slots__ = ("_span", "_token", "event", "traceparent")

    def __init__(self, span: trace.Span, event: Event, traceparent: str | None) -> None:
        self._span = span
        self.event = event
        self.traceparent = traceparent
        # current until end(): the handlers' spans become its children
        self._token = _attach(_in_context(span))

    def end(self, error: BaseException | None = None) -> None:
        _detach(self._token)
        if error is not None:
            self._span.record_exception(error)
            self._span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
        self._span.end()


class _UnrecordedPublish:
    """A publish span that records nothing (a ``NonRecordingSpan``: the sampler
    dropped it): current until the publish ends, with nothing to end."""

    __slots__ = ("_token", "event", "traceparent")

    def __init__(self, span: NonRecordingSpan, event: Event, traceparent: str | None) -> None:
        self.event = event
        self.traceparent = traceparent
        self._token = _attach(_in_context(span))

    def end(self, error: BaseException | None = None) -> None:
        _detach(self._token)


class _DeliverySpan:
    __slots__ = ("_ended", "_span", "_token", "traceparent")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token: object | None = None
        self._ended = False
        self.traceparent = _sampled_traceparent(span.get_span_context())

    def __enter__(self) -> _DeliverySpan:
        self._token = _attach(_in_context(self._span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _detach(self._token)  # type: ignore[arg-type]
            self._token = None
        if exc is not None:
            self._span.record_exception(exc)
            self._span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")

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


class _UnrecordedCall:
    """A handler call's span that records nothing (a ``NonRecordingSpan``, its
    trace not sampled): current while the handler runs, with nothing to end, so
    nothing waits for the call's outcome."""

    __slots__ = ("_span", "_token")

    #: the observers need not tell it what became of the delivery
    awaits_outcome = False
    traceparent = None

    def __init__(self, span: NonRecordingSpan) -> None:
        self._span = span
        self._token: object | None = None

    def __enter__(self) -> _UnrecordedCall:
        self._token = _attach(_in_context(self._span))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def end(self, outcome: str, reason: str | None = None) -> None:
        return None


class _UntracedPublish:
    """A publish the tracer made no span for (no SDK: the API's no-op tracer)."""

    __slots__ = ("event",)

    traceparent = None

    def __init__(self, event: Event) -> None:
        self.event = event

    def end(self, error: BaseException | None = None) -> None:
        return None


class _Untraced:
    """A handler call the tracer made no span for: nothing to attach or end."""

    __slots__ = ()

    awaits_outcome = False
    traceparent = None

    def __enter__(self) -> _Untraced:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def end(self, *args: object) -> None:
        return None


_NOT_TRACED = _Untraced()
#: the short cut is not looked for yet
_UNKNOWN: Any = object()


class OpenTelemetryTracing:
    """Spans for publishes, handler calls, retries and dead-letter actions, made
    by ``tracer_provider`` (default: the global one, as set by the application's
    OpenTelemetry SDK or ``opentelemetry-instrument``)."""

    #: its spans' ``traceparent`` is always a W3C one (``_traceparent``): the
    #: tracing observer need not check it
    _w3c_traceparents = True

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        from . import __version__

        if tracer_provider is not None and not isinstance(tracer_provider, trace.TracerProvider):
            raise TypeError(
                f"tracer_provider must be an opentelemetry TracerProvider, got {tracer_provider!r}"
            )
        if isinstance(tracer_provider, trace.ProxyTracerProvider):
            tracer_provider = None  # the global one, as it will be once the SDK is set up
        self._provider = tracer_provider
        self._version = __version__
        self._tracer = trace.get_tracer("retrybus", __version__, tracer_provider)
        #: whether spans go anywhere, once that is settled: a provider given, or
        #: the global one once the application has set it (it is set only once)
        self._fixed_activity = None if tracer_provider is None else _makes_spans(tracer_provider)
        self._unsampled: _Unsampled | None = _UNKNOWN

    @property
    def active(self) -> bool:
        """Whether spans go anywhere: False with the API's no-op provider, or with
        the global one before the application sets up an SDK."""
        if self._fixed_activity is not None:
            return self._fixed_activity
        if _makes_spans(trace.get_tracer_provider()):
            self._fixed_activity = True  # the global provider is set for good
            return True
        return False

    def _dropped_child(self, parent: SpanContext) -> NonRecordingSpan | None:
        """The span the SDK makes for a child of ``parent`` (not sampled), where
        the short cut holds (``_Unsampled``); else None."""
        shortcut = self._unsampled
        if shortcut is _UNKNOWN:
            if not self._fixed_activity:  # the global provider, not set yet
                return None
            tracer = self._tracer
            if self._provider is None:  # the tracer the global one's proxy hands spans to
                tracer = trace.get_tracer_provider().get_tracer("retrybus", self._version)
            shortcut = self._unsampled = _Unsampled.find(tracer)
        return None if shortcut is None else shortcut.child(parent)

    def publish(self, event: Event) -> _PublishSpan | _UnrecordedPublish | _UntracedPublish:
        """Start the span of publishing ``event``; the event it hands back carries
        the span's ``traceparent`` unless it had a valid one already."""
        carried = _carried(event.extensions)
        # the current context, looked up once: what the SDK takes for context=None
        parent = _current_context()
        parent_context = _current_span(parent).get_span_context()
        links: Sequence[trace.Link] = ()
        if carried is not None:
            if parent_context.is_valid:
                # published from inside another trace: that one is the parent,
                # the event's own origin a link
                links = (trace.Link(carried, {"retrybus.link": "event_origin"}),)
            else:
                parent = _in_context(NonRecordingSpan(carried))
                parent_context = carried
        span: trace.Span | None = None
        if parent_context.is_valid and not parent_context.trace_flags & _SAMPLED:
            span = self._dropped_child(parent_context)
        if span is None:
            span = self._tracer.start_span(
                f"publish {event.type}",
                context=parent,
                kind=_PRODUCER,
                attributes={
                    "messaging.system": "retrybus",
                    "messaging.destination.name": event.type,
                    "messaging.message.id": event.id,
                },
                links=links,
            )
        span_context = span.get_span_context()
        if not span_context.is_valid:  # no SDK: the API's no-op tracer
            return _UntracedPublish(event)
        sampled = span_context.trace_flags.sampled
        traceparent = None
        if carried is None:  # none, or one that names no valid span: start afresh
            traceparent = _traceparent(span_context)
            extensions = {"traceparent": traceparent}
            state = span_context.trace_state
            if state is not DEFAULT_TRACE_STATE and state:
                extensions["tracestate"] = state.to_header()
            event = event.with_extensions(extensions)
        if sampled and traceparent is None:
            traceparent = _traceparent(span_context)
        if type(span) is NonRecordingSpan:
            return _UnrecordedPublish(span, event, traceparent if sampled else None)
        return _PublishSpan(span, event, traceparent if sampled else None)

    def delivery(
        self,
        event: Event,
        handler: str,
        *,
        kind: DeliveryKind,
        attempt: int,
        failed: Sequence[str] = (),
        publisher: str | None = None,
    ) -> _DeliverySpan | _UnrecordedCall | _Untraced:
        """A span for calling ``handler`` (made current by ``with``, ended by ``end``):
        for a retry or reprocess, a child of ``publisher`` (the publish span's
        ``traceparent``, else the event's)."""
        origin: SpanContext | None = None
        parent_context: SpanContext | None
        if kind == "publish":  # the publish span is current
            current = _current_context()
            parent_context = _current_span(current).get_span_context()
        else:
            origin = parent_context = _origin(event, publisher)
        if (
            parent_context is not None
            and parent_context.is_valid
            and not parent_context.trace_flags & _SAMPLED
        ):
            dropped = self._dropped_child(parent_context)
            if dropped is not None:
                return _UnrecordedCall(dropped)
        verb, span_kind = _KINDS[kind]
        parent: otel_context.Context | None
        if kind == "publish":
            parent = current  # what the SDK takes for context=None
            links: Sequence[trace.Link] = ()
        else:
            parent = None if origin is None else _in_context(NonRecordingSpan(origin))
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
        span_context = span.get_span_context()
        if not span_context.is_valid:
            return _NOT_TRACED
        if type(span) is NonRecordingSpan and not span_context.trace_flags.sampled:
            return _UnrecordedCall(span)
        return _DeliverySpan(span)

    def requeue(
        self, event: Event, handler: str, failed: Sequence[str], publisher: str | None = None
    ) -> None:
        """Record a dead letter's requeue as a span linked to its failed attempts."""
        origin = _origin(event, publisher)
        self._tracer.start_span(
            f"requeue {event.type}",
            context=None if origin is None else _in_context(NonRecordingSpan(origin)),
            kind=trace.SpanKind.INTERNAL,
            attributes=_attributes(event, handler),
            links=_links(failed),
        ).end()
