"""Writes docs/grafana-dashboard.json, the Grafana dashboard built on retrybus's
Prometheus metrics: ``python docs/make_grafana.py``. Import the JSON in Grafana
(Dashboards → New → Import) and pick your Prometheus data source.

Its variables choose the jobs, the services (``EventBus(service=)``) and their
handlers; every query keeps to the services chosen, but the retry backlog
(``retrybus_retry_queue_due``), which is the whole store's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("grafana-dashboard.json")
STORE = 'job=~"$job"'
SELECT = f'{STORE}, service=~"$service"'
HANDLERS = f'{SELECT}, handler=~"$handler"'
# the handlers of the services chosen
HANDLER_VALUES = 'label_values(retrybus_handler_calls_total{service=~"$service"}, handler)'


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


def quantiles(metric: str) -> list[dict[str, Any]]:
    """The 50th, 95th and 99th percentiles of histogram ``metric``, per service and handler."""
    return [
        target(
            f"histogram_quantile({q}, sum by (service, handler, le) "
            f"(rate({metric}_bucket{{{HANDLERS}}}[$__rate_interval])))",
            f"p{round(q * 100)} {{{{service}}}}/{{{{handler}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


#: the numbers of ``retrybus_breaker_state``
BREAKER_STATES = {"0": "closed", "1": "half-open", "2": "open", "3": "isolated"}


def breaker_panel(grid: tuple[int, int, int, int]) -> dict[str, Any]:
    """Each circuit breaker's state over time, and its trips (openings) per interval."""
    item = panel(
        "timeseries",
        "Circuit breakers",
        "Each breaker's state: 0 closed, 1 half-open, 2 open, 3 isolated (every process "
        "reads the same store: max across them); and how many times it opened in each "
        "interval.",
        [
            target(
                f"max by (service, breaker) (retrybus_breaker_state{{{SELECT}}})",
                "state {{service}}/{{breaker}}",
            ),
            target(
                "max by (service, breaker) "
                f"(increase(retrybus_breaker_trips_total{{{SELECT}}}[$__rate_interval]))",
                "trips {{service}}/{{breaker}}",
            ),
        ],
        grid,
    )
    # the states' names on the state query only (a count of trips is a number)
    states = {"type": "value", "options": {k: {"text": v} for k, v in BREAKER_STATES.items()}}
    item["fieldConfig"]["overrides"] = [
        {
            "matcher": {"id": "byFrameRefID", "options": "A"},
            "properties": [
                {"id": "mappings", "value": [states]},
                {"id": "custom.lineInterpolation", "value": "stepAfter"},
            ],
        }
    ]
    return item


def dashboard() -> dict[str, Any]:
    panels = [
        panel(
            "stat",
            "Retry queue",
            "Items waiting for a retry (every worker reads the same store: max across them).",
            [
                target(
                    f"sum(max by (service, handler) (retrybus_retry_queue_depth{{{HANDLERS}}}))",
                    "items",
                )
            ],
            (0, 0, 6, 4),
        ),
        panel(
            "stat",
            "Retry backlog",
            "Retry items already due and not yet taken, of every service in the store: "
            "workers are behind when it stays above 0.",
            [target(f"max(retrybus_retry_queue_due{{{STORE}}})", "due")],
            (6, 0, 6, 4),
        ),
        panel(
            "stat",
            "Unprocessed dead letters",
            "Dead letters waiting for a person (reprocess, requeue or delete them).",
            [
                target(
                    "sum(max by (service, handler) "
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
            "Events published per second, per publishing service and event type.",
            [
                target(
                    "sum by (service, event_type) "
                    f"(rate(retrybus_events_published_total{{{SELECT}}}[$__rate_interval]))",
                    "{{service}} {{event_type}}",
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
                    "sum by (service, handler, outcome) "
                    f"(rate(retrybus_handler_calls_total{{{HANDLERS}}}[$__rate_interval]))",
                    "{{service}}/{{handler}} {{outcome}}",
                )
            ],
            (12, 4, 12, 8),
            "ops",
        ),
        panel(
            "timeseries",
            "Handler duration",
            "How long handler calls take: 50th, 95th and 99th percentiles per handler.",
            quantiles("retrybus_handler_duration_seconds"),
            (0, 12, 12, 8),
            "s",
        ),
        panel(
            "timeseries",
            "Retry lag",
            "How late retries start past their scheduled time (workers too few or too busy "
            "when it grows).",
            quantiles("retrybus_retry_lag_seconds"),
            (12, 12, 12, 8),
            "s",
        ),
        panel(
            "timeseries",
            "Retries scheduled and succeeded",
            "Failed deliveries put in the retry queue, and retries that worked, per second.",
            [
                target(
                    "sum by (service, handler) "
                    f"(rate(retrybus_retries_scheduled_total{{{HANDLERS}}}[$__rate_interval]))",
                    "scheduled {{service}}/{{handler}}",
                ),
                target(
                    "sum by (service, handler) "
                    f"(rate(retrybus_retries_succeeded_total{{{HANDLERS}}}[$__rate_interval]))",
                    "succeeded {{service}}/{{handler}}",
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
                    "sum by (service, handler, reason) "
                    f"(rate(retrybus_dead_lettered_total{{{HANDLERS}}}[$__rate_interval]))",
                    "{{service}}/{{handler}} {{reason}}",
                )
            ],
            (12, 20, 12, 8),
            "ops",
        ),
        panel(
            "timeseries",
            "Queue depth per handler",
            "Retry queue items and unprocessed dead letters per service and handler.",
            [
                target(
                    f"max by (service, handler) (retrybus_retry_queue_depth{{{HANDLERS}}})",
                    "retry {{service}}/{{handler}}",
                ),
                target(
                    "max by (service, handler) "
                    f'(retrybus_dead_letter_queue_depth{{{HANDLERS}, processed="false"}})',
                    "dead {{service}}/{{handler}}",
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
                    "sum by (service, handler, outcome) "
                    f"(rate(retrybus_reprocessed_total{{{HANDLERS}}}[$__rate_interval]))",
                    "reprocessed {{service}}/{{handler}} {{outcome}}",
                ),
                target(
                    "sum by (service, handler) "
                    f"(rate(retrybus_requeued_total{{{HANDLERS}}}[$__rate_interval]))",
                    "requeued {{service}}/{{handler}}",
                ),
            ],
            (12, 28, 12, 8),
            "ops",
        ),
        panel(
            "timeseries",
            "Broker lag per service",
            "Messages a broker (a transport) holds for each service: waiting, or received "
            "and not yet acked (max across its workers, which each read it).",
            [
                target(
                    f"max by (service) (retrybus_transport_lag{{{SELECT}}})",
                    "{{service}}",
                )
            ],
            (0, 36, 12, 8),
        ),
        panel(
            "timeseries",
            "Outbox: staged, not relayed yet",
            "Events staged in each application's outbox table that no relay has published "
            "yet, and how long the oldest has waited (max across the workers, which each "
            "read it). A growing age means no relay runs, or it cannot reach the store.",
            [
                target(f"max by (outbox) (retrybus_outbox_depth{{{STORE}}})", "rows {{outbox}}"),
                target(
                    f"max by (outbox) (retrybus_outbox_oldest_age_seconds{{{STORE}}})",
                    "oldest age (s) {{outbox}}",
                    "B",
                ),
            ],
            (12, 36, 12, 8),
        ),
        panel(
            "timeseries",
            "Inbox: deliveries skipped",
            "Deliveries whose handler had already succeeded for the event (an inbox claim "
            "found), per second: redeliveries the inbox kept from running twice.",
            [
                target(
                    "sum by (service, handler) "
                    f"(rate(retrybus_inbox_skipped_total{{{HANDLERS}}}[$__rate_interval]))",
                    "{{service}}/{{handler}}",
                )
            ],
            (0, 44, 12, 8),
            "ops",
        ),
        breaker_panel((12, 44, 12, 8)),
    ]
    for number, item in enumerate(panels, start=1):
        item["id"] = number
    return {
        "title": "retrybus",
        "uid": "retrybus",
        "description": (
            "Deliveries, retries and dead letters of retrybus (its Prometheus metrics), "
            "per service and handler."
        ),
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
                    "name": "service",
                    "label": "Service",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {
                        "query": "label_values(retrybus_handler_calls_total, service)",
                        "refId": "service",
                    },
                    "definition": "label_values(retrybus_handler_calls_total, service)",
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
                        "query": HANDLER_VALUES,
                        "refId": "handler",
                    },
                    "definition": HANDLER_VALUES,
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
