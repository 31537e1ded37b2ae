"""Dead letters made as a worker makes them, for the tests of every engine."""

from __future__ import annotations

from typing import Any

from retrybus import DeadLetterItem, Event, EventBus


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
