"""The Redis store's key layout upgrades.

The key layout has a version (``P:schema``; none recorded is layout 1).

- Layout 1 indexed dead letters by event type, handler and processed only; layout 2
  added the reason, failure group and event id indexes. Dead letters written by
  layout 1 get them (the script ``backfill_dead``).
- Layout 3 keeps a due set per handler (``P:retry:due:H``: the handler's items by
  the time each can be claimed from, which claims and ``next_due`` read instead of
  one set of every handler's items), the handler of each item
  (``P:retry:handler_of``), the handlers that have items (``P:retry:handlers``) and
  each item's claims count (``P:retry:claim_count``). Items of layout 2 (in the one
  set of unleased items, ``P:retry:ready``, or leased) go into their handler's due
  set (the script ``index_due``); their claims count is 0, as none is stored.

Each runs on first use (``connect()`` or the first dead letter query), ``CHUNK``
ids at a time, and is safe in several processes at once: a batch skips what is
already done. Items a process of an older layout still makes due land in
``P:retry:ready``, which every claim looks at and empties (see ``scripts.lua``).
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
LAYOUT_VERSION = 3

Call = Callable[..., Awaitable[Any]]


async def upgrade_layout(command: Call, run: Call, key: Callable[[str], str]) -> None:
    """Bring the key layout up to ``LAYOUT_VERSION``: ``command`` runs a Redis
    command, ``run`` a script of ``scripts.lua``, ``key`` names a key of the store."""
    version = await command("GET", key("schema"))
    found = 1 if version is None else int(version)
    if found >= LAYOUT_VERSION:
        return
    if found < 2:
        await _backfill_dead(command, run, key)
    if found < 3:
        await _index_due(command, run, key)
    await command("SET", key("schema"), LAYOUT_VERSION)


async def _backfill_dead(command: Call, run: Call, key: Callable[[str], str]) -> None:
    """Layout 2: the missing dead letter index fields come from each dead letter's
    record, ``CHUNK`` at a time (HSCAN of ``P:dead:index``); each batch re-indexes
    only the entries still as read."""
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


async def _index_due(command: Call, run: Call, key: Callable[[str], str]) -> None:
    """Layout 3: every item into its handler's due set, ``CHUNK`` ids at a time
    (ZSCAN of ``P:retry:next``, which holds every item); the script skips items
    already in one."""
    cursor: Any = 0
    while True:
        cursor, flat = await command("ZSCAN", key("retry:next"), cursor, "COUNT", CHUNK)
        # redis-py gives (member, score) pairs; a plain reply alternates them
        ids = (
            [entry[0] for entry in flat]
            if flat and isinstance(flat[0], tuple | list)
            else flat[::2]
        )
        if ids:
            await run("index_due", *ids)
        if int(cursor) == 0:
            break
