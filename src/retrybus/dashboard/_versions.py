"""The data version of a stored item as the detail pages show it: the version it
was stored as and, on a dashboard whose bus registers event types (its
``--app``), the current one with the payload a handler would get (upcast on a
copy) or the reason it would be dead-lettered; and the event type and stored
version of a failure group of version errors."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .._errors import InvalidEventData, UnknownVersion, UpcastFailed, VersionError
from .._event_types import EventTypes, Reading, stored_version
from .._groups import FailureGroup
from .._records import DeadLetterItem, RetryItem
from .._stores import Store
from ._display import Preview, preview

__all__ = ["VERSION_ERROR_TYPES", "GroupVersion", "ItemVersion", "group_versions", "item_version"]

#: the error types (as items record them) of a delivery this code could not read
VERSION_ERROR_TYPES = frozenset(
    f"{kind.__module__}.{kind.__qualname__}"
    for kind in (VersionError, UpcastFailed, UnknownVersion, InvalidEventData)
)


@dataclass(frozen=True, slots=True)
class ItemVersion:
    """An item's ``stored`` data version (1 when it carries none); the ``reading``
    of it by this dashboard's bus (None: the bus registers no event type, so it
    knows no current version); and the upcast payload a handler would get,
    cut to a preview (None unless the reading upcasts it)."""

    stored: int | str
    reading: Reading | None
    upcast: Preview | None


def item_version(types: EventTypes, item: DeadLetterItem | RetryItem) -> ItemVersion:
    """How ``types`` (the dashboard bus's) read the stored ``item``; the item is untouched."""
    event = item.to_event()
    stored = stored_version(event)
    if not types.active:
        return ItemVersion(stored, None, None)
    reading = types.preview(event)
    upcast = preview(_as_json(reading.data)) if reading.upcast and reading.error is None else None
    return ItemVersion(stored, reading, upcast)


def _as_json(data: Any) -> str:
    """``data`` as pretty JSON; what an upcaster returned that JSON cannot hold
    (a datetime, a set) shown by its ``repr``."""
    try:
        return json.dumps(data, indent=2, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):
        return repr(data)


@dataclass(frozen=True, slots=True)
class GroupVersion:
    """The event type and stored version of a failure group's sample dead letter."""

    event_type: str
    stored: int | str


async def group_versions(store: Store, groups: Iterable[FailureGroup]) -> dict[str, GroupVersion]:
    """By group key, the event type and stored version of each group of version
    errors (an upcast that failed, an unknown version, data failing its schema),
    read from its sample: the message says the step, this says what was stored."""
    found: dict[str, GroupVersion] = {}
    for group in groups:
        if group.error_type not in VERSION_ERROR_TYPES:
            continue
        sample = await store.get_dead(group.sample_id)
        if sample is not None:
            found[group.key] = GroupVersion(sample.event_type, stored_version(sample.to_event()))
    return found
