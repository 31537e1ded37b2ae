"""The app the `retrybus worker` process of bench/worker.py serves: one handler,
named as the seeded items' handler, that succeeds (their first call failed)."""

from __future__ import annotations

from retrybus import Event, EventBus, open_store

bus = EventBus(open_store("memory://"))  # the bench gives --store


@bus.handler("bench.*", name="bench.handle")
async def handle(event: Event) -> None:
    return None
