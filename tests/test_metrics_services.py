"""Prometheus metrics of several services on one store (issue 12): every family
labelled with the service first, the figures of each bus under its own service,
the depth gauges per service and handler, one service's samples on their own,
and a ``Metrics`` of the user's own, without ``for_service``, still served."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import retrybus.prometheus
from retrybus import (
    CircuitBreaker,
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    Metrics,
    PermanentError,
    RetryWorker,
    Store,
)
from retrybus._observe import BusView
from retrybus._stores.memory import MemoryStore
from retrybus._transports.base import TransportSettings
from retrybus._transports.memory import MemoryTransport
from retrybus.prometheus import METRIC_NAMES, PrometheusMetrics
from test_metrics import value

# the one family that is of the whole store, not of a service
STORE_WIDE = "retrybus_retry_queue_due"


def samples_of(registry: CollectorRegistry) -> dict[str, list[dict[str, str]]]:
    """Each family's samples' labels, as the registry reports them (in label order)."""
    return {family.name: [s.labels for s in family.samples] for family in registry.collect()}


async def social_and_notifications(
    store: Store, clock: ManualClock, metrics: PrometheusMetrics
) -> tuple[EventBus, EventBus]:
    """Two services counting into ``metrics``: social publishes likes and counts
    them (Stats); notifications runs Notify (fails once, behind breaker "mail") and
    Digest (never works)."""
    policy = FixedDelay(delay=1, max_retries=2)
    social = EventBus(
        store,
        service="social",
        clock=clock,
        metrics=metrics,
        default_policy=policy,
        route_refresh=0,  # sees notifications' subscriptions at once
    )
    notifications = EventBus(
        store, service="notifications", clock=clock, metrics=metrics, default_policy=policy
    )
    social.subscribe("like.added", lambda event: None, name="Stats")
    failed: set[str] = set()

    async def notify(event: Event) -> None:
        if event.id not in failed:
            failed.add(event.id)
            raise TimeoutError("mail server timeout")

    async def digest(event: Event) -> None:
        raise PermanentError("no digest for this user")

    # a breaker that never trips: its record (stored by register) gives its gauges
    notifications.subscribe("like.*", notify, name="Notify", breaker=CircuitBreaker("mail"))
    notifications.subscribe("like.added", digest, name="Digest")
    await notifications.register()
    return social, notifications


async def test_each_family_is_labelled_with_the_service_that_observed_it(
    clock: ManualClock,
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)  # one back end for both buses
    store = MemoryStore()
    social, notifications = await social_and_notifications(store, clock, metrics)

    await social.publish(Event("like.added", {"n": 1}))
    await social.publish(Event("like.added", {"n": 2}))
    worker = RetryWorker(notifications)
    assert await worker.run_once() == 4  # Notify fails, Digest is dead-lettered
    clock.advance(2)
    assert await worker.run_once() == 2  # Notify's retries work
    first, second = await notifications.dead_letters.list()
    await notifications.dead_letters.reprocess(first.id)  # fails again
    # social requeues notifications' dead letter: counted as notifications'
    await social.dead_letters.requeue(second.id)
    # the inbox skips a delivery of notifications' that succeeded before
    notifications.core.inbox_skipped("Notify", Event("like.added", {"n": 1}))
    await metrics.refresh(social)
    # a bus with a transport: its refresh sets its own service's broker lag
    broker = MemoryTransport()
    await broker.declare("notifications", ["like.*"], TransportSettings())
    await metrics.refresh(EventBus(store, service="notifications", clock=clock, transport=broker))

    families = samples_of(registry)
    # the outbox gauges are labelled with an application database, not a service
    # (tests/test_outbox.py); these buses have none
    outbox_wide = {"retrybus_outbox_depth", "retrybus_outbox_oldest_age_seconds"}
    for family, samples in families.items():
        if family in outbox_wide:
            assert samples == []
            continue
        assert samples, f"{family} has no samples"
        if family == STORE_WIDE:
            assert all(labels == {} for labels in samples)
            continue
        for labels in samples:
            assert next(iter(labels)) == "service", f"{family}: {labels}"
    assert {name.removesuffix("_total") for name in METRIC_NAMES} == set(families)

    social_figures = {
        (family, labels.get("handler"))
        for family, samples in families.items()
        for labels in samples
        if labels.get("service") == "social"
    }
    # social published, and ran Stats; all the rest is notifications'
    assert social_figures == {
        ("retrybus_events_published", None),
        ("retrybus_handler_calls", "Stats"),
        ("retrybus_handler_duration_seconds", "Stats"),
    }
    notify = {"event_type": "like.added", "handler": "Notify"}
    digest_labels = {"event_type": "like.added", "handler": "Digest"}
    of_notifications = {"service": "notifications"}
    published = "retrybus_events_published_total"
    assert value(registry, published, "social", event_type="like.added") == 2
    assert not value(registry, published, "notifications", event_type="like.added")
    calls = "retrybus_handler_calls_total"
    assert value(registry, calls, "notifications", outcome="failure", **notify) == 2
    assert value(registry, calls, "notifications", outcome="success", **notify) == 2
    assert value(registry, "retrybus_retries_succeeded_total", "notifications", **notify) == 2
    assert value(registry, "retrybus_retry_lag_seconds_count", "notifications", **notify) >= 1
    dead = "retrybus_dead_lettered_total"
    assert value(registry, dead, "notifications", reason="non_retryable", **digest_labels) == 2
    reprocessed = "retrybus_reprocessed_total"
    assert value(registry, reprocessed, "notifications", outcome="failure", **digest_labels) == 1
    assert value(registry, "retrybus_requeued_total", "notifications", **digest_labels) == 1
    assert not value(registry, "retrybus_requeued_total", "social", **digest_labels)
    depth = {**of_notifications, "handler": "Digest"}
    assert registry.get_sample_value("retrybus_retry_queue_depth", depth) == 1
    dead_depth = {**depth, "processed": "false"}
    assert registry.get_sample_value("retrybus_dead_letter_queue_depth", dead_depth) == 1
    assert registry.get_sample_value("retrybus_transport_lag", of_notifications) == 0
    mail = {**of_notifications, "breaker": "mail"}
    assert registry.get_sample_value("retrybus_breaker_state", mail) == 0  # closed
    assert registry.get_sample_value("retrybus_breaker_trips_total", mail) == 0


async def test_depth_gauges_are_per_service_and_handler_on_every_engine(
    store: Store, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    billing = EventBus(store, service="billing", clock=clock, metrics=metrics)
    shipping = EventBus(store, service="shipping", clock=clock, metrics=metrics)
    later = clock.now() + timedelta(hours=1)
    for n in range(3):  # the same handler name in both services
        await billing.retry_queue.add(Event("order", {"n": n}), "Notify", TimeoutError("x"))
    await shipping.retry_queue.add(Event("order"), "Notify", TimeoutError("x"), next_retry=later)
    failed = await shipping.retry_queue.add(Event("parcel"), "Label", TimeoutError("x"))
    await shipping.dead_letters.add(failed, reason="failed after 3 retries")
    handled = await shipping.dead_letters.add(failed, reason="failed after 3 retries")
    await store.update_dead(replace(handled, processed=True, processed_at=clock.now()))
    clock.advance(2)
    await metrics.refresh(billing)

    def depth(service: str, handler: str) -> float | None:
        labels = {"service": service, "handler": handler}
        return registry.get_sample_value("retrybus_retry_queue_depth", labels)

    def dead(service: str, handler: str, processed: str) -> float | None:
        labels = {"service": service, "handler": handler, "processed": processed}
        return registry.get_sample_value("retrybus_dead_letter_queue_depth", labels)

    assert (depth("billing", "Notify"), depth("shipping", "Notify")) == (3, 1)
    assert depth("shipping", "Label") == 1
    assert depth("default", "Notify") is None
    assert (dead("shipping", "Label", "false"), dead("shipping", "Label", "true")) == (1, 1)
    assert dead("billing", "Notify", "false") is None
    assert registry.get_sample_value(STORE_WIDE) == 4  # every service's due items

    for item in await store.list_retry(limit=100, offset=0, service="billing"):
        await billing.retry_queue.delete(item.id)
    await metrics.refresh(shipping)
    # billing's emptied queue reads 0; shipping's is as it was
    assert (depth("billing", "Notify"), depth("shipping", "Notify")) == (0, 1)


async def test_the_depth_gauges_keep_the_largest_service_handler_pairs(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retrybus.prometheus, "_MAX_DEPTH_SERIES", 2)
    store = MemoryStore()
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    sizes = {("a", "H"): 1, ("b", "H"): 3, ("c", "H"): 2}
    for (service, handler), size in sizes.items():
        bus = EventBus(store, service=service, clock=clock)
        for n in range(size):
            await bus.retry_queue.add(Event("e", {"n": n}), handler, TimeoutError("x"))
    await metrics.refresh(EventBus(store, clock=clock))
    reported = {
        labels["service"]: value
        for family in registry.collect()
        if family.name == "retrybus_retry_queue_depth"
        for _, labels, value, *_ in family.samples
    }
    assert reported == {"b": 3, "c": 2}


def test_for_service_writes_into_the_same_figures() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    billing = metrics.for_service("billing")
    assert (metrics.service, billing.service) == ("default", "billing")
    assert billing.registry is registry
    billing.published("invoice.paid")
    billing.published("invoice.paid")
    metrics.published("invoice.paid")
    published = "retrybus_events_published_total"
    assert value(registry, published, "billing", event_type="invoice.paid") == 2
    assert value(registry, published, "default", event_type="invoice.paid") == 1
    with pytest.raises(ValueError, match=r"service name .* got 'bill/ing'"):
        metrics.for_service("bill/ing")


def test_exposition_of_one_service_keeps_only_its_samples() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    metrics.for_service("billing").handled("invoice.paid", "Ledger", True, 0.01)
    metrics.for_service("shipping").handled("parcel.sent", "Label", True, 0.01)
    metrics._figures.due = 3
    body, _ = metrics.exposition(service="billing")
    families = list(text_string_to_metric_families(body.decode()))
    # every family is still described, with only billing's samples
    assert {f.name for f in families} == {name.removesuffix("_total") for name in METRIC_NAMES}
    labels = [sample.labels for family in families for sample in family.samples]
    assert labels
    assert {label["service"] for label in labels} == {"billing"}
    assert all(label.get("handler") == "Ledger" for label in labels)
    whole, _ = metrics.exposition()
    assert b'service="shipping"' in whole
    assert b"retrybus_retry_queue_due 3.0" in whole
    with pytest.raises(ValueError, match=r"got ''"):
        metrics.exposition(service="")


class CountingMetrics:
    """A ``Metrics`` of the user's own, without ``for_service``: what it was told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, ...]] = []

    def published(self, event_type: str) -> None:
        self.told.append(("published", event_type))

    def handled(self, event_type: str, handler: str, ok: bool, seconds: float) -> None:
        self.told.append(("handled", event_type, handler, str(ok)))

    def retry_scheduled(self, event_type: str, handler: str) -> None:
        self.told.append(("retry_scheduled", event_type, handler))

    def retry_succeeded(self, event_type: str, handler: str) -> None:
        self.told.append(("retry_succeeded", event_type, handler))

    def retry_lag(self, event_type: str, handler: str, seconds: float) -> None:
        self.told.append(("retry_lag", event_type, handler))

    def dead_lettered(self, event_type: str, handler: str, reason: str) -> None:
        self.told.append(("dead_lettered", event_type, handler, reason))

    def reprocessed(self, event_type: str, handler: str, ok: bool) -> None:
        self.told.append(("reprocessed", event_type, handler, str(ok)))

    def requeued(self, event_type: str, handler: str) -> None:
        self.told.append(("requeued", event_type, handler))

    async def refresh(self, bus: BusView) -> None:
        self.told.append(("refresh",))


class PerServiceMetrics(CountingMetrics):
    """One that keeps each service's figures apart (``for_service``)."""

    def __init__(self, service: str = "default") -> None:
        super().__init__()
        self.service = service
        self.views: dict[str, PerServiceMetrics] = {}

    def for_service(self, service: str) -> PerServiceMetrics:
        return self.views.setdefault(service, PerServiceMetrics(service))


async def test_a_metrics_of_your_own_without_for_service_is_told_everything(
    clock: ManualClock,
) -> None:
    custom = CountingMetrics()
    assert isinstance(custom, Metrics)
    bus = EventBus(MemoryStore(), service="billing", clock=clock, metrics=custom)
    assert bus.metrics is custom

    async def fails(event: Event) -> None:
        raise PermanentError("bad invoice")

    bus.subscribe("invoice.paid", fails, name="Ledger")
    await bus.publish(Event("invoice.paid"))
    assert custom.told == [
        ("published", "invoice.paid"),
        ("handled", "invoice.paid", "Ledger", "False"),
        ("dead_lettered", "invoice.paid", "Ledger", "non_retryable"),
    ]


async def test_a_metrics_with_for_service_gets_each_service_s_figures_apart(
    clock: ManualClock,
) -> None:
    custom = PerServiceMetrics()
    store = MemoryStore()
    billing = EventBus(store, service="billing", clock=clock, metrics=custom)
    ops = EventBus(store, service="ops", clock=clock, metrics=custom)
    billing.subscribe("invoice.paid", lambda event: None, name="Ledger")
    await billing.publish(Event("invoice.paid"))
    item = await billing.retry_queue.add(Event("invoice.paid"), "Ledger", TimeoutError("x"))
    letter = await billing.dead_letters.add(item, reason="failed after 3 retries")
    await ops.dead_letters.requeue(letter.id)  # billing's dead letter: billing's figure

    assert custom.told == []
    assert custom.views["ops"].told == []
    assert custom.views["billing"].told == [
        ("published", "invoice.paid"),
        ("handled", "invoice.paid", "Ledger", "True"),
        ("retry_scheduled", "invoice.paid", "Ledger"),
        ("dead_lettered", "invoice.paid", "Ledger", "retries_exhausted"),
        ("requeued", "invoice.paid", "Ledger"),
        ("retry_scheduled", "invoice.paid", "Ledger"),
    ]


class NoView(CountingMetrics):
    def for_service(self, service: str) -> str:
        return f"not metrics for {service}"


def test_a_for_service_that_gives_no_metrics_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"for_service\('billing'\) must return .* 'not metrics"):
        EventBus(MemoryStore(), service="billing", metrics=NoView())
