"""The services sharing the bus's store, as people look at and act on them:
``bus.services``."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import SubscriptionInUse, UnknownSubscription
from ._event import check_text
from ._event_types import TYPES_CONTROL_PREFIX
from ._records import DeadLetterItem
from ._routes import subscriptions_changed
from ._services import (
    HandlerLoad,
    ServiceSummary,
    StoredSubscription,
    WorkerBeat,
    check_service,
    summarize_services,
)
from ._versions_view import TypeVersions, type_versions

if TYPE_CHECKING:
    from ._core import BusCore
    from ._transports.base import Transport

__all__ = ["ServiceRemoval", "Services"]

logger = logging.getLogger("retrybus")

#: records one store call of a sweep moves to the dead letter queue
SWEEP_BATCH = 500
#: seconds ``Services.overview`` waits for the broker's lag of each service
LAG_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class ServiceRemoval:
    """What ``Services.remove`` did: the handlers of ``service`` whose subscription
    it removed (sorted; none when they were removed before), how many of their
    deliveries it dead-lettered, and how many more wait for a lease to run out
    (``leased``: a handler runs them now; the workers' sweep dead-letters those
    that are still there once it has)."""

    service: str
    removed: tuple[str, ...]
    dead_lettered: int
    leased: int = 0


class Services:
    """The services that share the bus's store: their stored subscriptions, their
    workers' heartbeats, what waits for each of their handlers; and the removal
    of a subscription.

    >>> await bus.services.remove("billing", "SendInvoice", actor="alice")
    """

    def __init__(self, core: BusCore) -> None:
        self._core = core

    async def list(
        self, service: str | None = None, *, removed: bool = False
    ) -> builtins.list[StoredSubscription]:
        """The stored subscriptions (of ``service``; None: of every service), by
        service then handler name; with ``removed``, the tombstones of removed
        ones too (kept for a day)."""
        if service is not None:
            check_service(service)
        return await self._core.store.list_subscriptions(service, removed=removed)

    async def workers(self, service: str | None = None) -> builtins.list[WorkerBeat]:
        """The workers' last heartbeats (of ``service``; None: of every service), by
        service then name, live or not (``WorkerBeat.live_at``): a worker that
        stopped deletes its own; one that died is deleted a day after its last."""
        if service is not None:
            check_service(service)
        return await self._core.store.list_workers(service)

    async def loads(self) -> builtins.list[HandlerLoad]:
        """What waits for each handler of each service, now (``HandlerLoad``)."""
        return await self._core.store.service_loads(self._core.clock.now())

    async def overview(self, service: str | None = None) -> builtins.list[ServiceSummary]:
        """Every service sharing the store (or only ``service``), by name: its
        handlers with their subscriptions and what waits for each, its live
        workers, a ``warning`` when work waits and no worker of it is live, and,
        on a bus with a transport, its ``broker_lag`` (None when the broker does
        not answer within a second). What ``retrybus services`` and the
        dashboard's Services page show."""
        if service is not None:
            check_service(service)
        store = self._core.store
        now = self._core.clock.now()
        subscriptions = await store.list_subscriptions(service, removed=True)
        beats = await store.list_workers(service)
        loads = [
            load
            for load in await store.service_loads(now)
            if service is None or load.service == service
        ]
        summaries = summarize_services(subscriptions, beats, loads, now)
        transport = self._core.transport
        if transport is None or not summaries:
            return summaries
        lags = await asyncio.gather(*(_lag(transport, s.service) for s in summaries))
        return [
            dataclasses.replace(summary, broker_lag=lag)
            for summary, lag in zip(summaries, lags, strict=True)
        ]

    async def record_event_types(self) -> None:
        """Store the event types this bus registers (its service's control record
        ``event-types:<service>``), when they differ from what is stored: the
        versions this service publishes, which the services page compares its
        consumers' against. Nothing is stored for a bus with none."""
        core = self._core
        described = core.types.describe()
        if not described:
            return
        key = TYPES_CONTROL_PREFIX + core.service
        stored = await core.store.get_control(key)
        if stored is not None and stored.value.get("types") == described:
            return
        value = {
            "service": core.service,
            "types": described,
            "updated_at": core.clock.now().isoformat(),
        }
        await core.store.put_control(key, value, version=0 if stored is None else stored.version)

    async def event_types(self) -> dict[str, builtins.list[dict[str, Any]]]:
        """The event types each service registers (``record_event_types``), by
        service: each as ``EventType.describe`` gives it."""
        records = await self._core.store.list_control(TYPES_CONTROL_PREFIX)
        return {
            record.key.removeprefix(TYPES_CONTROL_PREFIX): list(record.value.get("types", []))
            for record in sorted(records, key=lambda r: r.key)
        }

    async def versions(self, service: str | None = None) -> builtins.list[TypeVersions]:
        """Each event type with its producers (the services registering it, each at
        its version: ``event_types``) and its consumers (the stored subscriptions
        receiving it, each at the version it reads, None when it registered none),
        and the consumers behind the newest producer (``TypeVersions``); with
        ``service``, the types it produces or consumes. What the services page and
        ``retrybus services`` show under "Event types"."""
        if service is not None:
            check_service(service)
        found = type_versions(await self.event_types(), await self.list())
        return found if service is None else [t for t in found if t.involves(service)]

    async def remove(
        self, service: str, handler: str | None = None, *, actor: str, force: bool = False
    ) -> ServiceRemoval:
        """Remove the subscription of ``service``'s ``handler`` (None: of all its
        handlers), ``actor`` saying by whom: publishers route no more events to
        it (this process's at once, others' within their ``route_refresh``), and
        what waited for it is dead-lettered, with the reason ``subscription
        removed: SERVICE/HANDLER (by ACTOR)``: now what no lease holds, what a
        handler runs once its lease has run out (the workers' sweep, which also
        takes what a publisher whose routes were not yet read again records
        meanwhile). Asked again for a subscription removed already, it only
        dead-letters what waits for it.

        Refused (``SubscriptionInUse``, naming the workers) while a live worker's
        heartbeat lists the handler: it would store the subscription again when it
        restarts. ``force`` removes it anyway. Raises ``UnknownSubscription`` when
        the store keeps no subscription of it, live or removed."""
        check_service(service)
        if handler is not None and (not isinstance(handler, str) or not handler):
            raise ValueError(f"handler must be a non-empty string or None, got {handler!r}")
        if not isinstance(actor, str) or not actor:
            raise ValueError(f"actor must be a non-empty string, got {actor!r}")
        check_text(actor, "actor")
        store = self._core.store
        stored = [
            subscription
            for subscription in await store.list_subscriptions(service, removed=True)
            if handler is None or subscription.handler_name == handler
        ]
        if not stored:
            raise UnknownSubscription(service, handler)
        live = {s.handler_name for s in stored if not s.removed}
        if live and not force and (refused := await self.in_use(service, live)) is not None:
            raise refused
        removed = (
            await store.remove_subscriptions(service, live, now=self._core.clock.now(), actor=actor)
            if live
            else []
        )
        if removed:
            subscriptions_changed(store)
            logger.warning(
                "removed the subscription of %s, by %s%s",
                ", ".join(f"{service}/{name}" for name in removed),
                actor,
                " (forced)" if force else "",
            )
        names = {s.handler_name for s in stored}
        dead_lettered = 0
        while True:
            moved = await self._sweep(SWEEP_BATCH)
            dead_lettered += sum(
                1 for item in moved if item.service == service and item.handler_name in names
            )
            if len(moved) < SWEEP_BATCH:
                break
        leased = sum(
            load.leased
            for load in await store.service_loads(self._core.clock.now())
            if load.service == service and load.handler_name in names
        )
        return ServiceRemoval(service, tuple(removed), dead_lettered, leased)

    async def in_use(self, service: str, handlers: Collection[str]) -> SubscriptionInUse | None:
        """What ``remove`` of ``service``'s ``handlers`` meets now without
        ``force``: a ``SubscriptionInUse`` naming the handlers that live workers
        of ``service`` run and those workers; None when no live worker runs any."""
        check_service(service)
        now = self._core.clock.now()
        wanted = set(handlers)
        running = [
            beat
            for beat in await self._core.store.list_workers(service)
            if beat.live_at(now) and not wanted.isdisjoint(beat.handlers)
        ]
        if not running:
            return None
        return SubscriptionInUse(
            service,
            sorted({name for beat in running for name in beat.handlers} & wanted),
            [f"{beat.name} (pid {beat.pid} on {beat.host})" for beat in running],
        )

    async def sweep(self, *, limit: int = SWEEP_BATCH) -> int:
        """Move to the dead letter queue up to ``limit`` deliveries that wait for
        removed subscriptions (of any service) and that no lease holds, announced
        as every dead letter is (``on_dead_letter`` hooks, metrics, the log);
        returns how many moved. Workers do it every few seconds."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        return len(await self._sweep(limit))

    async def _sweep(self, limit: int) -> builtins.list[DeadLetterItem]:
        core = self._core
        moved = await core.store.dead_letter_unsubscribed(now=core.clock.now(), limit=limit)
        await core.ledger.dead_lettered(moved)
        return moved


async def _lag(transport: Transport, service: str) -> int | None:
    """``transport.lag(service)``, or None when the broker fails or takes longer
    than ``LAG_TIMEOUT`` (a page of services is not worth failing for it)."""
    try:
        return await asyncio.wait_for(transport.lag(service), LAG_TIMEOUT)
    except Exception as exc:  # TransportUnavailable, TimeoutError, a broker's own
        logger.debug("no broker lag of service %s from %s: %r", service, transport.url, exc)
        return None
