"""Prometheus metrics for retrybus (``pip install "retrybus[prometheus]"``).

>>> from retrybus.prometheus import PrometheusMetrics
>>> bus = EventBus(store, metrics=PrometheusMetrics())

Counters, histograms and gauges named ``retrybus_…`` (see ``METRIC_NAMES``),
in prometheus-client's default registry unless you pass one. Serve them with
``retrybus worker --metrics-port 9464``, the dashboard's ``/metrics``,
``PrometheusMetrics.serve`` or your own web app (``exposition()``).

Their labels, the service first (``retrybus.EventBus(service=)``)::

    retrybus_events_published_total      service, event_type
    retrybus_handler_calls_total         service, event_type, handler, outcome
    retrybus_handler_duration_seconds    service, event_type, handler
    retrybus_retries_scheduled_total     service, event_type, handler
    retrybus_retries_succeeded_total     service, event_type, handler
    retrybus_dead_lettered_total         service, event_type, handler, reason
    retrybus_reprocessed_total           service, event_type, handler, outcome
    retrybus_requeued_total              service, event_type, handler
    retrybus_retry_lag_seconds           service, event_type, handler
    retrybus_retry_queue_depth           service, handler
    retrybus_dead_letter_queue_depth     service, handler, processed
    retrybus_retry_queue_due             (none: the whole store's backlog)
    retrybus_transport_lag               service
    retrybus_outbox_depth                outbox
    retrybus_outbox_oldest_age_seconds   outbox
    retrybus_inbox_skipped_total         service, handler
    retrybus_breaker_state               service, breaker
    retrybus_breaker_trips_total         service, breaker

``outcome`` is ``success`` or ``failure``, ``reason`` a ``retrybus.reason_kind``,
``processed`` ``true`` or ``false``. A delivery's figures carry the service of
the bus that ran or published it (a record's own service when a bus acts on
another service's records, as ``bus.services.remove`` and a requeue may). The
depth gauges are read from the store (``refresh``) for every service it holds;
``retrybus_transport_lag``, the messages a broker holds for a service (waiting,
or received and not yet acked), from the refreshing bus's transport, for its
own service (``set_transport_lag`` sets it for any). The outbox gauges (the
events staged in an application's ``retrybus_outbox`` table and how long the
oldest has waited) come from the refreshing bus's outbox database
(``EventBus(outbox=URL)``), labelled with its name (``OutboxDatabase.label``).
``retrybus_breaker_state`` is each circuit breaker's state: 0 closed, 1
half-open, 2 open, 3 isolated; ``retrybus_breaker_trips_total`` how many times
it opened, as the service shares it (every process reports the same count:
take ``max`` across instances, as for the depth gauges, and ``increase`` over
time). Both are read from the store's breaker records on each ``refresh``, of
every service, and set when this process sees a breaker change
(``set_breaker_state``).
``exposition(service=)`` keeps one service's samples only.

The figures are kept as plain numbers and handed to prometheus-client when it
is scraped (a custom collector): counting a delivery costs well under a
microsecond, so that metrics stay cheap beside a handler that does nothing.
They are updated from the event loop's thread; scrapes may come from any.

Several worker processes: give each its own ``--metrics-port`` and let
Prometheus scrape each one (one endpoint per process); sum the counters across
``instance`` in your queries, and take ``max`` of the depth gauges, which every
process reads from the same store. prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) is not used: it covers only its own metric classes.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"retrybus metrics need {exc.name}: pip install 'retrybus[prometheus]'"
    ) from exc

from ._breaker_records import BREAKER_STATES, read_breakers
from ._services import DEFAULT_SERVICE, check_service

if TYPE_CHECKING:
    from datetime import datetime
    from threading import Thread
    from wsgiref.simple_server import WSGIServer

    from ._observe import BusView
    from ._outbox import Outbox, OutboxDepth
    from ._stores.base import Store
    from ._transports.base import Transport

__all__ = ["DURATION_BUCKETS", "LAG_BUCKETS", "METRIC_NAMES", "PrometheusMetrics"]

#: handler durations, seconds
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: how late retries start past their ``next_retry``, seconds
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# the most (service, handler) pairs a depth gauge reports (the largest queues first)
_MAX_DEPTH_SERIES = 500
#: seconds ``refresh`` waits for the broker's lag of the bus's service
TRANSPORT_LAG_TIMEOUT = 1.0

logger = logging.getLogger("retrybus")

#: every metric retrybus exports, as Prometheus names it
METRIC_NAMES = (
    "retrybus_events_published_total",
    "retrybus_handler_calls_total",
    "retrybus_handler_duration_seconds",
    "retrybus_retries_scheduled_total",
    "retrybus_retries_succeeded_total",
    "retrybus_dead_lettered_total",
    "retrybus_reprocessed_total",
    "retrybus_requeued_total",
    "retrybus_retry_lag_seconds",
    "retrybus_retry_queue_depth",
    "retrybus_retry_queue_due",
    "retrybus_dead_letter_queue_depth",
    "retrybus_transport_lag",
    "retrybus_outbox_depth",
    "retrybus_outbox_oldest_age_seconds",
    "retrybus_inbox_skipped_total",
    "retrybus_breaker_state",
    "retrybus_breaker_trips_total",
)

_PAIR = ["service", "event_type", "handler"]


class _Histogram:
    """Bucket counts (not yet cumulative; the last is +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        counts, total = list(self.counts), self.total  # copies, as a scrape may run meanwhile
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, total


def _le(bound: float) -> str:
    return repr(float(bound))  # as prometheus-client writes bucket bounds: 1.0, 0.005


class _Series:
    """The figures of one (service, event type, handler)."""

    __slots__ = (
        "calls_failed",
        "calls_ok",
        "dead",
        "duration",
        "lag",
        "reprocessed_failed",
        "reprocessed_ok",
        "requeued",
        "scheduled",
        "succeeded",
    )

    def __init__(self) -> None:
        self.calls_ok = self.calls_failed = 0
        self.scheduled = self.succeeded = self.requeued = 0
        self.reprocessed_ok = self.reprocessed_failed = 0
        self.dead: dict[str, int] = {}
        self.duration = _Histogram(DURATION_BUCKETS)
        self.lag = _Histogram(LAG_BUCKETS)


class _ServiceFigures:
    """What one service's buses reported: events published per event type, and
    the figures of each (event type, handler) pair."""

    __slots__ = ("inbox_skipped", "published", "series")

    def __init__(self) -> None:
        self.published: dict[str, int] = {}
        self.series: dict[tuple[str, str], _Series] = {}
        #: deliveries the inbox skipped, by handler
        self.inbox_skipped: dict[str, int] = {}

    def of(self, event_type: str, handler: str) -> _Series:
        key = (event_type, handler)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series()
        return series


class _Figures(Collector):
    """Every figure reported to one registry, collected on scrape."""

    def __init__(self) -> None:
        #: what each service reported, by service
        self.services: dict[str, _ServiceFigures] = {}
        #: keyed (service, handler)
        self.retry_depth: dict[tuple[str, str], int] = {}
        #: keyed (service, handler, "true" or "false": processed)
        self.dead_depth: dict[tuple[str, str, str], int] = {}
        self.due: int | None = None
        #: the messages a broker holds for each service, by service
        self.transport_lag: dict[str, int] = {}
        #: each outbox table's rows waiting and the oldest's age (seconds), by label
        self.outbox: dict[str, tuple[int, float]] = {}
        #: each circuit breaker's state (``BREAKER_STATES``) and trips, keyed (service, name)
        self.breakers: dict[tuple[str, str], tuple[int, int]] = {}

    def of_service(self, service: str) -> _ServiceFigures:
        figures = self.services.get(service)
        if figures is None:
            figures = self.services[service] = _ServiceFigures()
        return figures

    def describe(self) -> Iterator[Metric]:
        return iter(_Families.new())

    def collect(self) -> Iterator[Metric]:
        families = _Families.new()
        for service, figures in list(self.services.items()):
            for event_type, count in list(figures.published.items()):
                families.published.add_metric([service, event_type], count)
            for (event_type, handler), series in list(figures.series.items()):
                _add_series(families, [service, event_type, handler], series)
            for handler, count in list(figures.inbox_skipped.items()):
                families.inbox_skipped.add_metric([service, handler], count)
        for (service, handler), count in list(self.retry_depth.items()):
            families.retry_depth.add_metric([service, handler], count)
        if self.due is not None:
            families.due.add_metric([], self.due)
        for labels, count in list(self.dead_depth.items()):
            families.dead_depth.add_metric(list(labels), count)
        for service, lag in list(self.transport_lag.items()):
            families.transport_lag.add_metric([service], lag)
        for label, (rows, age) in list(self.outbox.items()):
            families.outbox_depth.add_metric([label], rows)
            families.outbox_age.add_metric([label], age)
        for (service, name), (state, trips) in list(self.breakers.items()):
            families.breaker_state.add_metric([service, name], state)
            families.breaker_trips.add_metric([service, name], trips)
        return iter(families)


def _add_series(families: _Families, labels: list[str], series: _Series) -> None:
    """One (service, event type, handler)'s figures into the scrape's ``families``."""
    if series.calls_ok:
        families.calls.add_metric([*labels, "success"], series.calls_ok)
    if series.calls_failed:
        families.calls.add_metric([*labels, "failure"], series.calls_failed)
    if series.calls_ok or series.calls_failed:
        families.duration.add_metric(labels, *series.duration.cumulative())
    if series.scheduled:
        families.scheduled.add_metric(labels, series.scheduled)
    if series.succeeded:
        families.succeeded.add_metric(labels, series.succeeded)
    for reason, count in list(series.dead.items()):
        families.dead.add_metric([*labels, reason], count)
    if series.reprocessed_ok:
        families.reprocessed.add_metric([*labels, "success"], series.reprocessed_ok)
    if series.reprocessed_failed:
        families.reprocessed.add_metric([*labels, "failure"], series.reprocessed_failed)
    if series.requeued:
        families.requeued.add_metric(labels, series.requeued)
    if any(series.lag.counts):
        families.lag.add_metric(labels, *series.lag.cumulative())


class _Families(NamedTuple):
    """The metric families of one scrape, empty until filled."""

    published: CounterMetricFamily
    calls: CounterMetricFamily
    duration: HistogramMetricFamily
    scheduled: CounterMetricFamily
    succeeded: CounterMetricFamily
    dead: CounterMetricFamily
    reprocessed: CounterMetricFamily
    requeued: CounterMetricFamily
    lag: HistogramMetricFamily
    retry_depth: GaugeMetricFamily
    due: GaugeMetricFamily
    dead_depth: GaugeMetricFamily
    transport_lag: GaugeMetricFamily
    outbox_depth: GaugeMetricFamily
    outbox_age: GaugeMetricFamily
    inbox_skipped: CounterMetricFamily
    breaker_state: GaugeMetricFamily
    breaker_trips: CounterMetricFamily

    @classmethod
    def new(cls) -> _Families:
        return cls(
            CounterMetricFamily(
                "retrybus_events_published",
                "Events published, by the publishing service.",
                labels=["service", "event_type"],
            ),
            CounterMetricFamily(
                "retrybus_handler_calls",
                "Handler calls (first calls, retries, reprocesses) by outcome: success or failure.",
                labels=[*_PAIR, "outcome"],
            ),
            HistogramMetricFamily(
                "retrybus_handler_duration_seconds", "How long handler calls took.", labels=_PAIR
            ),
            CounterMetricFamily(
                "retrybus_retries_scheduled",
                "Failed deliveries stored in the retry queue for another try.",
                labels=_PAIR,
            ),
            CounterMetricFamily(
                "retrybus_retries_succeeded", "Retries that succeeded.", labels=_PAIR
            ),
            CounterMetricFamily(
                "retrybus_dead_lettered",
                "Deliveries moved to the dead letter queue, by the kind of reason.",
                labels=[*_PAIR, "reason"],
            ),
            CounterMetricFamily(
                "retrybus_reprocessed",
                "Dead letters reprocessed, by outcome: success or failure.",
                labels=[*_PAIR, "outcome"],
            ),
            CounterMetricFamily(
                "retrybus_requeued", "Dead letters moved back into the retry queue.", labels=_PAIR
            ),
            HistogramMetricFamily(
                "retrybus_retry_lag_seconds",
                "How late retries started past their next_retry.",
                labels=_PAIR,
            ),
            GaugeMetricFamily(
                "retrybus_retry_queue_depth",
                "Items in the retry queue, per service and handler.",
                labels=["service", "handler"],
            ),
            GaugeMetricFamily(
                "retrybus_retry_queue_due",
                "Retry items already due (the backlog), of every service in the store.",
            ),
            GaugeMetricFamily(
                "retrybus_dead_letter_queue_depth",
                "Dead letters, per service, handler and whether processed.",
                labels=["service", "handler", "processed"],
            ),
            GaugeMetricFamily(
                "retrybus_transport_lag",
                "Messages the broker holds for a service: waiting, or received and not yet acked.",
                labels=["service"],
            ),
            GaugeMetricFamily(
                "retrybus_outbox_depth",
                "Events staged in an application's outbox table, not relayed yet.",
                labels=["outbox"],
            ),
            GaugeMetricFamily(
                "retrybus_outbox_oldest_age_seconds",
                "How long the oldest event staged in an outbox table has waited (0: none).",
                labels=["outbox"],
            ),
            CounterMetricFamily(
                "retrybus_inbox_skipped",
                "Deliveries not run (or inbox.claim blocks skipped): the handler had "
                "succeeded for the event before.",
                labels=["service", "handler"],
            ),
            GaugeMetricFamily(
                "retrybus_breaker_state",
                "A circuit breaker's state: 0 closed, 1 half-open, 2 open, 3 isolated.",
                labels=["service", "breaker"],
            ),
            CounterMetricFamily(
                "retrybus_breaker_trips",
                "How many times a circuit breaker opened (the service's count, shared "
                "through the store: the same in every process).",
                labels=["service", "breaker"],
            ),
        )


class _OneService(Collector):
    """The samples of ``registry`` labelled with ``service``."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            kept = copy.copy(family)
            kept.samples = [
                sample for sample in family.samples if sample.labels.get("service") == self.service
            ]
            yield kept


def _of_service(registry: CollectorRegistry, service: str) -> CollectorRegistry:
    """A registry showing only ``service``'s samples of ``registry`` (for one scrape)."""
    filtered = CollectorRegistry(auto_describe=False)
    filtered.register(_OneService(registry, service))
    return filtered


_FIGURES: weakref.WeakKeyDictionary[CollectorRegistry, _Figures] = weakref.WeakKeyDictionary()


def _figures_of(registry: CollectorRegistry) -> _Figures:
    figures = _FIGURES.get(registry)
    if figures is None:
        figures = _FIGURES[registry] = _Figures()
        registry.register(figures)
    return figures


class PrometheusMetrics:
    """Reports a bus's deliveries as Prometheus metrics in ``registry``
    (default: prometheus-client's global ``REGISTRY``). Several instances on
    one registry share its figures.

    What it counts is labelled with ``service`` (``"default"``; a bus reports
    through ``for_service(bus.service)``, a view of the same figures)."""

    _never_raises = True  # plain arithmetic: the bus calls it unguarded

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"registry must be a prometheus_client.CollectorRegistry, got {registry!r}"
            )
        self.registry: CollectorRegistry = (
            registry if registry is not None else prometheus_client.REGISTRY
        )
        self._figures = _figures_of(self.registry)
        self._count_for(DEFAULT_SERVICE)

    def _count_for(self, service: str) -> None:
        self._service = service
        self._own = self._figures.of_service(service)
        # the figures' own dicts, held here: one attribute lookup less per delivery
        self._published = self._own.published
        self._series = self._own.series

    @property
    def service(self) -> str:
        """The ``service`` label of what this object counts."""
        return self._service

    def for_service(self, service: str) -> PrometheusMetrics:
        """This back end counting for ``service``: a shallow copy that writes into
        the same figures (the same registry), labelled ``service``. The bus asks
        for it with its own service (``EventBus(service=)``)."""
        check_service(service)
        view = copy.copy(self)
        view._count_for(service)
        return view

    # what the bus reports ---------------------------------------------------

    def published(self, event_type: str) -> None:
        published = self._published
        published[event_type] = published.get(event_type, 0) + 1

    def handled(self, event_type: str, handler: str, ok: bool, seconds: float) -> None:
        series = self._series.get((event_type, handler)) or self._own.of(event_type, handler)
        if ok:
            series.calls_ok += 1
        else:
            series.calls_failed += 1
        duration = series.duration
        duration.counts[bisect_left(duration.bounds, seconds)] += 1
        duration.total += seconds

    def retry_scheduled(self, event_type: str, handler: str) -> None:
        self._own.of(event_type, handler).scheduled += 1

    def retry_succeeded(self, event_type: str, handler: str) -> None:
        self._own.of(event_type, handler).succeeded += 1

    def retry_lag(self, event_type: str, handler: str, seconds: float) -> None:
        self._own.of(event_type, handler).lag.observe(seconds)

    def dead_lettered(self, event_type: str, handler: str, reason: str) -> None:
        dead = self._own.of(event_type, handler).dead
        dead[reason] = dead.get(reason, 0) + 1

    def reprocessed(self, event_type: str, handler: str, ok: bool) -> None:
        series = self._own.of(event_type, handler)
        if ok:
            series.reprocessed_ok += 1
        else:
            series.reprocessed_failed += 1

    def requeued(self, event_type: str, handler: str) -> None:
        self._own.of(event_type, handler).requeued += 1

    def inbox_skipped(self, event_type: str, handler: str) -> None:
        """A delivery to ``handler`` was skipped by the inbox (it succeeded before)."""
        skipped = self._own.inbox_skipped
        skipped[handler] = skipped.get(handler, 0) + 1

    def set_transport_lag(self, service: str, lag: int | None) -> None:
        """Set ``retrybus_transport_lag{service}``, the messages the broker holds
        for ``service``; None (the broker did not say) removes the sample rather
        than leave a stale value. ``ValueError`` naming a bad service or lag."""
        check_service(service)
        if lag is None:
            self._figures.transport_lag.pop(service, None)
            return
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise ValueError(f"a transport lag is a whole number >= 0 or None, got {lag!r}")
        self._figures.transport_lag[service] = lag

    def set_breaker_state(self, service: str, breaker: str, state: str, trips: int) -> None:
        """Set ``retrybus_breaker_state{service,breaker}`` (``state``: ``closed``,
        ``half_open``, ``open`` or ``isolated``) and its trips; ``ValueError``
        naming an unknown state. The bus calls it when a breaker changes."""
        code = BREAKER_STATES.get(state)  # type: ignore[call-overload]
        if code is None:
            raise ValueError(
                f"a breaker state is one of {', '.join(BREAKER_STATES)}, got {state!r}"
            )
        self._figures.breakers[(check_service(service), breaker)] = (code, int(trips))

    async def refresh(self, bus: BusView) -> None:
        """Read the queues' depth from ``bus``'s store into the gauges, per service
        and handler, of every service the store holds. A queue that emptied reads 0.
        A bus with a transport (an ``EventBus`` given one) also sets its service's
        ``retrybus_transport_lag``, asking the broker for at most a second (no
        sample while it does not answer). Each circuit breaker's state and trips
        are read from the store's breaker records, of every service."""
        store = bus.store
        now = bus.clock.now()
        retry_depth, dead_depth = await _service_depths(store, now)
        due = await store.count_due(now)
        figures = self._figures
        # a queue that emptied reads 0 rather than vanishing (a stale value would linger)
        figures.retry_depth = {**dict.fromkeys(figures.retry_depth, 0), **retry_depth}
        figures.dead_depth = {**dict.fromkeys(figures.dead_depth, 0), **dead_depth}
        figures.due = due
        figures.breakers = {
            (b.service, b.name): (BREAKER_STATES[b.state], b.trips)
            for b in await read_breakers(store, now=now)
        }
        transport: Transport | None = getattr(bus, "transport", None)
        if transport is not None:
            service = getattr(bus, "service", self._service)
            self.set_transport_lag(service, await _transport_lag(transport, service))
        outbox: Outbox | None = getattr(bus, "outbox", None)
        if outbox is not None and outbox.label is not None:
            depth = await _outbox_depth(outbox)
            if depth is None:
                figures.outbox.pop(outbox.label, None)
            else:
                figures.outbox[outbox.label] = (depth.rows, depth.age(now))

    # serving ----------------------------------------------------------------

    def exposition(
        self, accept: str | None = None, *, service: str | None = None
    ) -> tuple[bytes, str]:
        """The registry's metrics in Prometheus's text format (or OpenMetrics when
        ``accept``, a request's Accept header, asks for it): ``(body, content_type)``.
        With ``service``, only the samples labelled with that service (each family
        still described; ``ValueError`` naming a name that is not a service name)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        if service is None:
            return encoder(self.registry), content_type
        return encoder(_of_service(self.registry, check_service(service))), content_type

    def serve(self, port: int, host: str = "0.0.0.0") -> tuple[WSGIServer, Thread]:
        """Serve the registry at ``http://host:port/metrics`` from a background
        thread; returns the server (``shutdown()`` stops it) and its thread."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be a number from 0 to 65535, got {port!r}")
        server, thread = prometheus_client.start_http_server(port, host, registry=self.registry)
        return server, thread


async def _transport_lag(transport: Transport, service: str) -> int | None:
    """``transport.lag(service)``; None when the broker fails or takes longer than
    ``TRANSPORT_LAG_TIMEOUT`` (a gauge is not worth failing the refresh for)."""
    try:
        return await asyncio.wait_for(transport.lag(service), TRANSPORT_LAG_TIMEOUT)
    except Exception as exc:  # TransportUnavailable, TimeoutError, a broker's own
        logger.debug("no broker lag of service %s from %s: %r", service, transport.url, exc)
        return None


async def _outbox_depth(outbox: Outbox) -> OutboxDepth | None:
    """``outbox.depth()``; None when its database fails or takes longer than
    ``TRANSPORT_LAG_TIMEOUT``."""
    try:
        return await asyncio.wait_for(outbox.depth(), TRANSPORT_LAG_TIMEOUT)
    except Exception as exc:  # StoreUnavailable, TimeoutError
        logger.debug("no outbox depth from %s: %r", outbox.label, exc)
        return None


_Key = TypeVar("_Key")
_RetryDepths = dict[tuple[str, str], int]
_DeadDepths = dict[tuple[str, str, str], int]


async def _service_depths(store: Store, now: datetime) -> tuple[_RetryDepths, _DeadDepths]:
    """Each (service, handler)'s queue depths, from ``service_loads``: at most the
    ``_MAX_DEPTH_SERIES`` largest of the retry queue, of the unprocessed dead
    letters and of the processed ones."""
    loads = await store.service_loads(now)
    retry_depth = _largest(
        ((load.service, load.handler_name), load.queued) for load in loads if load.queued
    )
    dead_depth = {
        **_largest(
            ((load.service, load.handler_name, "false"), load.dead_unprocessed)
            for load in loads
            if load.dead_unprocessed
        ),
        **_largest(
            ((load.service, load.handler_name, "true"), load.dead_processed)
            for load in loads
            if load.dead_processed
        ),
    }
    return retry_depth, dead_depth


def _largest(counts: Iterable[tuple[_Key, int]]) -> dict[_Key, int]:
    """The ``_MAX_DEPTH_SERIES`` largest ``counts`` (equal ones in the order given)."""
    ranked = sorted(counts, key=lambda pair: -pair[1])
    return dict(ranked[:_MAX_DEPTH_SERIES])
