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
VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$handler": ".*"}
METRIC = re.compile(r"\bretrybus_[a-z_]+")
BY = re.compile(r"\bby \(([^)]*)\)")
MATCHER = re.compile(r"(\w+)=~?\"")


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
