"""Records made as retrybus makes them, for the tests of every engine."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from call_records import Call
from retrybus import DeadLetterItem, Event, EventBus, RetryItem, Store
from retrybus._records import ErrorInfo


async def dead_letter(
    bus: EventBus,
    n: int = 1,
    *,
    handler: str = "h",
    event_type: str = "like.added",
    error: BaseException | str = "connection timeout",
    reason: str = "failed after 3 retries",
    data: Any = None,
) -> DeadLetterItem:
    """Add a retry item for event ``{"n": n}`` (or ``data``) and fail it for good."""
    payload = {"n": n} if data is None else data
    item = await bus.retry_queue.add(Event(event_type, payload, source="svc"), handler, error)
    letter = await bus.retry_queue.mark_failed(item, reason=reason)
    assert letter is not None
    return letter


async def failed_once(store: Store, count: int, handler: str, batch: int = 500) -> dict[str, Call]:
    """Call ``handler`` for ``count`` events, a call that fails, and record a retry item
    for each, due at once, ``batch`` at a time (as publish records its failures).
    Returns those first calls by event id."""
    calls: dict[str, Call] = {}
    pid = os.getpid()
    now = datetime.now(UTC)
    error = ErrorInfo("the first call fails", "ConnectionError")
    items: list[RetryItem] = []
    for n in range(count):
        event = Event("item.created", {"n": n})
        start = time.time_ns()
        calls[event.id] = Call(event.id, pid, start, time.time_ns())
        items.append(
            RetryItem.for_failure(
                event, handler, error, attempt=1, max_retries=3, next_retry=now, now=now
            )
        )
        if len(items) == batch:
            await store.record_failures(items, [])
            items = []
    if items:
        await store.record_failures(items, [])
    return calls
