"""``retrybus services``' "event types" section (Rich): each type's producers and
consumers, version beside version, the consumers behind their producers flagged."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.text import Text

from .._versions_view import TypeVersions
from .views import Column, FittedTable

__all__ = ["event_types_view"]


def _producers(found: TypeVersions) -> str:
    if not found.producers:
        return "none registers it"
    return ", ".join(f"{service} v{version}" for service, version in found.producers.items())


def _consumers(found: TypeVersions) -> str:
    if not found.consumers:
        return "none"
    cells = []
    for key, version in found.consumers.items():
        cell = f"{key} {'unversioned' if version is None else f'v{version}'}"
        if key in found.behind:
            cell += f" (BEHIND v{found.newest})"
        cells.append(cell)
    return ", ".join(cells)


def event_types_view(found: Sequence[TypeVersions]) -> Group:
    """The event types table, and a warning line naming how many consumers are
    behind the newest producer of a type they receive, when any is."""
    columns: list[Column[TypeVersions]] = [
        Column("type", lambda t: t.type, style="cyan"),
        Column("producers", _producers, wraps_to=12),
        Column("consumers", _consumers, wraps_to=16),
    ]
    caption = (
        "producers: the services registering the type; consumers: the stored "
        "subscriptions receiving it (unversioned: registered no version, reads it as it is)"
    )
    parts: list[Text | FittedTable] = [
        Text(),
        FittedTable("event types", columns, found, caption=caption),
    ]
    behind = sum(len(t.behind) for t in found)
    if behind:
        parts.append(
            Text(
                f"WARNING {behind} consumer{'' if behind == 1 else 's'} behind the newest "
                "producer of a type: a consumer that registered the type dead-letters the "
                "newer versions (unknown version) until deployed with them",
                style="bold yellow",
            )
        )
    return Group(*parts)
