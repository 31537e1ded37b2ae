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
- Layout 4 keeps services (issue 12). A record of another service than the default
  names it (``codec``), and its due set is its lane's (``P:retry:due:S NUL H``),
  which ``P:retry:handler_of`` and ``P:retry:handlers`` hold as they hold a handler
  name: no retry item moves, and a process of layout 3 still running keeps working
  on default-service records (its claims read its handlers' due sets only). Dead
  letters are indexed by service too (an 8th element of the index entry,
  ``P:dead:service:S`` and ``P:dead:values:service``); the subscriptions
  (``P:subs``, ``P:subs:revision``) and the workers' heartbeats (``P:workers``,
  ``P:workers:seen``) are new keys.

The retry queue steps run once, on first use (``connect()``, the first claim or the
first dead letter query), ``CHUNK`` ids at a time, and are safe in several
processes at once: a batch skips what is already done. Items a process of an older
layout still makes due land in ``P:retry:ready``, which every claim looks at and
empties (see ``scripts.lua``).

The dead letter step (``_index_dead``) runs on first use of every store object, not
only once: a process of layout 3 still running writes dead letters without the
service index (and deletes or rewrites some without taking them out of it), and the
next process to start mends that, at a cost that does not grow with the queue:

1. the dead letters created since ``P:dead_indexed_to`` (the newest one's created_at
   when it last looked) less ``_MARGIN`` (for clocks a little apart) are read, and
   those without the service index get it: a layout-3 process writes a dead letter
   at its own ``now``;
2. then two counts are compared (the dead letters, and the members of the
   per-service sets together, each dead letter being in one): fewer members means
   a dead letter outside that window is not indexed (every one is then read, as on
   the upgrade), more means a set keeps dead letters a layout-3 process deleted or
   rewrote (each set is then read, its members checked);
3. ``P:dead_indexed_to`` moves on to the newest dead letter.

The upgrade itself, and ``Store.migrate()`` (``retrybus migrate``), read every dead
letter and every set whatever the counts say: run it once the last process of
layout 3 has stopped, for the case the checks cannot see (a layout-3 process whose
clock is far behind adding a dead letter and deleting another).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from ..._event import compact_json
from .._compatibility import check_later_version, compatible_from
from .codec import dead_letter
from .common import CHUNK, pairs, text

__all__ = ["COMPATIBLE_FROM", "LAYOUT_VERSION", "upgrade_layout"]

#: the version of the key layout this package writes
LAYOUT_VERSION = 4
#: the oldest layout whose code can still use keys of LAYOUT_VERSION
#: (``_stores/_compatibility.py``): a process of layout 3 keeps working on
#: default-service records, and the dead letters it writes are mended (above)
COMPATIBLE_FROM = 3

#: the elements of a dead letter's index entry in this layout (``codec.dead_texts``)
_INDEX_LENGTH = 8
#: seconds before ``P:dead_indexed_to`` from which dead letters are read again on connect
_MARGIN = 300.0

Call = Callable[..., Awaitable[Any]]


async def upgrade_layout(
    command: Call,
    run: Call,
    key: Callable[[str], str],
    *,
    thorough: bool = False,
    name: str = "Redis store",
) -> None:
    """Bring the key layout up to ``LAYOUT_VERSION``: ``command`` runs a Redis
    command, ``run`` a script of ``scripts.lua``, ``key`` names a key of the store.
    The dead letters are indexed by service whatever the version says, after a
    quick check unless ``thorough`` (see the module). Keys of a later layout are
    left as they are when it is compatible from ``LAYOUT_VERSION`` or earlier
    (``P:schema:compatible_from``, a hash of layout -> compatible-from), and
    refused (``StoreUnusable``, naming the store as ``name``) otherwise."""
    version = await command("GET", key("schema"))
    found = 1 if version is None else int(version)
    if found > LAYOUT_VERSION:
        recorded = await command("HGET", key("schema:compatible_from"), found)
        check_later_version(
            name, found, LAYOUT_VERSION, None if recorded is None else int(recorded)
        )
        return  # the later layout's processes keep its indexes
    if found < 3:
        await _index_due(command, run, key)
    if found < LAYOUT_VERSION:
        await command("SET", key("schema"), LAYOUT_VERSION)
    await command(
        "HSETNX",
        key("schema:compatible_from"),
        LAYOUT_VERSION,
        compatible_from(COMPATIBLE_FROM, LAYOUT_VERSION),
    )
    await _index_dead(command, run, key, thorough=thorough or found < LAYOUT_VERSION)


async def _index_dead(
    command: Call, run: Call, key: Callable[[str], str], *, thorough: bool
) -> None:
    """Every dead letter indexed as this layout indexes it, and no per-service set
    keeping one that went or moved: unless ``thorough``, the recent ones read and
    the others only when the counts differ (see the module)."""
    checked, newest, _letters, _members = await run("dead_check")
    if thorough or not checked:
        await _backfill_dead(command, run, key)
        await _unindex_stale_services(command, run, key)
    else:
        await _backfill_recent(command, run, key, float(checked) - _MARGIN)
        _, _, letters, members = await run("dead_check")
        if int(letters) > int(members):
            await _backfill_dead(command, run, key)
            _, _, letters, members = await run("dead_check")
        if int(members) > int(letters):
            await _unindex_stale_services(command, run, key)
    if newest:
        await run("dead_indexed_to", newest)


async def _backfill_recent(
    command: Call, run: Call, key: Callable[[str], str], since: float
) -> None:
    """The index fields missing from the dead letters created since ``since``
    (``CHUNK`` per script, in created_at order)."""
    offset = 0
    while True:
        reply = await run("dead_unindexed", repr(since), offset, CHUNK)
        old = {
            text(reply[i]): (text(reply[i + 1]), json.loads(reply[i + 1]))
            for i in range(1, len(reply), 2)
        }
        await _reindex(command, run, key, old)
        if int(reply[0]) < CHUNK:
            break
        offset += int(reply[0])


async def _backfill_dead(command: Call, run: Call, key: Callable[[str], str]) -> None:
    """The index fields an older layout did not write (layout 2: reason, failure group
    and event id; layout 4: service) come from each dead letter's record, ``CHUNK``
    at a time (HSCAN of ``P:dead:index``); each batch re-indexes only the entries
    still as read."""
    cursor: Any = 0
    while True:
        cursor, flat = await command("HSCAN", key("dead:index"), cursor, "COUNT", CHUNK)
        old: dict[str, tuple[str, list[Any]]] = {}
        for field, value in pairs(flat):
            index = json.loads(value)
            if len(index) < _INDEX_LENGTH:
                old[text(field)] = (text(value), index)
        await _reindex(command, run, key, old)
        if int(cursor) == 0:
            break


async def _reindex(
    command: Call, run: Call, key: Callable[[str], str], old: dict[str, tuple[str, list[Any]]]
) -> None:
    """Index entries (id -> the entry as read, decoded) completed from each dead
    letter's record, each re-indexed if still as read (the script ``backfill_dead``)."""
    if not old:
        return
    texts = await command("HMGET", key("dead:items"), *old)
    args: list[Any] = []
    for (item_id, (raw, index)), record in zip(old.items(), texts, strict=True):
        if record is None:
            continue
        item = dead_letter(item_id, text(record))
        known = (
            index[:7]
            if len(index) >= 7
            else [*index[:4], item.reason, item.failure_group, item.event_id]
        )
        args += (item_id, raw, compact_json([*known, item.service]))
    if args:
        await run("backfill_dead", *args)


async def _unindex_stale_services(command: Call, run: Call, key: Callable[[str], str]) -> None:
    """Take out of each per-service set (``P:dead:service:S``) the dead letters a
    process of layout 3 deleted, or rewrote without the service: ZSCAN of each,
    ``CHUNK`` at a time, the script checking each id's index entry."""
    for service in await command("SMEMBERS", key("dead:values:service")):
        cursor: Any = 0
        while True:
            cursor, flat = await command(
                "ZSCAN", key(f"dead:service:{text(service)}"), cursor, "COUNT", CHUNK
            )
            await run("unindex_stale_services", service, *_members(flat))
            if int(cursor) == 0:
                break


async def _index_due(command: Call, run: Call, key: Callable[[str], str]) -> None:
    """Layout 3: every item into its handler's due set, ``CHUNK`` ids at a time
    (ZSCAN of ``P:retry:next``, which holds every item); the script skips items
    already in one."""
    cursor: Any = 0
    while True:
        cursor, flat = await command("ZSCAN", key("retry:next"), cursor, "COUNT", CHUNK)
        ids = _members(flat)
        if ids:
            await run("index_due", *ids)
        if int(cursor) == 0:
            break


def _members(flat: Any) -> list[Any]:
    """The members of a ZSCAN reply: redis-py gives (member, score) pairs; a plain
    reply alternates them."""
    if flat and isinstance(flat[0], tuple | list):
        return [entry[0] for entry in flat]
    return list(flat[::2])
