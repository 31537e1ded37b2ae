"""What metrics and tracing cost: publish and worker throughput with each turned
on, against the same workload with both off.

Workloads (those of publish.py and worker.py):
  publish  memory store, one async handler that returns at once, no failures,
           ``Event(...)`` built in the loop (as a publisher does)
  worker   the fail-once workload on a SQLite file: 2,000 due items, each
           carrying a publisher's ``traceparent`` and one failed attempt,
           drained by RetryWorker.run_once in this process

Configurations:
  off            no metrics, no tracing
  metrics        PrometheusMetrics (its own registry)
  tracing_api    OpenTelemetryTracing with no SDK (the API's no-op tracer)
  tracing_1pct   the OpenTelemetry SDK sampling 1 % of traces
                 (ParentBased(TraceIdRatioBased(0.01)))
  tracing        the SDK recording every span
  both           metrics and the SDK recording every span
  both_1pct      metrics and the SDK sampling 1 %

The SDK's spans go through a BatchSpanProcessor to an exporter that discards
them, so the figures are the cost of making and ending spans, not of sending
them anywhere. The configurations run in turn, round after round (seven
rounds after a warm-up), so that a busy spell of the machine hits them alike;
the median round is reported.

The bare-span floor: what the SDK alone costs for the spans of one publish,
timed in the same rounds. A loop with no retrybus in it makes, per event, what
a traced publish with one handler makes: a PRODUCER span ``publish <type>``
with the three messaging attributes, current while a CONSUMER child
``handle <type>`` (those attributes, ``retrybus.handler`` and
``retrybus.attempt``) is started, made current, left, given its
``retrybus.outcome`` (when recording) and ended; then the publish span is left
and ended. It runs under its own provider, set up as the configuration's
(``bare_1pct`` as tracing_1pct, ``bare`` as tracing). The loop does nothing but
make spans, so the SDK's code and data stay in the CPU's caches; inside a
publish the same SDK calls run slower (alternating an untraced publish with
the loop's spans costs noticeably more than the two apart), and the share below
counts that as retrybus's. On a shared machine the figures move by tens of per
cent from run to run: compare versions by interleaved runs, or by instruction
counts (valgrind --tool=callgrind over a publish loop).

Figures:
  observability_publish_<config>           events/s
  observability_publish_overhead_<config>  % slower than off: (1 - rate / rate off) * 100
  observability_publish_added_<config>     µs added per event: 1e6 / rate - 1e6 / rate off
  observability_bare_spans_1pct            µs per event of the bare loop, 1 % sampled
  observability_bare_spans                 µs per event of the bare loop, all recorded
  observability_retrybus_share_<tracing>   retrybus's own share of the tracing
                                           overhead, % of the bare loop: (added by
                                           the config - bare loop) / bare loop * 100,
                                           for tracing_1pct (against bare_1pct) and
                                           tracing (against bare). 0 % would be a
                                           tracing that costs what the SDK costs
  observability_worker_<config>            items/s
  observability_worker_overhead_<config>   % slower than off

Run alone: .venv/bin/python bench/observability.py
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from _common import Figure, emit, median, note, quiet_logging
from latency import caught_error
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from retrybus import Event, EventBus, RetryItem, RetryWorker, open_store
from retrybus._records import ErrorInfo
from retrybus.otel import OpenTelemetryTracing
from retrybus.prometheus import PrometheusMetrics

PUBLISH_EVENTS = 20_000
WORKER_ITEMS = 2_000
ROUNDS = 7
HANDLER = "bench.handle"
CONFIGS = ("off", "metrics", "tracing_api", "tracing_1pct", "tracing", "both", "both_1pct")
#: the bare-span loops and the configuration each one is the floor of
BARE = {"bare_1pct": "tracing_1pct", "bare": "tracing"}


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _provider(ratio: float | None) -> TracerProvider:
    sampler = None if ratio is None else ParentBased(TraceIdRatioBased(ratio))
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=200_000))
    return provider


def instruments(config: str) -> dict[str, Any]:
    """The ``EventBus`` keyword arguments of one configuration."""
    options: dict[str, Any] = {}
    if config in ("metrics", "both", "both_1pct"):
        options["metrics"] = PrometheusMetrics(CollectorRegistry())
    if config == "tracing_api":
        options["tracing"] = OpenTelemetryTracing(trace.NoOpTracerProvider())
    elif config in ("tracing", "both"):
        options["tracing"] = OpenTelemetryTracing(_provider(None))
    elif config in ("tracing_1pct", "both_1pct"):
        options["tracing"] = OpenTelemetryTracing(_provider(0.01))
    return options


async def _handle(event: Event) -> None:
    return None


# publish ----------------------------------------------------------------------------


def _publish_bus(config: str) -> EventBus:
    bus = EventBus(open_store("memory://"), **instruments(config))
    bus.subscribe("bench.published", _handle, name=HANDLER)
    return bus


async def _publish_round(bus: EventBus, count: int) -> float:
    publish = bus.publish
    start = time.perf_counter_ns()
    for n in range(count):
        await publish(Event("bench.published", {"n": n}, source="bench"))
    return count / ((time.perf_counter_ns() - start) / 1e9)


async def measure_publish(
    count: int = PUBLISH_EVENTS, rounds: int = ROUNDS
) -> tuple[dict[str, float], dict[str, float]]:
    """Events/s of each configuration, and µs per event of each bare-span loop."""
    buses = {config: _publish_bus(config) for config in CONFIGS}
    tracers = {name: _bare_tracer(name) for name in BARE}
    for bus in buses.values():
        await _publish_round(bus, 2_000)
    for tracer in tracers.values():
        _bare_round(tracer, 2_000)
    rates: dict[str, list[float]] = {config: [] for config in CONFIGS}
    bare: dict[str, list[float]] = {name: [] for name in BARE}
    for _ in range(rounds):
        for config, bus in buses.items():
            gc.collect()
            rates[config].append(await _publish_round(bus, count))
        for name, tracer in tracers.items():
            gc.collect()
            bare[name].append(_bare_round(tracer, count))
    return (
        {config: median(values) for config, values in rates.items()},
        {name: median(values) for name, values in bare.items()},
    )


def _bare_round(tracer: trace.Tracer, count: int) -> float:
    """µs per event of making a traced publish's spans with the SDK alone."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    start_span, attach, detach = tracer.start_span, otel_context.attach, otel_context.detach
    current = trace.set_span_in_context
    producer, consumer = trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER
    event_type = "bench.published"
    start = time.perf_counter_ns()
    for event_id in ids:
        publish = start_span(
            f"publish {event_type}",
            kind=producer,
            attributes={
                "messaging.system": "retrybus",
                "messaging.destination.name": event_type,
                "messaging.message.id": event_id,
            },
        )
        outer = attach(current(publish))
        handle = start_span(
            f"handle {event_type}",
            kind=consumer,
            attributes={
                "messaging.system": "retrybus",
                "messaging.destination.name": event_type,
                "messaging.message.id": event_id,
                "retrybus.handler": HANDLER,
                "retrybus.attempt": 0,
            },
        )
        inner = attach(current(handle))
        detach(inner)
        if handle.is_recording():
            handle.set_attribute("retrybus.outcome", "success")
        handle.end()
        detach(outer)
        publish.end()
    return (time.perf_counter_ns() - start) / 1e3 / count


def _bare_tracer(name: str) -> trace.Tracer:
    return _provider(0.01 if name == "bare_1pct" else None).get_tracer("bench.bare")


# worker -----------------------------------------------------------------------------


def _seeded_items(count: int) -> list[RetryItem]:
    """Due items as a traced first failure leaves them: the publisher's traceparent
    in the event, sampled for one in a hundred (as a 1 % sampler decided at
    publish), and for those the failed call's in the item's metadata."""
    info = ErrorInfo.from_exception(caught_error())
    now = EventBus().clock.now()
    items = []
    for n in range(count):
        trace_id = os.urandom(16).hex()
        sampled = n % 100 == 0
        flags = "01" if sampled else "00"
        event = Event(
            "bench.failed",
            {"n": n, "user_id": n % 97},
            source="bench",
            extensions={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"},
        )
        attempts = [f"00-{trace_id}-{os.urandom(8).hex()}-01"] if sampled else []
        item = RetryItem.for_failure(
            event,
            HANDLER,
            info,
            attempt=1,
            max_retries=3,
            next_retry=now - timedelta(seconds=1),
            now=now,
            metadata={"trace": {"attempts": attempts}} if attempts else None,
        )
        items.append(item)
    return items


async def _worker_round(config: str, items: list[RetryItem], directory: str) -> float:
    # a fresh file each round; the temporary directory goes at the end
    path = os.path.join(directory, f"{config}-{os.urandom(4).hex()}.db")
    bus = EventBus(open_store(f"sqlite:///{path}"), **instruments(config))
    bus.subscribe("bench.*", _handle, name=HANDLER)
    try:
        for start in range(0, len(items), 500):
            await bus.store.record_failures(items[start : start + 500], [])
        worker = RetryWorker(bus)
        gc.collect()
        handled = 0
        begin = time.perf_counter_ns()
        while done := await worker.run_once():
            handled += done
        elapsed = (time.perf_counter_ns() - begin) / 1e9
    finally:
        await bus.close()
    if handled != len(items):
        raise RuntimeError(f"worker ({config}) handled {handled} of {len(items)}")
    return handled / elapsed


async def measure_worker(count: int = WORKER_ITEMS, rounds: int = ROUNDS) -> dict[str, float]:
    rates: dict[str, list[float]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as directory:
        for config in CONFIGS:  # warm-up
            await _worker_round(config, _seeded_items(200), directory)
        for _ in range(rounds):
            items = _seeded_items(count)
            for config in CONFIGS:
                rates[config].append(await _worker_round(config, items, directory))
    return {config: median(values) for config, values in rates.items()}


def _figures(kind: str, unit: str, rates: dict[str, float]) -> list[Figure]:
    base = rates["off"]
    figures = []
    for config, rate in rates.items():
        figures.append(Figure(f"observability_{kind}_{config}", rate, unit))
    for config, rate in rates.items():
        if config != "off":
            overhead = (1 - rate / base) * 100
            figures.append(Figure(f"observability_{kind}_overhead_{config}", overhead, "%"))
    per_item = {
        config: 1e6 / rate - 1e6 / base for config, rate in rates.items() if config != "off"
    }
    if kind == "publish":
        for config, cost in per_item.items():
            figures.append(Figure(f"observability_publish_added_{config}", cost, "µs"))
    note(
        f"{kind}: cost added per {'event' if kind == 'publish' else 'item'}, µs: "
        + ", ".join(f"{config} {cost:.1f}" for config, cost in per_item.items())
    )
    return figures


def _bare_figures(rates: dict[str, float], bare: dict[str, float]) -> list[Figure]:
    """The bare-span floor, and how much of each tracing overhead is retrybus's own."""
    figures = [Figure(f"observability_bare_spans{name[4:]}", bare[name], "µs") for name in BARE]
    for name, config in BARE.items():
        added = 1e6 / rates[config] - 1e6 / rates["off"]
        share = (added - bare[name]) / bare[name] * 100
        figures.append(Figure(f"observability_retrybus_share_{config}", share, "%"))
    return figures


def run() -> list[Figure]:
    quiet_logging()
    publish, bare = asyncio.run(measure_publish())
    worker = asyncio.run(measure_worker())
    return [
        *_figures("publish", "events/s", publish),
        *_bare_figures(publish, bare),
        *_figures("worker", "items/s", worker),
    ]


if __name__ == "__main__":
    emit(run())
