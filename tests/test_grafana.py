"""The Grafana dashboard in docs/: up to date with its generator, valid PromQL,
and built only on metric names and labels that retrybus really exports."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import promql_parser
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from retrybus.prometheus import METRIC_NAMES
from test_metrics import exercised

DOCS = Path(__file__).parent.parent / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
# what Grafana substitutes before a query reaches Prometheus
VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$service": ".*", "$handler": ".*"}
METRIC = re.compile(r"\bretrybus_[a-z_]+")
BY = re.compile(r"\bby \(([^)]*)\)")
MATCHER = re.compile(r"(\w+)=~?\"")
# the one metric of the whole store, not of a service (see retrybus.prometheus)
STORE_WIDE = "retrybus_retry_queue_due"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def exported_labels() -> dict[str, set[str]]:
    """Every series name a fully exercised PrometheusMetrics exports, with its labels."""
    metrics = exercised(CollectorRegistry())
    body, _ = metrics.exposition()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_the_json_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_grafana", DOCS / "make_grafana.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert dashboard() == module.dashboard(), "run: python docs/make_grafana.py"


def test_every_query_is_valid_promql() -> None:
    for expr in expressions():
        text = expr
        for variable, value in VARIABLES.items():
            text = text.replace(variable, value)
        promql_parser.parse(text)  # raises ValueError on a syntax error


def test_queries_use_only_exported_metrics_and_labels() -> None:
    exported = exported_labels()
    used: set[str] = set()
    for expr in expressions():
        names = METRIC.findall(expr)
        assert names, expr
        used.update(names)
        for name in names:
            assert name in exported, f"{name} is not exported (in {expr})"
        labels = {label.strip() for group in BY.findall(expr) for label in group.split(",")}
        labels |= set(MATCHER.findall(expr))
        labels -= {"job"}  # Prometheus adds it when it scrapes
        for label in labels:
            assert any(label in exported[name] for name in names), f"no label {label!r} in {expr}"
    # every metric is on the dashboard (histograms through their buckets)
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert bases == set(METRIC_NAMES)


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        assert panel["datasource"]["uid"] == "${datasource}"


def variables() -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard()["templating"]["list"]}


OUTBOX_WIDE = {"retrybus_outbox_depth", "retrybus_outbox_oldest_age_seconds"}


def test_every_query_filters_by_the_chosen_services() -> None:
    for expr in expressions():
        if METRIC.findall(expr) == [STORE_WIDE]:
            assert "service" not in expr, expr  # the store's backlog has no service
            continue
        if all(name in OUTBOX_WIDE for name in METRIC.findall(expr)):
            # an outbox table holds what every service staged in one application database
            assert "service" not in expr, expr
            continue
        assert 'service=~"$service"' in expr, expr
        # a handler's name is one service's: grouped by handler, grouped by service too
        for group in BY.findall(expr):
            labels = {label.strip() for label in group.split(",")}
            assert "handler" not in labels or "service" in labels, expr
    assert sum(METRIC.findall(expr) == [STORE_WIDE] for expr in expressions()) == 1


def test_services_are_chosen_from_the_exported_ones() -> None:
    service = variables()["service"]
    assert service["definition"] == "label_values(retrybus_handler_calls_total, service)"
    assert service["query"]["query"] == service["definition"]
    assert (service["multi"], service["includeAll"], service["allValue"]) == (True, True, ".*")
    assert "service" in exported_labels()["retrybus_handler_calls_total"]
    # the handlers offered are those of the services chosen
    assert 'service=~"$service"' in variables()["handler"]["definition"]
