"""Each service's broker lag (issue 13): ``ServiceSummary.broker_lag`` from
``Services.overview`` on a bus with a transport (the in-process memory broker),
``retrybus services`` (its totals line and JSON) and the dashboard's Services page."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from dashboard_support import Dash, open_test_store, running
from retrybus import Event, EventBus, open_store
from retrybus._cli import views
from retrybus._cli.app import app
from retrybus._services import ServiceSummary
from retrybus._transports.base import TransportSettings
from retrybus._transports.memory import MemoryTransport

runner = CliRunner()


async def _two_services(bus: EventBus, transport: MemoryTransport) -> None:
    """billing and shipping in the store; on the broker, billing holds two
    messages and shipping is not declared."""
    billing = EventBus(bus.store, service="billing", route_refresh=0)
    shipping = EventBus(bus.store, service="shipping", route_refresh=0)
    billing.subscribe("order.*", lambda event: None, name="Invoice")
    shipping.subscribe("order.paid", lambda event: None, name="Ship")
    await billing.register()
    await shipping.register()
    await transport.declare("billing", ["order.*"], TransportSettings())
    await transport.send([Event("order.paid", {"n": n}) for n in range(2)])


# Services.overview ------------------------------------------------------------


async def test_overview_has_no_broker_lag_without_a_transport() -> None:
    bus = EventBus(open_store("memory://"))
    await _two_services(bus, MemoryTransport())
    assert [(s.service, s.broker_lag) for s in await bus.services.overview()] == [
        ("billing", None),
        ("shipping", None),
    ]


async def test_overview_reads_each_services_broker_lag_from_the_transport() -> None:
    transport = MemoryTransport()
    bus = EventBus(open_store("memory://"), transport=transport)
    await _two_services(bus, transport)
    overview = await bus.services.overview()
    # shipping has nothing on the broker: the memory broker does not say
    assert [(s.service, s.broker_lag) for s in overview] == [("billing", 2), ("shipping", None)]
    [billing] = await bus.services.overview("billing")
    assert billing.broker_lag == 2
    receiver = await transport.receiver("billing", "w1", TransportSettings())
    [message] = await receiver.receive(1, 1.0)
    [billing] = await bus.services.overview("billing")
    assert billing.broker_lag == 2  # one waiting, one received and not yet acked
    await receiver.ack([message])
    [billing] = await bus.services.overview("billing")
    assert billing.broker_lag == 1


async def test_overview_of_a_forgotten_service_has_no_broker_lag() -> None:
    transport = MemoryTransport()
    bus = EventBus(open_store("memory://"), transport=transport)
    await _two_services(bus, transport)
    await transport.forget("billing")
    [billing] = await bus.services.overview("billing")
    assert billing.broker_lag is None


# retrybus services ------------------------------------------------------------


def _summary(service: str, broker_lag: int | None) -> ServiceSummary:
    return ServiceSummary(service, datetime.now(UTC), (), (), broker_lag=broker_lag)


def _rendered(*args: Any) -> list[str]:
    console = Console(width=120, record=True)
    console.print(views.services_view(*args))
    return console.export_text().splitlines()


def test_the_services_view_shows_broker_lag_only_with_a_transport() -> None:
    summaries = [_summary("billing", 12), _summary("shipping", None)]
    lines = _rendered(summaries, "sqlite:///x.db", "redis://h:6379/0")
    assert lines[0] == "services — sqlite:///x.db, broker redis://h:6379/0"
    assert "0 waiting, 0 dead; no live worker; broker lag 12" in lines
    assert "0 waiting, 0 dead; no live worker; broker lag —" in lines
    lines = _rendered(summaries, "sqlite:///x.db")
    assert lines[0] == "services — sqlite:///x.db"
    assert not [line for line in lines if "broker" in line]


async def _invoke(*args: object) -> Result:
    return await asyncio.to_thread(runner.invoke, app, [str(arg) for arg in args])


async def test_services_command_shows_broker_lag_with_transport(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'services.db'}"
    bus = EventBus(open_store(url))
    await _two_services(bus, MemoryTransport())
    await bus.close()
    # a memory broker opened by URL is empty: no lag of any service is known
    result = await _invoke("services", "--store", url, "--transport", "memory://")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"services — {url}, broker memory://"
    assert lines.count("0 waiting, 0 dead; no live worker; broker lag —") == 2
    result = await _invoke("services", "--store", url, "--json")
    assert result.exit_code == 0, result.output
    assert [(s["service"], s["broker_lag"]) for s in json.loads(result.stdout)] == [
        ("billing", None),
        ("shipping", None),
    ]
    result = await _invoke("services", "--store", url)
    assert "broker" not in result.stdout


async def test_services_command_with_a_bad_transport_url_is_a_usage_error(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'services.db'}"
    bus = EventBus(open_store(url))
    await bus.register()
    await bus.close()
    result = await _invoke("services", "--store", url, "--transport", "bogus://x")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: --transport: unknown transport URL scheme 'bogus'")


# the dashboard ----------------------------------------------------------------


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store("memory", tmp_path)) as opened:
        yield opened


def _lags(html: str) -> list[str]:
    return re.findall(r'<span class="broker-lag"[^>]*>([^<]*)</span>', html)


def test_the_services_page_shows_each_services_broker_lag(dash: Dash) -> None:
    transport = MemoryTransport()
    dash.run(_two_services, dash.bus, transport)
    assert _lags(dash.get("/services").text) == []  # no transport: no broker lag
    dash.bus.use_transport(transport)
    page = dash.get("/services")
    assert page.status_code == 200
    assert _lags(page.text) == ["Broker lag 2", "Broker lag —"]
    assert "First deliveries travel on the broker memory://" in page.text
    assert _lags(dash.get("/services", params={"service": "billing"}).text) == ["Broker lag 2"]
