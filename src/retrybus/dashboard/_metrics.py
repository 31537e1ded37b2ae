"""``/metrics``: the bus's Prometheus metrics, with the queues' depth read at
most every few seconds, for Prometheus to scrape (read-only: no token needed).
``/metrics?service=NAME`` serves only the samples labelled with that service."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from .._services import check_service
from ._web import Dashboard, HTTPError, state

if TYPE_CHECKING:
    from .._bus import EventBus
    from ..prometheus import PrometheusMetrics

log = logging.getLogger("retrybus.dashboard")

# scrapes closer together than this reuse the depth read before
REFRESH_INTERVAL = 5.0
# a store slower than this to count its queues leaves the depths as they were
REFRESH_TIMEOUT = 5.0


def attach_metrics(bus: EventBus) -> PrometheusMetrics | None:
    """The bus's ``PrometheusMetrics``; a bus without metrics gets one on a registry
    of its own, so that ``/metrics`` shows retrybus's figures and nothing else of
    the app it is mounted in (None: prometheus-client is not installed, or the bus
    reports elsewhere)."""
    try:
        from prometheus_client import CollectorRegistry

        from ..prometheus import PrometheusMetrics
    except ImportError:
        return None
    if bus.metrics is None:
        bus.instrument(metrics=PrometheusMetrics(CollectorRegistry()))
    return bus.metrics if isinstance(bus.metrics, PrometheusMetrics) else None


async def metrics(request: Request) -> Response:
    dashboard = state(request)
    served = dashboard.metrics
    if served is None:
        raise HTTPError(
            404,
            "No metrics here",
            "/metrics serves retrybus.prometheus.PrometheusMetrics: "
            "pip install 'retrybus[prometheus]', and give the bus no other metrics",
        )
    service = _service_asked(request)
    await _refresh(dashboard, served)
    body, content_type = served.exposition(request.headers.get("accept"), service=service)
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def _service_asked(request: Request) -> str | None:
    """``?service=NAME``: only that service's samples (None: every sample)."""
    service = request.query_params.get("service")
    if service is None:
        return None
    try:
        return check_service(service)
    except ValueError as exc:
        raise HTTPError(400, "Bad service", str(exc)) from None


async def _refresh(dashboard: Dashboard, served: PrometheusMetrics) -> None:
    """Read the depths again at most every ``REFRESH_INTERVAL`` seconds, one scrape
    at a time (a burst of requests reads the store once). A store that does not
    answer leaves the previous depths: the counters are served regardless."""
    # a lock of the running loop: an app may be served by more than one in its life
    loop = asyncio.get_running_loop()
    if dashboard.metrics_lock is None or dashboard.metrics_lock[0]() is not loop:
        dashboard.metrics_lock = (weakref.ref(loop), asyncio.Lock())
    async with dashboard.metrics_lock[1]:
        now = time.monotonic()
        if now - dashboard.metrics_read_at < REFRESH_INTERVAL:
            return
        dashboard.metrics_read_at = now
        try:
            await asyncio.wait_for(served.refresh(dashboard.bus), REFRESH_TIMEOUT)
        except Exception:
            log.warning("could not read the queues' depth for /metrics", exc_info=True)
