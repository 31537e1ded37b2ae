"""Services: named groups of handlers sharing one store (issue 12).

A bus belongs to one service (``EventBus(store, service="billing")``, ``"default"``
unless named). Records carry their service's name; the store keeps each
service's subscriptions (``StoredSubscription``), its workers' heartbeats
(``WorkerBeat``) and reports the load of each of its handlers (``HandlerLoad``).

``"default"`` is the layout of the stores before services: a default-service
record keeps its id, its keys and its failure group, and a record stored before
reads back as one of the default service.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeGuard

__all__ = [
    "DEFAULT_SERVICE",
    "UNSUBSCRIBED",
    "HandlerLoad",
    "HandlerSummary",
    "Registration",
    "ServiceSummary",
    "StoredSubscription",
    "SubscriptionChanges",
    "WorkerBeat",
    "check_service",
    "check_subscriptions",
    "compare_subscriptions",
    "is_service_name",
    "summarize_services",
    "unsubscribed_reason",
]

#: the service of a bus that names none, and of every record stored before services
DEFAULT_SERVICE = "default"

#: what a service name may be: it appears in URLs, Prometheus labels, Redis keys
#: and command lines (and never holds ``/``, which joins it to a handler's name)
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: the start of the reason of a delivery dead-lettered because its subscription
#: was removed (``unsubscribed_reason``)
UNSUBSCRIBED = "subscription removed: "


def is_service_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a service name (1 to 64 letters, digits, ``.``, ``_`` or
    ``-``, the first a letter or a digit)."""
    return isinstance(name, str) and _SERVICE_NAME.fullmatch(name) is not None


def check_service(name: object) -> str:
    """``name`` unchanged if it is a service name (``is_service_name``); else
    ``ValueError`` naming it."""
    if not isinstance(name, str) or _SERVICE_NAME.fullmatch(name) is None:
        raise ValueError(
            "a service name is 1 to 64 letters, digits, '.', '_' or '-', starting with "
            f"a letter or a digit: got {name!r}"
        )
    return name


def check_subscriptions(service: str, subscriptions: Sequence[StoredSubscription]) -> set[str]:
    """The handlers ``subscriptions`` name, once each and all of ``service``
    (what ``Store.put_subscriptions`` takes); else ``ValueError`` naming the odd one."""
    check_service(service)
    named: set[str] = set()
    for terms in subscriptions:
        if terms.service != service:
            raise ValueError(
                f"subscription {terms.service}/{terms.handler_name} is not of service {service!r}"
            )
        if terms.handler_name in named:
            raise ValueError(f"handler {terms.handler_name!r} is named twice")
        named.add(terms.handler_name)
    return named


def unsubscribed_reason(service: str, handler_name: str, actor: str) -> str:
    """The reason of a delivery dead-lettered because ``actor`` removed the
    subscription of ``handler_name`` in ``service``."""
    return f"{UNSUBSCRIBED}{service}/{handler_name} (by {actor})"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSubscription:
    """One handler of one service as the store keeps it: what it subscribes to
    (``patterns``), its retry policy in words (``policy``, the policy's ``repr``)
    and its ``max_retries``, which a publisher of another service copies onto
    the pending records it writes for it, and its ``handler_timeout`` (seconds;
    None: none). ``details`` is a JSON object kept for later use.

    The store sets the rest: ``registered_at`` (when the handler was added, or
    came back after a removal), ``updated_at`` (its last change), the tombstone
    of a removal (``removed_at``, and ``removed_by``, who removed it: a person,
    or a ``register(prune=True)``) and ``revision``, the store-wide revision of
    the write that last changed it. ``put_subscriptions`` reads only the terms
    (the service, the handler's name, its patterns, policy, max_retries,
    handler_timeout and details) of what it is given.
    """

    service: str
    handler_name: str
    patterns: tuple[str, ...]
    policy: str
    max_retries: int
    handler_timeout: float | None = None
    registered_at: datetime
    updated_at: datetime
    removed_at: datetime | None = None
    removed_by: str | None = None
    revision: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_service(self.service)
        if not isinstance(self.handler_name, str) or not self.handler_name:
            raise ValueError(f"handler_name must be a non-empty string, got {self.handler_name!r}")
        if not isinstance(self.patterns, tuple) or not all(
            isinstance(pattern, str) and pattern for pattern in self.patterns
        ):
            raise ValueError(
                f"patterns must be a tuple of non-empty strings, got {self.patterns!r}"
            )

    @property
    def removed(self) -> bool:
        """A tombstone: the subscription was removed (``removed_at``)."""
        return self.removed_at is not None

    @property
    def key(self) -> tuple[str, str]:
        """``(service, handler_name)``: what names a subscription in a store."""
        return (self.service, self.handler_name)

    def same_terms(self, other: StoredSubscription) -> bool:
        """Whether ``other`` subscribes the same handler of the same service to the
        same patterns with the same policy, max_retries, timeout and details
        (times, tombstone and revision aside)."""
        return (
            self.service == other.service
            and self.handler_name == other.handler_name
            and self.patterns == other.patterns
            and self.policy == other.policy
            and self.max_retries == other.max_retries
            and self.handler_timeout == other.handler_timeout
            and dict(self.details) == dict(other.details)
        )


@dataclass(frozen=True, slots=True)
class Registration:
    """What ``put_subscriptions`` did, handler names (sorted) in each field:
    ``added`` (new, or back after a removal), ``changed`` (new terms),
    ``removed`` (tombstoned by ``prune``) and ``unchanged``."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    @property
    def wrote(self) -> bool:
        """Whether anything stored changed (and with it the revision)."""
        return bool(self.added or self.changed or self.removed)


@dataclass(frozen=True, slots=True)
class SubscriptionChanges:
    """What registering a service's subscriptions changes in what its store
    keeps (``compare_subscriptions``): the subscriptions to write (``puts``: the
    terms, with the ``registered_at`` to keep, None for a new registration, which
    is registered now), the handlers whose stored subscription a ``prune``
    removes, and the ``Registration`` that ``put_subscriptions`` returns."""

    puts: tuple[tuple[StoredSubscription, datetime | None], ...]
    removed: tuple[str, ...]
    registration: Registration

    @property
    def writes(self) -> bool:
        """Whether anything is to be written (and the revision to move)."""
        return bool(self.puts or self.removed)


def compare_subscriptions(
    stored: Mapping[str, StoredSubscription],
    subscriptions: Sequence[StoredSubscription],
    *,
    prune: bool,
) -> SubscriptionChanges:
    """What putting ``subscriptions`` (of one service, checked by
    ``check_subscriptions``) over the service's ``stored`` ones (by handler name,
    tombstones included) changes: new ones, and ones back after a removal, are
    added; ones with other terms changed (their ``registered_at`` kept); with
    ``prune``, the stored live ones not among them removed."""
    puts: list[tuple[StoredSubscription, datetime | None]] = []
    added: list[str] = []
    changed: list[str] = []
    unchanged: list[str] = []
    for terms in subscriptions:
        current = stored.get(terms.handler_name)
        if current is None or current.removed:
            puts.append((terms, None))
            added.append(terms.handler_name)
        elif not current.same_terms(terms):
            puts.append((terms, current.registered_at))
            changed.append(terms.handler_name)
        else:
            unchanged.append(terms.handler_name)
    named = {terms.handler_name for terms in subscriptions}
    removed = sorted(
        name
        for name, current in stored.items()
        if prune and not current.removed and name not in named
    )
    return SubscriptionChanges(
        tuple(puts),
        tuple(removed),
        Registration(
            added=tuple(sorted(added)),
            changed=tuple(sorted(changed)),
            removed=tuple(removed),
            unchanged=tuple(sorted(unchanged)),
        ),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerBeat:
    """A worker's heartbeat, one per worker ``name``: its ``service``, where it runs
    (``host``, ``pid``), when it started and was last seen, the ``interval`` of its
    beats (seconds), its ``lanes`` (how many deliveries it runs at once) and how
    many are busy, the ``handlers`` it runs and the retrybus ``version``."""

    name: str
    service: str
    host: str
    pid: int
    started_at: datetime
    last_seen: datetime
    interval: float
    lanes: int
    lanes_busy: int = 0
    handlers: tuple[str, ...] = ()
    version: str = ""

    def __post_init__(self) -> None:
        check_service(self.service)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a worker's name must be a non-empty string, got {self.name!r}")

    def live_at(self, now: datetime) -> bool:
        """Whether the worker counts as live at ``now``: seen within three intervals."""
        return (now - self.last_seen).total_seconds() <= 3 * self.interval


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerLoad:
    """What waits for one handler of one service: its retry queue records of each
    kind (``RetryKind``: ``pending``, ``scheduled`` and ``retrying``, together all
    its records), how many of them a live lease holds (``leased``, a worker or a
    publisher running them), its dead letters (``dead_unprocessed``,
    ``dead_processed``) and when its oldest pending delivery fell due
    (``oldest_pending_due``; None: none is pending)."""

    service: str
    handler_name: str
    pending: int = 0
    scheduled: int = 0
    retrying: int = 0
    leased: int = 0
    dead_unprocessed: int = 0
    dead_processed: int = 0
    oldest_pending_due: datetime | None = None

    @property
    def queued(self) -> int:
        """Its records in the retry queue, all kinds."""
        return self.pending + self.scheduled + self.retrying


@dataclass(frozen=True, slots=True)
class HandlerSummary:
    """One handler of a service as ``Services.overview`` shows it: its stored
    ``subscription`` (None: records wait for a handler the store keeps no
    subscription of, e.g. written before services) and what waits for it
    (``load``)."""

    handler_name: str
    subscription: StoredSubscription | None
    load: HandlerLoad

    @property
    def removed(self) -> bool:
        """Its subscription was removed (records may still wait: leased ones)."""
        return self.subscription is not None and self.subscription.removed

    def oldest_pending_age(self, now: datetime) -> float | None:
        """Seconds since its oldest pending delivery fell due (None: none pending)."""
        due = self.load.oldest_pending_due
        return None if due is None else max(0.0, (now - due).total_seconds())


@dataclass(frozen=True, slots=True)
class ServiceSummary:
    """One service sharing the store, as ``Services.overview`` shows it at ``at``:
    its handlers (by name), its live workers (by name), how many of its
    workers' heartbeats are stale (``stale_workers``: not seen for three
    intervals, deleted a day after) and, on a bus with a transport, the messages
    the broker holds for it (``broker_lag``: waiting, or received and not yet
    acked; None without a transport, or when the broker did not say)."""

    service: str
    at: datetime
    handlers: tuple[HandlerSummary, ...]
    workers: tuple[WorkerBeat, ...]
    stale_workers: int = 0
    broker_lag: int | None = None

    @property
    def waiting(self) -> int:
        """Deliveries its workers could run now or soon: pending and retrying
        records of all its handlers (scheduled ones aside)."""
        return sum(h.load.pending + h.load.retrying for h in self.handlers)

    @property
    def dead(self) -> int:
        """Its dead letters not yet processed."""
        return sum(h.load.dead_unprocessed for h in self.handlers)

    @property
    def oldest_pending_age(self) -> float | None:
        """Seconds since its oldest pending delivery fell due (None: none)."""
        ages = [a for h in self.handlers if (a := h.oldest_pending_age(self.at)) is not None]
        return max(ages) if ages else None

    @property
    def warning(self) -> str | None:
        """``"no live worker"`` when work waits and no worker of it is live; else None."""
        return "no live worker" if self.waiting and not self.workers else None


def summarize_services(
    subscriptions: Sequence[StoredSubscription],
    beats: Sequence[WorkerBeat],
    loads: Sequence[HandlerLoad],
    now: datetime,
) -> list[ServiceSummary]:
    """Every service named by a subscription, a heartbeat or a load, by name, with
    its handlers (live subscriptions, and removed ones or unknown ones that still
    have records) and its workers: what ``Services.overview`` returns."""
    subs = {(s.service, s.handler_name): s for s in subscriptions}
    load_of = {(load.service, load.handler_name): load for load in loads}
    services = (
        {s.service for s in subscriptions}
        | {b.service for b in beats}
        | {load.service for load in loads}
    )
    summaries = []
    for service in sorted(services):
        names = {h for (s, h), sub in subs.items() if s == service and not sub.removed} | {
            h
            for (s, h), load in load_of.items()
            if s == service and (load.queued or load.dead_unprocessed or load.dead_processed)
        }
        handlers = tuple(
            HandlerSummary(
                name,
                subs.get((service, name)),
                load_of.get((service, name)) or HandlerLoad(service=service, handler_name=name),
            )
            for name in sorted(names)
        )
        own = sorted((b for b in beats if b.service == service), key=lambda b: b.name)
        live = tuple(b for b in own if b.live_at(now))
        summaries.append(ServiceSummary(service, now, handlers, live, len(own) - len(live)))
    return summaries
