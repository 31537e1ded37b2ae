"""Producers and consumers of each event type, version beside version
(``Services.versions``): what the services page and ``retrybus services`` show,
so that a consumer deployed behind its producers is seen before its deliveries
wait in the dead letter queue for the deploy that knows their version.

A service produces the types its control record ``event-types:<service>`` lists
(``EventBus.register`` writes it). A stored subscription consumes a type its
patterns match (or one of the type's aliases), at the version its
``details["versions"]`` records for it; a handler that registered no version of
the type reads what it gets as it is (unversioned): one subscribed to the type
by name is taken as reading version 1, one matching it by a glob (an audit
log's ``*``) is never counted behind.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._services import StoredSubscription

__all__ = ["TypeVersions", "type_versions"]


@dataclass(frozen=True, slots=True)
class TypeVersions:
    """One event type: the version each service registers it at (``producers``,
    by service), the version each stored subscription that receives it reads
    (``consumers``, by ``service/handler``; None: unversioned, it reads what it
    gets as it is), and the consumers ``behind`` the newest producer (sorted)."""

    type: str
    producers: Mapping[str, int] = field(default_factory=dict)
    consumers: Mapping[str, int | None] = field(default_factory=dict)
    behind: tuple[str, ...] = ()

    @property
    def newest(self) -> int | None:
        """The highest version a producer registers (None: no service registers it)."""
        return max(self.producers.values(), default=None)

    def involves(self, service: str) -> bool:
        """Whether ``service`` produces this type or one of its handlers consumes it."""
        prefix = f"{service}/"
        return service in self.producers or any(c.startswith(prefix) for c in self.consumers)

    def to_dict(self) -> dict[str, Any]:
        """This type as a JSON-ready dict."""
        return {
            "type": self.type,
            "newest": self.newest,
            "producers": dict(self.producers),
            "consumers": dict(self.consumers),
            "behind": list(self.behind),
        }


def _version(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _consumed_version(subscription: StoredSubscription, names: Iterable[str]) -> int | None:
    """The version ``subscription`` records for the type known by ``names`` (its
    name first, then its aliases); None: it records none."""
    versions = subscription.details.get("versions")
    if not isinstance(versions, Mapping):
        return None
    for name in names:
        found = _version(versions.get(name))
        if found is not None:
            return found
    return None


def type_versions(
    event_types: Mapping[str, Iterable[Mapping[str, Any]]],
    subscriptions: Iterable[StoredSubscription],
) -> list[TypeVersions]:
    """Every type a service registers or a subscription records a version of, by
    name: ``event_types`` is what ``Services.event_types`` gives (each service's
    types as ``EventType.describe`` gives them), ``subscriptions`` the stored
    ones (the removed are left out)."""
    producers: dict[str, dict[str, int]] = {}
    aliases: dict[str, set[str]] = {}
    for service, described in event_types.items():
        for entry in described:
            name, version = entry.get("type"), _version(entry.get("version"))
            if not isinstance(name, str) or version is None:
                continue
            producers.setdefault(name, {})[service] = version
            names = aliases.setdefault(name, set())
            names.update(a for a in entry.get("aliases") or () if isinstance(a, str))
    live = [s for s in subscriptions if not s.removed]
    canonical = {alias: name for name, known in aliases.items() for alias in known}
    recorded = {
        canonical.get(name, name)
        for s in live
        if isinstance(s.details.get("versions"), Mapping)
        for name in s.details["versions"]
        if isinstance(name, str)
    }
    found = []
    for name in sorted(producers.keys() | recorded):
        known_as = (name, *sorted(aliases.get(name, ())))
        consumers: dict[str, int | None] = {}
        named: set[str] = set()  # consumers whose patterns name the type (no glob)
        for s in live:
            if any(fnmatch.fnmatchcase(n, p) for n in known_as for p in s.patterns):
                key = f"{s.service}/{s.handler_name}"
                consumers[key] = _consumed_version(s, known_as)
                if any(n in s.patterns for n in known_as):
                    named.add(key)
        newest = max(producers.get(name, {}).values(), default=None)
        behind = tuple(
            sorted(
                key
                for key, version in consumers.items()
                if newest is not None
                and (version < newest if version is not None else key in named and newest > 1)
            )
        )
        found.append(
            TypeVersions(
                name,
                dict(sorted(producers.get(name, {}).items())),
                dict(sorted(consumers.items())),
                behind,
            )
        )
    return found
