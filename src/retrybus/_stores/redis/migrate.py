"""The Redis store's key layout upgrade: the back-fill of the dead letter indexes an
older layout lacks.

The key layout has a version (``P:schema``). Layout 1 indexed dead letters by event
type, handler and processed only; layout 2 added the reason, failure group and event
id indexes. Dead letters written by layout 1 get them on first use (``connect()`` or
the first dead letter query), in batches, by the script ``backfill_dead``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from ..._event import compact_json
from .codec import dead_letter
from .common import CHUNK, pairs, text

__all__ = ["LAYOUT_VERSION", "upgrade_layout"]

#: the version of the key layout this package writes
LAYOUT_VERSION = 2

Call = Callable[..., Awaitable[Any]]


async def upgrade_layout(command: Call, run: Call, key: Callable[[str], str]) -> None:
    """Bring the dead letter indexes up to ``LAYOUT_VERSION``: ``command`` runs a Redis
    command, ``run`` a script of ``scripts.lua``, ``key`` names a key of the store.

    Safe to run in several processes at once: each batch re-indexes only the entries
    still as read. The missing fields come from each dead letter's record, ``CHUNK``
    at a time (HSCAN of ``P:dead:index``).
    """
    version = await command("GET", key("schema"))
    if version is not None and int(version) >= LAYOUT_VERSION:
        return
    cursor: Any = 0
    while True:
        cursor, flat = await command("HSCAN", key("dead:index"), cursor, "COUNT", CHUNK)
        old: dict[str, tuple[str, list[Any]]] = {}
        for field, value in pairs(flat):
            index = json.loads(value)
            if len(index) < 7:
                old[text(field)] = (text(value), index)
        if old:
            texts = await command("HMGET", key("dead:items"), *old)
            args: list[Any] = []
            for (item_id, (raw, index)), record in zip(old.items(), texts, strict=True):
                if record is None:
                    continue
                item = dead_letter(item_id, text(record))
                new = [*index[:4], item.reason, item.failure_group, item.event_id]
                args += (item_id, raw, compact_json(new))
            if args:
                await run("backfill_dead", *args)
        if int(cursor) == 0:
            break
    await command("SET", key("schema"), LAYOUT_VERSION)
