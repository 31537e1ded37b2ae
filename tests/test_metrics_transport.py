"""``retrybus_transport_lag{service}`` (issue 13): the messages a broker holds
for a service, set by ``PrometheusMetrics.set_transport_lag`` and by ``refresh``
from a bus's transport (the in-process memory broker), as a worker refreshes it."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from retrybus import Event, EventBus, RetryWorker, open_store
from retrybus._transports.base import TransportSettings
from retrybus._transports.memory import MemoryTransport
from retrybus.prometheus import METRIC_NAMES, PrometheusMetrics

LAG = "retrybus_transport_lag"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def lag_of(registry: CollectorRegistry, service: str) -> float | None:
    return registry.get_sample_value(LAG, {"service": service})


def test_set_transport_lag_sets_and_removes_a_services_sample(registry: CollectorRegistry) -> None:
    assert LAG in METRIC_NAMES
    metrics = PrometheusMetrics(registry)
    metrics.set_transport_lag("billing", 7)
    metrics.set_transport_lag("shipping", 0)
    assert lag_of(registry, "billing") == 7
    assert lag_of(registry, "shipping") == 0
    metrics.set_transport_lag("billing", None)  # the broker did not say: no stale value
    assert lag_of(registry, "billing") is None
    body, _ = metrics.exposition(service="shipping")
    assert b'retrybus_transport_lag{service="shipping"} 0.0' in body


@pytest.mark.parametrize(
    ("service", "lag", "says"),
    [
        ("no way", 1, "a service name is"),
        ("billing", -1, "got -1"),
        ("billing", 1.5, "got 1.5"),
        ("billing", True, "got True"),
    ],
)
def test_set_transport_lag_refuses_a_bad_value_naming_it(
    registry: CollectorRegistry, service: str, lag: object, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        PrometheusMetrics(registry).set_transport_lag(service, lag)  # type: ignore[arg-type]


async def test_refresh_reads_the_buses_service_lag_from_its_transport(
    registry: CollectorRegistry,
) -> None:
    metrics = PrometheusMetrics(registry)
    plain = EventBus(open_store("memory://"), service="billing", metrics=metrics)
    await metrics.refresh(plain)
    assert lag_of(registry, "billing") is None  # no transport, no sample

    transport = MemoryTransport()
    bus = EventBus(open_store("memory://"), service="billing", transport=transport)
    await metrics.refresh(bus)
    assert lag_of(registry, "billing") is None  # not declared: the broker does not say
    await transport.declare("billing", ["order.*"], TransportSettings())
    await transport.send([Event("order.paid", {"n": n}) for n in range(3)])
    await metrics.refresh(bus)
    assert lag_of(registry, "billing") == 3
    await transport.forget("billing")
    await metrics.refresh(bus)
    assert lag_of(registry, "billing") is None


async def test_the_worker_refreshes_its_services_transport_lag(
    registry: CollectorRegistry,
) -> None:
    transport = MemoryTransport()
    bus = EventBus(
        open_store("memory://"),
        service="billing",
        transport=transport,
        metrics=PrometheusMetrics(registry),
    )
    done: list[Event] = []
    bus.subscribe("order.*", done.append, name="Invoice")
    async with RetryWorker(bus, check_interval=0.05, metrics_interval=0.01):
        for _ in range(300):  # the consumer declares the service; the gauge follows
            if lag_of(registry, "billing") is not None:
                break
            await asyncio.sleep(0.01)
        assert lag_of(registry, "billing") == 0
