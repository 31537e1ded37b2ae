"""Writes docs/grafana-dashboard.json, the Grafana dashboard built on retrybus's
Prometheus metrics: ``python docs/make_grafana.py``. Import the JSON in Grafana
(Dashboards → New → Import) and pick your Prometheus data source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("grafana-dashboard.json")
SELECT = 'job=~"$job"'
HANDLERS = f'{SELECT}, handler=~"$handler"'


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
    }


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    unit: str = "short",
) -> dict[str, Any]:
    x, y, w, h = grid
    refs = "ABCDEFGH"
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        "targets": [{**t, "refId": refs[i]} for i, t in enumerate(targets)],
    }


def quantiles(metric: str, by: str) -> list[dict[str, Any]]:
    return [
        target(
            f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{HANDLERS}}}[$__rate_interval])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def dashboard() -> dict[str, Any]:
    panels = [
        panel(
            "stat",
            "Retry queue",
            "Items waiting for a retry (every worker reads the same store: max across them).",
            [target(f"sum(max by (handler) (retrybus_retry_queue_depth{{{HANDLERS}}}))", "items")],
            (0, 0, 6, 4),
        ),
        panel(
            "stat",
            "Retry backlog",
            "Retry items already due and not yet taken: workers are behind when it stays above 0.",
            [target(f"max(retrybus_retry_queue_due{{{SELECT}}})", "due")],
            (6, 0, 6, 4),
        ),
        panel(
            "stat",
            "Unprocessed dead letters",
            "Dead letters waiting for a person (reprocess, requeue or delete them).",
            [
                target(
                    "sum(max by (handler) "
                    f'(retrybus_dead_letter_queue_depth{{{HANDLERS}, processed="false"}}))',
                    "dead letters",
                )
            ],
            (12, 0, 6, 4),
        ),
        panel(
            "stat",
            "Dead-lettered in the last hour",
            "Deliveries that ended in the dead letter queue in the last hour.",
            [
                target(
                    f"sum(increase(retrybus_dead_lettered_total{{{HANDLERS}}}[1h]))",
                    "dead-lettered",
                )
            ],
            (18, 0, 6, 4),
        ),
        panel(
            "timeseries",
            "Events published",
            "Events published per second, per event type.",
            [
                target(
                    "sum by (event_type) "
                    f"(rate(retrybus_events_published_total{{{SELECT}}}[$__rate_interval]))",
                    "{{event_type}}",
                )
            ],
            (0, 4, 12, 8),
            "ops",
        ),
        panel(
            "timeseries",
            "Handler calls by outcome",
            "First calls, retries and reprocesses per second, per handler and outcome.",
            [
                target(
                    "sum by (handler, outcome) "
                    f"(rate(retrybus_handler_calls_total{{{HANDLERS}}}[$__rate_interval]))",
                    "{{handler}} {{outcome}}",
                )
            ],
            (12, 4, 12, 8),
            "ops",
        ),
        panel(
            "timeseries",
            "Handler duration",
            "How long handler calls take: 50th, 95th and 99th percentiles per handler.",
            quantiles("retrybus_handler_duration_seconds", "handler"),
            (0, 12, 12, 8),
            "s",
        ),
        panel(
            "timeseries",
            "Retry lag",
            "How late retries start past their scheduled time (workers too few or too busy "
            "when it grows).",
            quantiles("retrybus_retry_lag_seconds", "handler"),
            (12, 12, 12, 8),
            "s",
        ),
        panel(
            "timeseries",
            "Retries scheduled and succeeded",
            "Failed deliveries put in the retry queue, and retries that worked, per second.",
            [
                target(
                    "sum by (handler) "
                    f"(rate(retrybus_retries_scheduled_total{{{HANDLERS}}}[$__rate_interval]))",
                    "scheduled {{handler}}",
                ),
                target(
                    "sum by (handler) "
                    f"(rate(retrybus_retries_succeeded_total{{{HANDLERS}}}[$__rate_interval]))",
                    "succeeded {{handler}}",
                ),
            ],
            (0, 20, 12, 8),
            "ops",
        ),
        panel(
            "timeseries",
            "Dead-lettered by reason",
            "Deliveries moved to the dead letter queue per second, by handler and kind of reason.",
            [
                target(
                    "sum by (handler, reason) "
                    f"(rate(retrybus_dead_lettered_total{{{HANDLERS}}}[$__rate_interval]))",
                    "{{handler}} {{reason}}",
                )
            ],
            (12, 20, 12, 8),
            "ops",
        ),
        panel(
            "timeseries",
            "Queue depth per handler",
            "Retry queue items and unprocessed dead letters per handler.",
            [
                target(
                    f"max by (handler) (retrybus_retry_queue_depth{{{HANDLERS}}})",
                    "retry {{handler}}",
                ),
                target(
                    "max by (handler) "
                    f'(retrybus_dead_letter_queue_depth{{{HANDLERS}, processed="false"}})',
                    "dead {{handler}}",
                ),
            ],
            (0, 28, 12, 8),
        ),
        panel(
            "timeseries",
            "Reprocessed and requeued",
            "Dead letters reprocessed (by outcome) and requeued, per second.",
            [
                target(
                    "sum by (handler, outcome) "
                    f"(rate(retrybus_reprocessed_total{{{HANDLERS}}}[$__rate_interval]))",
                    "reprocessed {{handler}} {{outcome}}",
                ),
                target(
                    "sum by (handler) "
                    f"(rate(retrybus_requeued_total{{{HANDLERS}}}[$__rate_interval]))",
                    "requeued {{handler}}",
                ),
            ],
            (12, 28, 12, 8),
            "ops",
        ),
    ]
    for number, item in enumerate(panels, start=1):
        item["id"] = number
    return {
        "title": "retrybus",
        "uid": "retrybus",
        "description": "Deliveries, retries and dead letters of retrybus (its Prometheus metrics).",
        "tags": ["retrybus"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {
                        "query": "label_values(retrybus_retry_queue_due, job)",
                        "refId": "job",
                    },
                    "definition": "label_values(retrybus_retry_queue_due, job)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
                {
                    "name": "handler",
                    "label": "Handler",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {
                        "query": "label_values(retrybus_handler_calls_total, handler)",
                        "refId": "handler",
                    },
                    "definition": "label_values(retrybus_handler_calls_total, handler)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
