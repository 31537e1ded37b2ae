"""``retrybus worker`` observed from outside: ``--metrics-port`` serves Prometheus
metrics, ``--log-format json`` writes one JSON object per line with the delivery
fields, ``--tracing`` puts its retries in the publisher's trace."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from retrybus import Event, EventBus, open_store
from test_cli import _queue_due_items, _start_worker, _wait_for, with_bus

SERVING = re.compile(r"serving Prometheus metrics at http://[^:]+:(\d+)/metrics")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def run_until_dead_lettered(worker: subprocess.Popen[str], url: str) -> str:
    """Let ``worker`` run until the store holds one dead letter, stop it with
    SIGTERM, check it exited 0; its stderr."""
    try:
        _wait_for(
            lambda: with_bus(url, lambda bus: bus.dead_letters.count()) == 1, "the dead letter"
        )
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    return stderr


def read_port(worker: subprocess.Popen[str], seen: list[str]) -> int:
    assert worker.stderr is not None
    for line in worker.stderr:
        seen.append(line)
        found = SERVING.search(line)
        if found:
            return int(found.group(1))
    raise AssertionError("the worker never said where it serves metrics:\n" + "".join(seen))


def test_worker_serves_metrics_and_logs_json_lines(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    good = [Event("like.added", {"n": n}) for n in range(3)]
    bad = Event("like.added", {"fail": True})
    _queue_due_items(url, [*good, bad])
    worker = _start_worker(
        url, tmp_path, "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--log-format", "json"
    )
    lines: list[str] = []
    try:
        port = read_port(worker, lines)
        _wait_for(lambda: with_bus(url, lambda bus: bus.retry_queue.count()) == 0, "the retries")
        metrics: dict[Any, float] = {}

        def scraped_the_dead_letter() -> bool:
            metrics.update(scrape(port))
            key = (
                "retrybus_dead_lettered_total",
                (
                    ("event_type", "like.added"),
                    ("handler", "SocialStatisticsHandler"),
                    ("reason", "retries_exhausted"),
                    ("service", "default"),
                ),
            )
            return metrics.get(key) == 1

        _wait_for(scraped_the_dead_letter, "the dead letter in the metrics")
        worker.send_signal(signal.SIGTERM)
        _, rest = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, "".join(lines) + rest
    labels = (
        ("event_type", "like.added"),
        ("handler", "SocialStatisticsHandler"),
        ("service", "default"),
    )
    assert metrics[("retrybus_retries_succeeded_total", labels)] == 3
    failed = (*labels[:2], ("outcome", "failure"), labels[2])
    assert metrics[("retrybus_handler_calls_total", failed)] == 2
    assert metrics[("retrybus_retry_lag_seconds_count", labels)] == 5
    assert ("retrybus_retry_queue_due", ()) in metrics
    assert all(json.loads(line)["logger"].startswith("retrybus") for line in lines)


def test_worker_log_lines_are_json_with_the_delivery_fields(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    bad = Event("like.added", {"fail": True})
    _queue_due_items(url, [bad])
    worker = _start_worker(url, tmp_path, "--log-format", "json", "--log-level", "info")
    stderr = run_until_dead_lettered(worker, url)
    records = [json.loads(line) for line in stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    about_the_event = [r for r in records if bad.id in r["message"]]
    assert len(about_the_event) == 2  # a retry failed and was rescheduled; then dead-lettered
    for record in about_the_event:
        assert record["event_id"] == bad.id
        assert record["event_type"] == "like.added"
        assert record["handler"] == "SocialStatisticsHandler"
        assert isinstance(record["attempt"], int)
    assert about_the_event[-1]["level"] == "warning"
    assert about_the_event[-1]["reason"] == "failed after 2 retries"


def test_worker_with_tracing_puts_its_retries_in_the_publisher_s_trace(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from retrybus import FixedDelay
    from retrybus.otel import OpenTelemetryTracing

    url = f"sqlite:///{tmp_path / 'worker.db'}"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def publish() -> None:
        bus = EventBus(
            open_store(url),
            default_policy=FixedDelay(delay=0.01, max_retries=2),
            tracing=OpenTelemetryTracing(provider),
        )

        async def fails(event: Event) -> None:
            raise TimeoutError("connection timeout")

        bus.subscribe("like.added", fails, name="SocialStatisticsHandler")
        async with bus:
            await bus.publish(Event("like.added", {"fail": True}))

    asyncio.run(publish())
    (publish_span,) = [s for s in exporter.get_finished_spans() if s.name == "publish like.added"]
    (first,) = [s for s in exporter.get_finished_spans() if s.name == "handle like.added"]
    spans_file = tmp_path / "spans.jsonl"
    env = {**os.environ, "TRACED_APP_SPANS": str(spans_file)}
    worker = _start_worker(url, tmp_path, "--tracing", app="traced_app:bus", env=env)
    run_until_dead_lettered(worker, url)
    retries = [json.loads(line) for line in spans_file.read_text().splitlines()]
    assert [r["name"] for r in retries] == ["retry like.added", "retry like.added"]
    trace_id = f"{publish_span.context.trace_id:032x}"
    assert {r["trace_id"] for r in retries} == {trace_id}
    assert {r["parent"] for r in retries} == {f"{publish_span.context.span_id:016x}"}
    assert retries[0]["links"] == [f"{first.context.span_id:016x}"]
    assert [r["attributes"]["retrybus.outcome"] for r in retries] == ["retry", "dead_letter"]
    assert retries[1]["links"] == [retries[0]["span_id"]]
