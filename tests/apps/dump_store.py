"""Print everything a store holds as JSON, from a fresh process.

    python tests/apps/dump_store.py (PATH | URL)

PATH is a SQLite file; URL any store URL. Output: ``{"retry": [...], "dead": [...],
"counters": {...}, "control": [...]}``; each record is its dataclass fields, times
as ISO 8601 with microseconds, plus, for the queues' records, ``event``: the event
rebuilt from the record in its CloudEvents form.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import retrybus
from retrybus import DeadLetterItem, EventBus, RetryItem


def plain(value: Any) -> Any:
    """A record as JSON-ready values (the tests render their own records the same way)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def record(item: RetryItem | DeadLetterItem) -> dict[str, Any]:
    return {**plain(item), "event": item.to_event().to_dict()}


async def dump(url: str) -> dict[str, Any]:
    async with retrybus.open_store(url) as store:
        bus = EventBus(store)
        return {
            "retry": [record(item) for item in await bus.retry_queue.list(limit=100_000)],
            "dead": [record(item) for item in await bus.dead_letters.list(limit=100_000)],
            "counters": plain(await store.counters()),
            "control": plain(await store.list_control("")),
        }


def store_url(where: str) -> str:
    return where if "://" in where else f"sqlite:///{Path(where).resolve()}"


if __name__ == "__main__":
    print(json.dumps(asyncio.run(dump(store_url(sys.argv[1]))), ensure_ascii=False))
