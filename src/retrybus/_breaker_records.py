"""Circuit breakers as the store holds them, for those who have a store URL and
no app: the CLI (``retrybus breakers``), the dashboard and the metrics.

Each breaker's control record (``breaker:<service>:<name>``) holds its shared
status (``BreakerStatus.to_json``) and, beside it, the breaker's settings
(``settings``: the ``CircuitBreaker`` fields) and the handlers behind it
(``handlers``), written by every process of this release that writes the
record and when a bus registers (``bus.register()``, a worker's start), so
that a breaker that never tripped is listed too. Records of an older release
have no settings: they are listed, isolated and reset all the same, but a
reset needs the breaker's ``open_for`` and asks for a process of this release
to register it first.

``isolate_breaker`` and ``reset_breaker`` apply the same transitions as
``bus.breakers`` (``BreakerStatus.isolate`` and ``reset``), with
compare-and-set on the record: every process of the service reads the change
at its next refresh (5 s at most by default).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._breaker import BreakerState, BreakerStatus, CircuitBreaker
from ._errors import RetrybusError
from ._stores.base import ControlRecord, Store

__all__ = [
    "BREAKER_STATES",
    "PREFIX",
    "StoredBreaker",
    "UnknownBreaker",
    "breaker_record",
    "find_breaker",
    "isolate_breaker",
    "read_breakers",
    "reset_breaker",
    "settings_from_json",
]

logger = logging.getLogger("retrybus.breakers")

#: the start of every breaker's control record key
PREFIX = "breaker:"
#: each state and the number ``retrybus_breaker_state`` gives it
BREAKER_STATES: Mapping[BreakerState, int] = {
    "closed": 0,
    "half_open": 1,
    "open": 2,
    "isolated": 3,
}
#: compare-and-set attempts before an operator's change is given up
_CAS_TRIES = 8


class UnknownBreaker(RetrybusError, LookupError):
    """No breaker of that name is stored (in that service), or the name is
    stored in several services and no service was given; the message lists
    what is stored."""


def breaker_record(
    status: BreakerStatus, breaker: CircuitBreaker, handlers: Iterable[str]
) -> dict[str, Any]:
    """The control record's value: the status, the settings and the handlers."""
    return {
        **status.to_json(),
        "settings": dataclasses.asdict(breaker),
        "handlers": sorted(set(handlers)),
    }


def settings_from_json(value: Any) -> CircuitBreaker | None:
    """The settings a record holds (None: none, as in an older release's record,
    or unreadable ones)."""
    if not isinstance(value, Mapping):
        return None
    names = {field.name for field in dataclasses.fields(CircuitBreaker)}
    try:
        return CircuitBreaker(**{k: v for k, v in value.items() if k in names})
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class StoredBreaker:
    """One breaker as its control record says, read at ``read_at``."""

    service: str
    name: str
    #: the state at ``read_at`` (``half_open``: open, and ``half_open_at`` passed)
    state: BreakerState
    status: BreakerStatus
    #: its settings (None: the record was written by an older release)
    settings: CircuitBreaker | None
    handlers: tuple[str, ...]
    read_at: datetime
    #: the record's version (compare-and-set)
    version: int

    @property
    def key(self) -> str:
        """Its control record's key."""
        return f"{PREFIX}{self.service}:{self.name}"

    @property
    def trips(self) -> int:
        """How many times it opened."""
        return self.status.trips

    @property
    def half_open_in(self) -> float | None:
        """Seconds until it half-opens (None: it is not open and waiting to)."""
        status = self.status
        if self.state != "open" or status.half_open_at is None:
            return None
        return max(0.0, (status.half_open_at - self.read_at).total_seconds())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``retrybus breakers --json`` prints."""
        status = self.status
        settings = self.settings
        return {
            "service": self.service,
            "name": self.name,
            "state": self.state,
            "handlers": list(self.handlers),
            "trips": status.trips,
            "open_for": status.open_for,
            "opened_at": _iso(status.opened_at),
            "half_open_at": _iso(status.half_open_at) if self.state == "open" else None,
            "half_open_in": self.half_open_in,
            "reason": status.reason,
            "changed_at": _iso(status.changed_at),
            "settings": None if settings is None else dataclasses.asdict(settings),
            "read_at": self.read_at.isoformat(),
        }


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _parse(record: ControlRecord, now: datetime) -> StoredBreaker:
    """A record read back; ``ValueError`` naming what is wrong."""
    service, sep, name = record.key.removeprefix(PREFIX).rpartition(":")
    if not sep or not service or not name:
        raise ValueError(f"a breaker record's key is breaker:<service>:<name>, got {record.key!r}")
    value = record.value
    status = BreakerStatus.from_json(value)
    handlers = value.get("handlers")
    return StoredBreaker(
        service=service,
        name=name,
        state=status.state_at(now),
        status=status,
        settings=settings_from_json(value.get("settings")),
        handlers=tuple(str(h) for h in handlers) if isinstance(handlers, list) else (),
        read_at=now,
        version=record.version,
    )


async def read_breakers(
    store: Store, service: str | None = None, *, now: datetime
) -> list[StoredBreaker]:
    """Every breaker the store holds (of ``service`` only, when given), by
    service and name, as it is at ``now``. An unreadable record is logged and
    left out."""
    prefix = PREFIX if service is None else f"{PREFIX}{service}:"
    found = []
    for record in await store.list_control(prefix):
        try:
            found.append(_parse(record, now))
        except ValueError as exc:
            logger.warning("breaker record %s left out: %s", record.key, exc)
    return sorted(found, key=lambda b: (b.service, b.name))


async def find_breaker(
    store: Store, name: str, service: str | None = None, *, now: datetime
) -> StoredBreaker:
    """Breaker ``name`` (of ``service``; None: of the one service that has it).
    ``UnknownBreaker`` when none is stored, or several services have one of
    that name and ``service`` is None."""
    stored = await read_breakers(store, service, now=now)
    matches = [b for b in stored if b.name == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        services = ", ".join(b.service for b in matches)
        raise UnknownBreaker(
            f"breaker {name!r} is in several services ({services}): say which service"
        )
    where = f"service {service!r}" if service is not None else "any service"
    known = ", ".join(f"{b.service}/{b.name}" for b in stored) or "none"
    raise UnknownBreaker(f"no breaker {name!r} is stored for {where} (breakers: {known})")


async def isolate_breaker(
    store: Store, name: str, service: str | None = None, *, now: datetime, actor: str
) -> StoredBreaker:
    """Hold breaker ``name`` open until it is reset, in every process of its
    service (as ``bus.breakers.isolate``); returns it as written."""
    return await _apply(
        store, name, service, now, lambda found: found.status.isolate(now, f"isolated by {actor}")
    )


async def reset_breaker(
    store: Store, name: str, service: str | None = None, *, now: datetime, actor: str
) -> StoredBreaker:
    """Close breaker ``name`` now, its open period back to its ``open_for``
    setting, in every process of its service (as ``bus.breakers.reset``).
    ``UnknownBreaker`` also when its record has no settings (an older
    release's): start a worker of this release, or reset it from the app."""

    def reset(found: StoredBreaker) -> BreakerStatus:
        if found.settings is None:
            raise UnknownBreaker(
                f"breaker {found.service}/{found.name}'s record has no settings (an older "
                "release wrote it): reset it from the app (bus.breakers.reset), or once a "
                "worker of this release has registered it"
            )
        return found.status.reset(now, found.settings, f"reset by {actor}")

    return await _apply(store, name, service, now, reset)


async def _apply(
    store: Store,
    name: str,
    service: str | None,
    now: datetime,
    change: Callable[[StoredBreaker], BreakerStatus],
) -> StoredBreaker:
    """Write ``change`` of the breaker's status with compare-and-set, keeping
    the rest of its record; read it again and retry on a lost race."""
    key = (await find_breaker(store, name, service, now=now)).key
    for _ in range(_CAS_TRIES):
        record = await store.get_control(key)
        if record is None:  # deleted meanwhile
            raise UnknownBreaker(f"breaker {name!r} is no longer stored ({key} was deleted)")
        found = _parse(record, now)
        value = {**record.value, **change(found).to_json()}
        version = await store.put_control(key, value, version=record.version)
        if version is not None:
            return _parse(ControlRecord(key, version, value), now)
    raise RetrybusError(
        f"breaker {name!r} changed {_CAS_TRIES} times while it was being written: try again"
    )
