"""The dashboard's ``/metrics``: the bus's Prometheus metrics, with the queues'
depth read on scrape, and the DLQ actions taken from the dashboard counted."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from dashboard_support import dead, open_test_store, running
from retrybus import EventBus, StoreUnavailable
from retrybus.prometheus import PrometheusMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_metrics_show_the_depths_and_count_the_dashboard_s_actions(
    kind: str, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    store = open_test_store(kind, tmp_path)
    with running(store, handlers=True, bus_metrics=PrometheusMetrics(registry)) as dash:
        first = dash.run(dead, dash.bus, 1)
        dash.run(dead, dash.bus, 2)
        response = dash.get("/metrics")  # read-only: no log-in needed
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert response.headers["cache-control"] == "no-store"
        before = samples(response.text)
        depth = (
            "retrybus_dead_letter_queue_depth",
            (("handler", "Mailer"), ("processed", "false"), ("service", "default")),
        )
        assert before[depth] == 2

        dash.login()
        assert dash.post(f"/dead-letters/{first.id}/reprocess").status_code == 303
        after = samples(dash.get("/metrics").text)
        labels = (
            ("event_type", "like.added"),
            ("handler", "Mailer"),
            ("outcome", "success"),
            ("service", "default"),
        )
        assert after[("retrybus_reprocessed_total", labels)] == 1
        assert after[("retrybus_handler_calls_total", labels)] == 1


def test_metrics_of_one_service_hold_only_its_samples(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    store = open_test_store("memory", tmp_path)
    with running(store, handlers=True, bus_metrics=metrics) as dash:
        billing = EventBus(store, service="billing", clock=dash.clock, metrics=metrics)
        dash.run(dead, billing, 1, handler="Invoice")
        dash.run(dead, dash.bus, 2)
        everything = samples(dash.get("/metrics").text)
        response = dash.get("/metrics?service=billing")
        assert response.status_code == 200
        of_billing = samples(response.text)
        bad = dash.get("/metrics?service=bill/ing")
        empty = dash.get("/metrics?service=")
    assert {dict(labels)["service"] for _, labels in everything if labels} == {
        "default",
        "billing",
    }
    assert of_billing
    assert all(dict(labels).get("service") == "billing" for _, labels in of_billing)
    depth = (
        "retrybus_dead_letter_queue_depth",
        (("handler", "Invoice"), ("processed", "false"), ("service", "billing")),
    )
    assert of_billing[depth] == 1
    dead_lettered = (
        "retrybus_dead_lettered_total",
        (
            ("event_type", "like.added"),
            ("handler", "Invoice"),
            ("reason", "retries_exhausted"),
            ("service", "billing"),
        ),
    )
    assert of_billing[dead_lettered] == 1
    # the store-wide backlog is no service's
    assert ("retrybus_retry_queue_due", ()) in everything
    assert ("retrybus_retry_queue_due", ()) not in of_billing
    assert bad.status_code == 400
    assert "bill/ing" in bad.text
    assert empty.status_code == 400


def test_openmetrics_is_served_when_asked_for(tmp_path: Path) -> None:
    with running(
        open_test_store("memory", tmp_path), bus_metrics=PrometheusMetrics(CollectorRegistry())
    ) as dash:
        response = dash.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_without_metrics_the_page_says_so(tmp_path: Path) -> None:
    with running(open_test_store("memory", tmp_path), metrics=False) as dash:
        response = dash.get("/metrics")
        assert dash.bus.metrics is None
    assert response.status_code == 404
    assert "retrybus[prometheus]" in response.text


def test_a_bus_without_metrics_gets_them_on_a_registry_of_their_own(tmp_path: Path) -> None:
    """Mounted in an app, /metrics shows retrybus's figures, not the app's own."""
    app_secret = Counter("host_app_secret_total", "Something the host app keeps to itself.")
    app_secret.inc()
    try:
        with running(open_test_store("memory", tmp_path)) as dash:
            assert isinstance(dash.bus.metrics, PrometheusMetrics)
            assert dash.bus.metrics.registry is not REGISTRY
            response = dash.get("/metrics")
    finally:
        REGISTRY.unregister(app_secret)
    assert response.status_code == 200
    assert "retrybus_retry_queue_due" in response.text
    assert "host_app_secret" not in response.text
    assert "process_" not in response.text


class SlowMetrics(PrometheusMetrics):
    """Counts its depth reads, which take a while, or fail."""

    def __init__(self, registry: CollectorRegistry, fail: bool = False) -> None:
        super().__init__(registry)
        self.reads = 0
        self.fail = fail

    async def refresh(self, bus: EventBus) -> None:
        self.reads += 1
        await asyncio.sleep(0.2)
        if self.fail:
            raise StoreUnavailable("the store is down")


def test_a_burst_of_scrapes_reads_the_store_once(tmp_path: Path) -> None:
    metrics = SlowMetrics(CollectorRegistry())
    with (
        running(open_test_store("memory", tmp_path), bus_metrics=metrics) as dash,
        ThreadPoolExecutor(10) as pool,
    ):
        statuses = list(pool.map(lambda _: dash.get("/metrics").status_code, range(10)))
    assert statuses == [200] * 10
    assert metrics.reads == 1


def test_with_the_store_down_the_counters_are_still_served(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = SlowMetrics(registry, fail=True)
    metrics.published("still.counted")
    with running(open_test_store("memory", tmp_path), bus_metrics=metrics) as dash:
        response = dash.get("/metrics")
    assert response.status_code == 200
    assert (
        'retrybus_events_published_total{event_type="still.counted",service="default"} 1.0'
        in response.text
    )
