"""OpenTelemetry tracing: the spans of publishes, handler calls, retries and
dead-letter actions, caught by the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

import retrybus
from retrybus import Event, EventBus, FixedDelay, ManualClock, PermanentError, RetryWorker, Store
from retrybus.otel import OpenTelemetryTracing


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def traced_bus(
    provider: TracerProvider, clock: ManualClock, store: Store | None = None
) -> EventBus:
    return EventBus(
        store or retrybus.open_store("memory://"),
        clock=clock,
        default_policy=FixedDelay(delay=1, max_retries=2),
        tracing=OpenTelemetryTracing(provider),
    )


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = spans(exporter, name)
    return span


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def ids(span: ReadableSpan) -> tuple[int, int]:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id, context.span_id


async def always_fails(event: Event) -> None:
    raise TimeoutError("connection timeout")


async def test_publish_is_a_span_and_each_handler_call_a_child_of_it(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    bus = traced_bus(provider, clock)
    bus.subscribe("like.added", lambda event: None, name="count")
    bus.subscribe("like.added", always_fails, name="notify")
    result = await bus.publish(Event("like.added", {"post_id": 7}))

    publish = only(exporter, "publish like.added")
    assert publish.kind is trace.SpanKind.PRODUCER
    assert publish.attributes is not None
    assert publish.attributes["messaging.message.id"] == result.event.id
    handled = {
        span.attributes["retrybus.handler"]: span for span in spans(exporter, "handle like.added")
    }  # type: ignore[index]
    assert set(handled) == {"count", "notify"}
    for span in handled.values():
        assert span.parent is not None
        assert span.parent.span_id == ids(publish)[1]
        assert span.kind is trace.SpanKind.CONSUMER
        assert span.attributes is not None
        assert span.attributes["retrybus.attempt"] == 0
    assert handled["count"].attributes["retrybus.outcome"] == "success"  # type: ignore[index]
    assert handled["count"].status.status_code is trace.StatusCode.UNSET
    failed = handled["notify"]
    assert failed.attributes["retrybus.outcome"] == "retry"  # type: ignore[index]
    assert failed.status.status_code is trace.StatusCode.ERROR
    (exception,) = [e for e in failed.events if e.name == "exception"]
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "TimeoutError"
    assert exception.attributes["exception.message"] == "connection timeout"

    # the publisher's context travels with the event into the retry queue
    assert result.event.extensions["traceparent"] == traceparent_of(publish)
    (item,) = result.retry_items
    assert item.event_extensions["traceparent"] == traceparent_of(publish)
    assert item.metadata["trace"] == {
        "attempts": [traceparent_of(failed)],
        "publish": traceparent_of(publish),
    }
    stored = await bus.retry_queue.get(item.id)
    assert stored.event_extensions["traceparent"] == traceparent_of(publish)


async def test_retries_are_children_of_the_publish_each_linked_to_the_attempt_before(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock, store: Store
) -> None:
    bus = traced_bus(provider, clock, store)
    bus.subscribe("job", always_fails, name="job")
    await bus.publish(Event("job"))
    worker = RetryWorker(bus)
    for _ in range(2):
        clock.advance(1)
        assert await worker.run_once() == 1

    publish = only(exporter, "publish job")
    first = only(exporter, "handle job")
    retries = sorted(spans(exporter, "retry job"), key=lambda s: s.attributes["retrybus.attempt"])  # type: ignore[index]
    assert [s.attributes["retrybus.attempt"] for s in retries] == [1, 2]  # type: ignore[index]
    previous = first
    for retry in retries:
        assert retry.kind is trace.SpanKind.CONSUMER
        assert retry.parent is not None
        assert (retry.parent.trace_id, retry.parent.span_id) == ids(publish)
        (link,) = retry.links
        assert (link.context.trace_id, link.context.span_id) == ids(previous)
        assert link.attributes == {"retrybus.link": "failed_attempt"}
        assert retry.status.status_code is trace.StatusCode.ERROR
        previous = retry
    assert retries[0].attributes["retrybus.outcome"] == "retry"  # type: ignore[index]
    assert retries[1].attributes["retrybus.outcome"] == "dead_letter"  # type: ignore[index]
    assert retries[1].attributes["retrybus.dead_letter.reason"] == "failed after 2 retries"  # type: ignore[index]

    # the dead letter remembers every failed attempt, on every engine
    (dead,) = await bus.dead_letters.list()
    assert dead.metadata["trace"]["attempts"] == [traceparent_of(s) for s in (first, *retries)]
    assert dead.event_extensions["traceparent"] == traceparent_of(publish)


async def test_a_workers_first_delivery_is_a_handle_span_child_of_the_publish(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock, store: Store
) -> None:
    bus = traced_bus(provider, clock, store)
    calls: list[int] = []

    async def count(event: Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("connection timeout")

    bus.subscribe("job", count, name="job")
    result = await bus.publish(Event("job"), defer=True)
    assert result.pending == ("job",)
    worker = RetryWorker(bus)
    assert await worker.run_once() == 1  # the first delivery: it fails
    clock.advance(1)
    assert await worker.run_once() == 1  # its retry: it works

    publish = only(exporter, "publish job")
    first = only(exporter, "handle job")  # not called a retry: nothing failed before it
    retry = only(exporter, "retry job")
    assert first.kind is trace.SpanKind.CONSUMER
    assert first.parent is not None
    assert (first.parent.trace_id, first.parent.span_id) == ids(publish)
    assert first.links == ()
    assert first.attributes["retrybus.attempt"] == 0  # type: ignore[index]
    assert first.attributes["retrybus.outcome"] == "retry"  # type: ignore[index]
    assert retry.parent is not None
    assert (retry.parent.trace_id, retry.parent.span_id) == ids(publish)
    (link,) = retry.links
    assert (link.context.trace_id, link.context.span_id) == ids(first)


async def test_reprocess_and_requeue_link_back_to_the_failures_of_the_dead_letter(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    bus = traced_bus(provider, clock)
    broken = True

    async def handler(event: Event) -> None:
        if broken:
            raise TimeoutError("still down")

    bus.subscribe("job", handler, name="job")
    await bus.publish(Event("job"))
    worker = RetryWorker(bus)
    for _ in range(2):
        clock.advance(1)
        await worker.run_once()
    (dead,) = await bus.dead_letters.list()
    failures = dead.metadata["trace"]["attempts"]
    assert len(failures) == 3

    await bus.dead_letters.reprocess(dead.id)  # fails again
    failed_reprocess = only(exporter, "reprocess job")
    assert failed_reprocess.attributes["retrybus.outcome"] == "failure"  # type: ignore[index]
    assert failed_reprocess.status.status_code is trace.StatusCode.ERROR
    assert [traceparent_of_link(link) for link in failed_reprocess.links] == failures
    publish = only(exporter, "publish job")
    assert failed_reprocess.parent is not None
    assert failed_reprocess.parent.span_id == ids(publish)[1]
    again = await bus.dead_letters.get(dead.id)
    assert again.metadata["trace"]["attempts"] == [*failures, traceparent_of(failed_reprocess)]

    broken = False
    await bus.dead_letters.requeue(dead.id)
    requeue = only(exporter, "requeue job")
    assert [traceparent_of_link(link) for link in requeue.links] == again.metadata["trace"][
        "attempts"
    ]
    assert requeue.parent is not None
    assert requeue.parent.span_id == ids(publish)[1]


def traceparent_of_link(link: trace.Link) -> str:
    context = link.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


async def test_a_dead_letter_at_publish_records_its_failure(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    bus = traced_bus(provider, clock)

    async def permanent(event: Event) -> None:
        raise PermanentError("bad payload")

    bus.subscribe("job", permanent, name="job")
    result = await bus.publish(Event("job"))
    handled = only(exporter, "handle job")
    assert handled.attributes["retrybus.outcome"] == "dead_letter"  # type: ignore[index]
    assert handled.attributes["retrybus.dead_letter.reason"] == "non-retryable: PermanentError"  # type: ignore[index]
    (dead,) = result.dead_letters
    stored = await bus.dead_letters.get(dead.id)
    assert stored.metadata["trace"] == {
        "attempts": [traceparent_of(handled)],
        "publish": traceparent_of(only(exporter, "publish job")),
    }


async def test_an_event_carrying_a_traceparent_keeps_it_and_continues_its_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    bus = traced_bus(provider, clock)
    bus.subscribe("job", lambda event: None, name="job")
    upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    result = await bus.publish(Event("job", extensions={"traceparent": upstream}))
    assert result.event.extensions["traceparent"] == upstream
    publish = only(exporter, "publish job")
    assert publish.parent is not None
    assert (publish.parent.trace_id, publish.parent.span_id) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
    )

    # published from inside a span: that span is the parent, the event's origin a link
    exporter.clear()
    with provider.get_tracer("test").start_as_current_span("request") as request:
        await bus.publish(Event("job", extensions={"traceparent": upstream}))
    publish = only(exporter, "publish job")
    assert publish.parent is not None
    assert publish.parent.span_id == request.get_span_context().span_id
    (link,) = publish.links
    assert link.context.span_id == 0xB7AD6B7169203331
    assert link.attributes == {"retrybus.link": "event_origin"}


async def test_a_handler_s_own_spans_are_children_of_its_call(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    bus = traced_bus(provider, clock)
    tracer = provider.get_tracer("app")

    async def handler(event: Event) -> None:
        with tracer.start_as_current_span("app work"):
            pass

    bus.subscribe("job", handler, name="job")
    await bus.publish(Event("job"))
    work, call = only(exporter, "app work"), only(exporter, "handle job")
    assert work.parent is not None
    assert work.parent.span_id == ids(call)[1]


async def test_spans_not_sampled_store_no_trace_links(
    exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = traced_bus(provider, clock)
    bus.subscribe("job", always_fails, name="job")
    result = await bus.publish(Event("job"))
    assert exporter.get_finished_spans() == ()
    (item,) = result.retry_items
    assert "trace" not in item.metadata
    # the decision not to sample travels on, so the retries are not sampled either
    flags = int(result.event.extensions["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 0x01 == 0


async def test_without_an_sdk_tracing_costs_nothing_and_stores_nothing(clock: ManualClock) -> None:
    bus = traced_bus(trace.NoOpTracerProvider(), clock)  # type: ignore[arg-type]
    bus.subscribe("job", always_fails, name="job")
    result = await bus.publish(Event("job"))
    assert "traceparent" not in result.event.extensions
    assert "trace" not in result.retry_items[0].metadata


def test_the_bus_refuses_what_is_not_tracing_naming_it() -> None:
    with pytest.raises(TypeError, match=r"tracing must implement retrybus\.Tracing.*42"):
        EventBus(tracing=42)  # type: ignore[arg-type]


_RETRY_ELSEWHERE = textwrap.dedent(
    """
    import asyncio, json, sys
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import retrybus
    from retrybus.otel import OpenTelemetryTracing

    async def main():
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        bus = retrybus.EventBus(retrybus.open_store(sys.argv[1]), tracing=OpenTelemetryTracing(provider))
        bus.subscribe("job", lambda event: None, name="job")
        async with bus:
            assert await retrybus.RetryWorker(bus).run_once() == 1
        (span,) = exporter.get_finished_spans()
        print(json.dumps({
            "name": span.name,
            "trace_id": format(span.context.trace_id, "032x"),
            "parent": format(span.parent.span_id, "016x"),
            "links": [format(link.context.span_id, "016x") for link in span.links],
            "outcome": span.attributes["retrybus.outcome"],
        }))

    asyncio.run(main())
    """
)


async def test_a_retry_in_another_process_is_a_span_in_the_publisher_s_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'traced.db'}"
    bus = EventBus(
        retrybus.open_store(url),
        default_policy=FixedDelay(delay=0.01, max_retries=3),
        tracing=OpenTelemetryTracing(provider),
    )
    bus.subscribe("job", always_fails, name="job")
    async with bus:
        await bus.publish(Event("job"))
    publish, first = only(exporter, "publish job"), only(exporter, "handle job")

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _RETRY_ELSEWHERE, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    retry = json.loads(done.stdout)
    assert retry == {
        "name": "retry job",
        "trace_id": f"{ids(publish)[0]:032x}",
        "parent": f"{ids(publish)[1]:016x}",
        "links": [f"{ids(first)[1]:016x}"],
        "outcome": "success",
    }


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-zzzzzzzzzzzzzzzz-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        "00-0af7651916cd43dd8448eb211c8031_c-b7ad6b7169203331-01",
        "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    ],
)
async def test_a_malformed_traceparent_is_replaced_by_a_new_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock, traceparent: str
) -> None:
    """As W3C Trace Context asks: an invalid traceparent starts a new trace, and
    the new one is what travels on (to the handlers and the retry queue)."""
    bus = traced_bus(provider, clock)
    seen: list[str] = []

    async def handler(event: Event) -> None:
        seen.append(event.extensions["traceparent"])
        raise TimeoutError("connection timeout")

    bus.subscribe("job", handler, name="job")
    result = await bus.publish(Event("job", extensions={"traceparent": traceparent}))
    publish = only(exporter, "publish job")
    assert publish.parent is None
    assert result.event.extensions["traceparent"] == traceparent_of(publish)
    assert seen == [traceparent_of(publish)]
    worker = RetryWorker(bus)
    clock.advance(1)
    assert await worker.run_once() == 1
    (retry,) = spans(exporter, "retry job")
    assert retry.parent is not None
    assert (retry.parent.trace_id, retry.parent.span_id) == ids(publish)


_GLOBAL_PROVIDER = textwrap.dedent(
    """
    import asyncio
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import retrybus
    from retrybus.otel import OpenTelemetryTracing

    async def main():
        tracing = OpenTelemetryTracing()  # the global provider, set up later
        explicit = OpenTelemetryTracing(trace.get_tracer_provider())  # its proxy, as good
        bus = retrybus.EventBus(tracing=tracing)
        bus.subscribe("job", lambda event: None, name="job")
        before = await bus.publish(retrybus.Event("job"))
        assert not tracing.active and not explicit.active
        assert "traceparent" not in before.event.extensions
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        assert tracing.active and explicit.active
        after = await bus.publish(retrybus.Event("job"))
        assert "traceparent" in after.event.extensions
        print(sorted(span.name for span in exporter.get_finished_spans()))

    asyncio.run(main())
    """
)


async def test_the_global_provider_is_followed_once_the_application_sets_it() -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _GLOBAL_PROVIDER],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['handle job', 'publish job']"


def test_a_tracer_provider_of_another_kind_is_refused_naming_it() -> None:
    with pytest.raises(
        TypeError, match="tracer_provider must be an opentelemetry TracerProvider, got 'x'"
    ):
        OpenTelemetryTracing("x")  # type: ignore[arg-type]


async def test_retries_of_an_event_from_elsewhere_join_the_publish_span_s_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    """The event keeps its origin's traceparent; its retries are still children of
    the publish span (kept in the retry item), in the trace it was published in."""
    bus = traced_bus(provider, clock)
    bus.subscribe("job", always_fails, name="job")
    origin = "00-11111111111111111111111111111111-2222222222222222-01"
    with provider.get_tracer("test").start_as_current_span("request"):
        result = await bus.publish(Event("job", extensions={"traceparent": origin}))
    assert result.event.extensions["traceparent"] == origin
    publish = only(exporter, "publish job")
    clock.advance(1)
    assert await RetryWorker(bus).run_once() == 1
    (retry,) = spans(exporter, "retry job")
    assert retry.parent is not None
    assert (retry.parent.trace_id, retry.parent.span_id) == ids(publish)
    (item,) = await bus.retry_queue.list()
    assert item.metadata["trace"]["publish"] == traceparent_of(publish)


async def test_a_cancelled_publish_ends_every_span_it_started(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    bus = traced_bus(provider, clock)
    bus.subscribe("job", always_fails, name="fast")
    bus.subscribe("job", lambda event: None, name="fine")
    waiting = asyncio.Event()

    async def slow(event: Event) -> None:
        waiting.set()
        await asyncio.sleep(60)

    bus.subscribe("job", slow, name="slow")
    task = asyncio.create_task(bus.publish(Event("job")))
    await waiting.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outcomes = {
        s.attributes["retrybus.handler"]: s.attributes["retrybus.outcome"]  # type: ignore[index]
        for s in spans(exporter, "handle job")
    }
    assert outcomes == {"fast": "error", "fine": "success", "slow": "error"}
    assert only(exporter, "publish job").status.status_code is trace.StatusCode.ERROR


@pytest.mark.parametrize("same_worker", [False, True])
async def test_a_retry_span_waits_for_the_store_and_says_lost_when_the_lease_was(
    provider: TracerProvider, exporter: InMemorySpanExporter, clock: ManualClock, same_worker: bool
) -> None:
    """A claim whose lease ran out (another claim took the item, by another
    worker or by this one) ends its span ``lost``, not with the outcome the
    store refused; the other claim's span ends with its own."""
    bus = traced_bus(provider, clock)
    stalled = RetryWorker(bus, lease=5)
    other = stalled if same_worker else RetryWorker(bus, lease=5)
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(event: Event) -> None:
        if not started.is_set():
            started.set()
            await release.wait()

    bus.subscribe("job", handler, name="job")
    await bus.retry_queue.add(Event("job"), "job", TimeoutError("x"), next_retry=clock.now())
    first = asyncio.create_task(stalled.run_once())
    await started.wait()
    clock.advance(10)  # the stalled worker's lease runs out
    assert await other.run_once() == 1
    release.set()
    await first
    outcomes = sorted(s.attributes["retrybus.outcome"] for s in spans(exporter, "retry job"))  # type: ignore[index]
    assert outcomes == ["lost", "success"]


async def test_log_records_about_a_delivery_name_its_span(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = traced_bus(provider, clock)
    bus.subscribe("job", always_fails, name="job")
    with caplog.at_level(logging.INFO, logger="retrybus"):
        await bus.publish(Event("job"))
        worker = RetryWorker(bus)
        for _ in range(2):
            clock.advance(1)
            await worker.run_once()
    first = only(exporter, "handle job")
    last = max(spans(exporter, "retry job"), key=lambda s: s.attributes["retrybus.attempt"])  # type: ignore[index]
    scheduled = next(r for r in caplog.records if "retry 1 in" in r.getMessage())
    dead = next(r for r in caplog.records if r.getMessage().startswith("dead-lettered"))
    for record, span in ((scheduled, first), (dead, last)):
        trace_id, span_id = ids(span)
        assert record.trace_id == f"{trace_id:032x}"  # type: ignore[attr-defined]
        assert record.span_id == f"{span_id:016x}"  # type: ignore[attr-defined]


class BrokenTracing:
    """A tracing back end that fails at everything, its spans too."""

    active = True

    class Span:
        event: Event

        def __init__(self, event: Event) -> None:
            self.event = event

        def __enter__(self) -> Any:
            raise RuntimeError("tracing down (enter)")

        def __exit__(self, *exc_info: object) -> None:
            raise RuntimeError("tracing down (exit)")

        @property
        def traceparent(self) -> str:
            raise RuntimeError("tracing down (traceparent)")

        def end(self, *args: object) -> None:
            raise RuntimeError("tracing down (end)")

    def publish(self, event: Event) -> Any:
        return self.Span(event)

    def delivery(self, event: Event, handler: str, **options: Any) -> Any:
        return self.Span(event)

    def requeue(self, *args: object) -> None:
        raise RuntimeError("tracing down (requeue)")


async def test_a_failing_tracing_back_end_never_loses_a_delivery(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BrokenTracing()
    bus = EventBus(clock=clock, default_policy=FixedDelay(delay=1, max_retries=1), tracing=broken)
    assert bus.tracing is broken
    calls = 0

    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise TimeoutError("connection timeout")

    bus.subscribe("job", handler, name="job")
    result = await bus.publish(Event("job"))
    assert result.retrying == ("job",)  # the handler's failure, not the tracer's
    stored = await bus.retry_queue.list()
    assert [item.error for item in stored] == ["connection timeout"]
    worker = RetryWorker(bus)
    clock.advance(1)
    assert await worker.run_once() == 1
    (dead,) = await bus.dead_letters.list()
    assert dead.error == "connection timeout"
    assert (await bus.dead_letters.reprocess(dead.id)).processed is False
    await bus.dead_letters.requeue(dead.id)
    clock.advance(1)
    assert await worker.run_once() == 1
    assert await bus.retry_queue.count() == 0
    assert calls == 4
    # the observer failing in each hook is logged once per hook (here: the span's __enter__)
    assert any("failed in call_started()" in r.getMessage() for r in caplog.records)


class FailingProcessor(SpanProcessor):
    """An application's span processor that fails when a span for handler "b" starts."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if (span.attributes or {}).get("retrybus.handler") == "b":
            raise KeyError("processor bug")


async def test_a_failing_span_processor_never_loses_a_failure(
    exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(FailingProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = traced_bus(provider, clock)
    bus.subscribe("job", always_fails, name="a")
    bus.subscribe("job", always_fails, name="b")
    result = await bus.publish(Event("job"))
    assert sorted(result.retrying) == ["a", "b"]
    assert await bus.retry_queue.count() == 2
    clock.advance(1)
    assert await RetryWorker(bus).run_once() == 2  # the worker's "b" span fails alike


class OddTracing(BrokenTracing):
    """A tracing back end that hands back odd values rather than raising."""

    class Span(BrokenTracing.Span):
        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc_info: object) -> None:
            return None

        @property
        def traceparent(self) -> Any:
            return 42

        def end(self, *args: object) -> None:
            return None

    def publish(self, event: Event) -> Any:
        return self.Span(None)  # type: ignore[arg-type]

    def requeue(self, *args: object) -> None:
        return None


async def test_odd_values_from_a_tracing_back_end_are_not_trusted(clock: ManualClock) -> None:
    bus = EventBus(
        clock=clock, default_policy=FixedDelay(delay=1, max_retries=1), tracing=OddTracing()
    )
    bus.subscribe("job", always_fails, name="job")
    event = Event("job")
    result = await bus.publish(event)
    assert result.event is event  # not the None it handed back
    (item,) = await bus.retry_queue.list()
    assert "trace" not in item.metadata  # 42 is no traceparent
    clock.advance(1)
    assert await RetryWorker(bus).run_once() == 1
    assert await bus.dead_letters.count() == 1


# Spans of traces not sampled ----------------------------------------------------------
#
# With the SDK's ParentBased sampler (the usual one: ``parentbased_traceidratio``),
# the children of a span not sampled are made without the SDK's whole path. They
# must be the very spans the SDK makes: the same kind of span, in the same trace,
# with flags and trace state as the SDK gives them, current while the handler runs.


class SdkPathSampler(ParentBased):
    """ParentBased as it is, but not the SDK's own class: retrybus then takes the
    SDK's whole path for every span."""


def _described(span: trace.Span, parent: trace.SpanContext) -> dict[str, Any]:
    context = span.get_span_context()
    return {
        "type": type(span).__name__,
        "recording": span.is_recording(),
        "same_trace": context.trace_id == parent.trace_id,
        "span_of_its_own": context.span_id not in (0, parent.span_id),
        "remote": context.is_remote,
        "flags": int(context.trace_flags),
        "tracestate": context.trace_state.to_header(),
    }


def _context_of(traceparent: str) -> trace.SpanContext:
    _version, trace_id, span_id, flags = traceparent.split("-")
    return trace.SpanContext(
        int(trace_id, 16), int(span_id, 16), True, trace.TraceFlags(int(flags, 16))
    )


async def _unsampled_story(sampler: Any, clock: ManualClock) -> list[dict[str, Any]]:
    """What the handlers see of the spans around them, through a publish in a new
    trace, publishes of events carrying a traceparent not sampled (with and without
    a trace state, random trace id flag or not), a publish from inside a span not
    sampled, and the retries of all of them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = provider.get_tracer("app")
    bus = traced_bus(provider, clock)
    seen: list[dict[str, Any]] = []
    parents: dict[str, trace.SpanContext] = {}
    called: set[str] = set()

    async def handler(event: Event) -> None:
        current = trace.get_current_span()
        parent = parents.get(event.id) or _context_of(event.extensions["traceparent"])
        with app.start_as_current_span("app work") as work:
            seen.append(
                {
                    "event": event.data,
                    "retry": event.id in called,
                    "call": _described(current, parent),
                    "tracestate": event.extensions.get("tracestate"),
                    "app work": _described(work, current.get_span_context()),
                }
            )
        if event.id not in called:
            called.add(event.id)
            raise TimeoutError("first call fails")

    bus.subscribe("job", handler, name="job")
    await bus.publish(Event("job", "new trace"))
    for name, flags, tracestate in [
        ("carried", "00", None),
        ("carried random", "02", None),
        ("carried with state", "02", "vendor=x,other=y"),
    ]:
        extensions = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-{flags}"}
        if tracestate is not None:
            extensions["tracestate"] = tracestate
        await bus.publish(Event("job", name, extensions=extensions))
    with app.start_as_current_span("request") as request:
        event = Event("job", "inside a span not sampled")
        parents[event.id] = request.get_span_context()
        await bus.publish(event)
    seen.append({"request": _described(request, trace.INVALID_SPAN_CONTEXT)})
    clock.advance(1)
    assert await RetryWorker(bus).run_once() == 5
    assert exporter.get_finished_spans() == ()
    provider.shutdown()
    return sorted(seen, key=repr)  # the worker takes the retries in an order of its own


@pytest.mark.parametrize(
    "root", [ALWAYS_OFF, TraceIdRatioBased(0.0)], ids=["always_off", "ratio_0"]
)
async def test_spans_of_a_trace_not_sampled_are_those_the_sdk_makes(
    clock: ManualClock, root: Any
) -> None:
    quick = await _unsampled_story(ParentBased(root), clock)
    sdk = await _unsampled_story(SdkPathSampler(root), clock)
    assert quick == sdk
    assert len(quick) == 11  # five first calls, the request, five retries
    calls = [entry["call"] for entry in quick if "call" in entry]
    assert all(call["type"] == "NonRecordingSpan" and call["same_trace"] for call in calls)
    assert all(call["span_of_its_own"] and not call["remote"] for call in calls)
    # the trace state an event carries is its handlers' spans' too
    states = {entry["event"]: entry["call"]["tracestate"] for entry in quick if "call" in entry}
    assert states["carried with state"] == "vendor=x,other=y"


async def test_a_sampler_that_records_children_of_unsampled_parents_is_obeyed(
    exporter: InMemorySpanExporter, clock: ManualClock
) -> None:
    provider = TracerProvider(
        sampler=ParentBased(
            ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON, local_parent_not_sampled=ALWAYS_ON
        )
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = traced_bus(provider, clock)
    bus.subscribe("job", always_fails, name="job")
    await bus.publish(Event("job"))
    unsampled = f"00-{'ab' * 16}-{'cd' * 8}-00"
    await bus.publish(Event("job", extensions={"traceparent": unsampled}))
    clock.advance(1)
    assert await RetryWorker(bus).run_once() == 2
    assert sorted(span.name for span in exporter.get_finished_spans()) == [
        "handle job",
        "handle job",
        "publish job",  # the carried traceparent is a remote parent: sampled
        "retry job",
        "retry job",
    ]


async def test_children_of_a_span_not_sampled_cost_no_sampling(clock: ManualClock) -> None:
    """The short cut is taken: the sampler is asked about the publish span alone,
    not about its handlers' spans nor their retries."""
    sampler = ParentBased(TraceIdRatioBased(0.0))
    asked: list[str] = []
    should_sample = sampler.should_sample

    def counting(*args: Any, **kwargs: Any) -> Any:
        name = kwargs["name"] if "name" in kwargs else args[2]
        asked.append(name)
        return should_sample(*args, **kwargs)

    sampler.should_sample = counting  # type: ignore[method-assign]
    provider = TracerProvider(sampler=sampler)
    bus = traced_bus(provider, clock)
    bus.subscribe("job", always_fails, name="first")
    bus.subscribe("job", always_fails, name="second")
    await bus.publish(Event("job"))
    clock.advance(1)
    assert await RetryWorker(bus).run_once() == 2
    assert [name for name in asked if name != "retrybus probe"] == ["publish job"]
