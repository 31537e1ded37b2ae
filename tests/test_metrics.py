"""Prometheus metrics: what each counter, histogram and gauge counts, read back
from a registry of the test's own, and served over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.request
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import retrybus
from retrybus import (
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    PermanentError,
    RetryWorker,
    Store,
    reason_kind,
)
from retrybus.prometheus import METRIC_NAMES, PrometheusMetrics


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(
    registry: CollectorRegistry, name: str, service: str | None = "default", **labels: str
) -> float:
    """A sample's value (0: none), of the default service unless ``service`` says
    (None: a store-wide sample, without the label)."""
    if service is not None:
        labels = {"service": service, **labels}
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def metered_bus(
    registry: CollectorRegistry, clock: ManualClock, store: Store | None = None
) -> EventBus:
    return EventBus(
        store or retrybus.open_store("memory://"),
        clock=clock,
        default_policy=FixedDelay(delay=1, max_retries=2),
        metrics=PrometheusMetrics(registry),
    )


async def test_publish_counts_events_handler_calls_and_their_duration(
    registry: CollectorRegistry, clock: ManualClock
) -> None:
    bus = metered_bus(registry, clock)
    bus.subscribe("like.added", lambda event: None, name="count")

    async def fail(event: Event) -> None:
        raise TimeoutError("connection timeout")

    bus.subscribe("like.*", fail, name="notify")
    await bus.publish(Event("like.added", {"n": 1}))
    await bus.publish(Event("like.added", {"n": 2}))
    await bus.publish(Event("nobody.listens"))

    assert value(registry, "retrybus_events_published_total", event_type="like.added") == 2
    assert value(registry, "retrybus_events_published_total", event_type="nobody.listens") == 1
    calls = "retrybus_handler_calls_total"
    assert value(registry, calls, event_type="like.added", handler="count", outcome="success") == 2
    assert value(registry, calls, event_type="like.added", handler="notify", outcome="failure") == 2
    assert value(registry, calls, event_type="like.added", handler="count", outcome="failure") == 0
    duration = "retrybus_handler_duration_seconds_count"
    assert value(registry, duration, event_type="like.added", handler="notify") == 2
    assert (
        value(
            registry,
            "retrybus_handler_duration_seconds_sum",
            event_type="like.added",
            handler="notify",
        )
        > 0
    )
    scheduled = "retrybus_retries_scheduled_total"
    assert value(registry, scheduled, event_type="like.added", handler="notify") == 2
    assert value(registry, scheduled, event_type="like.added", handler="count") == 0


async def test_worker_counts_retries_scheduled_succeeded_dead_lettered_and_their_lag(
    registry: CollectorRegistry, clock: ManualClock
) -> None:
    bus = metered_bus(registry, clock)
    calls = 0

    async def flaky(event: Event) -> None:
        nonlocal calls
        calls += 1
        if event.data["fail_times"] >= calls:
            raise TimeoutError("connection timeout")

    bus.subscribe("job", flaky, name="flaky")
    await bus.publish(Event("job", {"fail_times": 2}))
    worker = RetryWorker(bus)
    clock.advance(1 + 5)  # due after 1 s; started 5 s late
    assert await worker.run_once() == 1  # second failure: rescheduled
    clock.advance(1)
    assert await worker.run_once() == 1  # third call succeeds

    labels = {"event_type": "job", "handler": "flaky"}
    assert value(registry, "retrybus_retries_scheduled_total", **labels) == 2
    assert value(registry, "retrybus_retries_succeeded_total", **labels) == 1
    assert value(registry, "retrybus_handler_calls_total", outcome="failure", **labels) == 2
    assert value(registry, "retrybus_handler_calls_total", outcome="success", **labels) == 1
    assert value(registry, "retrybus_retry_lag_seconds_count", **labels) == 2
    assert value(registry, "retrybus_retry_lag_seconds_sum", **labels) == pytest.approx(5.0)
    # the 5 s late start falls in the 5 s bucket, not the 2.5 s one
    assert value(registry, "retrybus_retry_lag_seconds_bucket", le="2.5", **labels) == 1
    assert value(registry, "retrybus_retry_lag_seconds_bucket", le="5.0", **labels) == 2


async def test_dead_letters_are_counted_by_the_kind_of_reason(
    registry: CollectorRegistry, clock: ManualClock
) -> None:
    bus = metered_bus(registry, clock)

    async def always(event: Event) -> None:
        raise TimeoutError("connection timeout")

    async def permanent(event: Event) -> None:
        raise PermanentError("bad payload")

    bus.subscribe("a", always, name="always")
    bus.subscribe("b", permanent, name="permanent")
    await bus.publish(Event("a"))
    await bus.publish(Event("b"))
    worker = RetryWorker(bus)
    for _ in range(3):
        clock.advance(1)
        await worker.run_once()
    # an item whose handler is gone (no worker of this bus claims it), and one
    # that outlives the retention: both expire
    await bus.retry_queue.add(Event("c"), "gone", TimeoutError("x"), next_retry=clock.now())
    assert await worker.run_once() == 0
    await bus.retry_queue.add(Event("d"), "always", TimeoutError("x"))
    clock.advance(8 * 24 * 3600)
    assert await bus.retry_queue.cleanup() == 2

    dead = "retrybus_dead_lettered_total"
    assert value(registry, dead, event_type="a", handler="always", reason="retries_exhausted") == 1
    assert value(registry, dead, event_type="b", handler="permanent", reason="non_retryable") == 1
    assert value(registry, dead, event_type="c", handler="gone", reason="expired") == 1
    assert value(registry, dead, event_type="d", handler="always", reason="expired") == 1


async def test_reprocess_and_requeue_are_counted(
    registry: CollectorRegistry, clock: ManualClock
) -> None:
    bus = metered_bus(registry, clock)
    broken = True

    async def handler(event: Event) -> None:
        if broken:
            raise PermanentError("bad payload")

    bus.subscribe("job", handler, name="job")
    first = (await bus.publish(Event("job"))).dead_letters[0]
    second = (await bus.publish(Event("job"))).dead_letters[0]
    await bus.dead_letters.reprocess(first.id)
    broken = False
    await bus.dead_letters.reprocess(first.id)
    await bus.dead_letters.requeue(second.id)

    labels = {"event_type": "job", "handler": "job"}
    assert value(registry, "retrybus_reprocessed_total", outcome="failure", **labels) == 1
    assert value(registry, "retrybus_reprocessed_total", outcome="success", **labels) == 1
    assert value(registry, "retrybus_requeued_total", **labels) == 1
    # a reprocess is a handler call too
    assert value(registry, "retrybus_handler_calls_total", outcome="failure", **labels) == 3
    assert value(registry, "retrybus_handler_calls_total", outcome="success", **labels) == 1


async def test_refresh_reads_the_queue_depths_per_handler_on_every_engine(
    store: Store, clock: ManualClock, registry: CollectorRegistry
) -> None:
    metrics = PrometheusMetrics(registry)
    bus = EventBus(store, clock=clock, metrics=metrics)
    for n in range(3):
        await bus.retry_queue.add(Event("a", {"n": n}), "alpha", TimeoutError("x"))
    await bus.retry_queue.add(
        Event("b"), "beta", TimeoutError("x"), next_retry=clock.now() + timedelta(hours=1)
    )
    item = await bus.retry_queue.add(Event("c"), "gamma", TimeoutError("x"))
    dead = await bus.dead_letters.add(item, reason="failed after 3 retries")
    await bus.dead_letters.add(item, reason="failed after 3 retries")
    stored = await bus.dead_letters.get(dead.id)
    await bus.store.update_dead(
        dataclasses.replace(stored, processed=True, processed_at=clock.now())
    )
    clock.advance(2)  # the first retry's delay (1 s ± 10 %) has passed
    await metrics.refresh(bus)

    assert value(registry, "retrybus_retry_queue_depth", handler="alpha") == 3
    assert value(registry, "retrybus_retry_queue_depth", handler="beta") == 1
    assert value(registry, "retrybus_retry_queue_depth", handler="gamma") == 1
    assert value(registry, "retrybus_retry_queue_due", service=None) == 4
    depth = "retrybus_dead_letter_queue_depth"
    assert value(registry, depth, handler="gamma", processed="false") == 1
    assert value(registry, depth, handler="gamma", processed="true") == 1

    for listed in await bus.retry_queue.list(limit=100):
        await bus.retry_queue.delete(listed.id)
    await metrics.refresh(bus)
    alpha = {"service": "default", "handler": "alpha"}
    assert registry.get_sample_value("retrybus_retry_queue_depth", alpha) == 0
    assert value(registry, "retrybus_retry_queue_due", service=None) == 0


async def test_the_worker_refreshes_the_depth_gauges_as_it_runs(
    registry: CollectorRegistry, clock: ManualClock
) -> None:
    bus = metered_bus(registry, clock)
    bus.subscribe("job", lambda event: None, name="job")
    await bus.retry_queue.add(
        Event("job"), "job", TimeoutError("x"), next_retry=clock.now() + timedelta(hours=1)
    )
    async with RetryWorker(bus, check_interval=0.05, metrics_interval=0.01):
        for _ in range(200):
            if value(registry, "retrybus_retry_queue_depth", handler="job") == 1:
                break
            await asyncio.sleep(0.01)
    assert value(registry, "retrybus_retry_queue_depth", handler="job") == 1


def test_two_instances_on_one_registry_share_its_metrics(registry: CollectorRegistry) -> None:
    first, second = PrometheusMetrics(registry), PrometheusMetrics(registry)
    first.published("a")
    second.published("a")
    assert value(registry, "retrybus_events_published_total", event_type="a") == 2


def exercised(registry: CollectorRegistry) -> PrometheusMetrics:
    """PrometheusMetrics with every figure reported once (depths as a refresh sets them)."""
    metrics = PrometheusMetrics(registry)
    metrics.published("t")
    metrics.handled("t", "h", True, 0.01)
    metrics.handled("t", "h", False, 0.01)
    metrics.retry_scheduled("t", "h")
    metrics.retry_succeeded("t", "h")
    metrics.retry_lag("t", "h", 0.5)
    metrics.dead_lettered("t", "h", "expired")
    metrics.reprocessed("t", "h", True)
    metrics.requeued("t", "h")
    metrics.inbox_skipped("t", "h")
    figures = metrics._figures
    figures.retry_depth[("default", "h")] = 1
    figures.dead_depth[("default", "h", "false")] = 1
    figures.due = 0
    metrics.set_transport_lag("default", 0)
    figures.outbox["app"] = (0, 0.0)
    metrics.set_breaker_state("default", "db", "open", 1)
    return metrics


def test_every_exported_name_is_listed(registry: CollectorRegistry) -> None:
    metrics = exercised(registry)
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    # the text parser names counters without their _total suffix
    assert {name.removesuffix("_total") for name in METRIC_NAMES} == families
    openmetrics, kind = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text")
    assert openmetrics.endswith(b"# EOF\n")


def test_reason_kinds() -> None:
    assert reason_kind("failed after 3 retries") == "retries_exhausted"
    assert reason_kind("non-retryable: ValueError") == "non_retryable"
    assert reason_kind("retry time budget of 60s exhausted") == "time_budget_exhausted"
    assert reason_kind("expired in retry queue") == "expired"
    assert reason_kind("unknown handler: no handler named 'x' is subscribed") == "unknown_handler"
    assert reason_kind("undecodable record: bad JSON") == "undecodable"
    assert reason_kind("retry decision failed: ZeroDivisionError: x") == "policy_error"
    assert reason_kind("undeliverable: claimed 3 times without an outcome") == "undeliverable"
    assert reason_kind("subscription removed: mail/Notify (by ops)") == "subscription_removed"
    assert reason_kind("left by an operator") == "other"


def test_the_bus_refuses_what_is_not_metrics_naming_it() -> None:
    with pytest.raises(TypeError, match=r"metrics must implement retrybus\.Metrics.*'nope'"):
        EventBus(metrics="nope")  # type: ignore[arg-type]


def test_serve_answers_a_scrape_over_http(registry: CollectorRegistry) -> None:
    metrics = PrometheusMetrics(registry)
    metrics.published("served.event")
    server, _thread = metrics.serve(0, "127.0.0.1")
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            body = answer.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert (
        'retrybus_events_published_total{event_type="served.event",service="default"} 1.0' in body
    )
    with pytest.raises(ValueError, match=r"metrics port .* got 70000"):
        metrics.serve(70000)


class BrokenMetrics:
    """A metrics back end that fails at everything."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any) -> None:
            raise RuntimeError(f"metrics back end down ({name})")

        return fail

    async def refresh(self, bus: EventBus) -> None:
        raise RuntimeError("metrics back end down (refresh)")


async def test_a_failing_metrics_back_end_never_loses_a_delivery(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BrokenMetrics()
    bus = EventBus(clock=clock, default_policy=FixedDelay(delay=1, max_retries=1), metrics=broken)
    assert bus.metrics is broken

    async def fails(event: Event) -> None:
        raise TimeoutError("connection timeout")

    bus.subscribe("job", fails, name="job")
    result = await bus.publish(Event("job"))
    assert result.retrying == ("job",)
    assert await bus.retry_queue.count() == 1
    clock.advance(1)
    async with RetryWorker(bus, check_interval=0.01):
        for _ in range(200):
            if await bus.dead_letters.count() == 1:
                break
            await asyncio.sleep(0.01)
    assert await bus.dead_letters.count() == 1
    failed = {
        found.group(1)
        for record in caplog.records
        if (found := re.search(r"failed in (\w+)\(\)", record.getMessage()))
    }
    # logged once per hook of the metrics observer that called the broken back end
    assert failed >= {
        "publish_started",  # published
        "call_ended",  # handled, retry_lag
        "retry_scheduled",
        "dead_lettered",
    }


async def test_an_outcome_lost_with_its_lease_is_not_counted(
    registry: CollectorRegistry, clock: ManualClock
) -> None:
    bus = metered_bus(registry, clock)
    release, started = asyncio.Event(), asyncio.Event()

    async def handler(event: Event) -> None:
        if not started.is_set():
            started.set()
            await release.wait()

    bus.subscribe("job", handler, name="job")
    await bus.retry_queue.add(Event("job"), "job", TimeoutError("x"), next_retry=clock.now())
    stalled = asyncio.create_task(RetryWorker(bus, lease=5).run_once())
    await started.wait()
    clock.advance(10)  # its lease runs out; another worker takes the item
    assert await RetryWorker(bus, lease=5).run_once() == 1
    release.set()
    await stalled
    labels = {"event_type": "job", "handler": "job"}
    assert value(registry, "retrybus_retries_succeeded_total", **labels) == 1
    assert value(registry, "retrybus_handler_calls_total", outcome="success", **labels) == 2


async def test_redrives_are_counted_as_requeues_and_reprocesses(
    registry: CollectorRegistry, clock: ManualClock
) -> None:
    bus = metered_bus(registry, clock)

    async def permanent(event: Event) -> None:
        raise PermanentError("bad payload")

    bus.subscribe("job", permanent, name="job")
    for _ in range(3):
        await bus.publish(Event("job"))
    redrive = await bus.redrives.start(action="requeue")
    await bus.redrives.run(redrive.id, interval=0.01)
    labels = {"event_type": "job", "handler": "job"}
    assert value(registry, "retrybus_requeued_total", **labels) == 3
    # a requeue puts the delivery back in the retry queue: scheduled, as retries are
    assert value(registry, "retrybus_retries_scheduled_total", **labels) == 3
