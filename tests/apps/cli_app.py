"""An app for the CLI tests: ``retrybus worker cli_app:bus --app-dir tests/apps``.

Its handlers carry the demo's names. Each appends one JSON line per call to the
file named by the event's ``out`` field (when there is one), so a test sees
what a worker process did. An event with ``"fail": true`` fails with
"connection timeout"; one with ``"cancel": true`` raises ``CancelledError`` (a
handler's own, not the worker's); one with ``"sleep": S`` sleeps S seconds between a
"started" and a "done" line, so a test can stop a worker while it runs.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from retrybus import Event, EventBus, FixedDelay, open_store

bus = EventBus(open_store("memory://"), default_policy=FixedDelay(max_retries=2, delay=0.05))
not_a_bus = "a string"


def _record(event: Event, handler: str, what: str) -> None:
    out = event.data.get("out") if isinstance(event.data, dict) else None
    if out:
        line = json.dumps(
            {"handler": handler, "event_id": event.id, "what": what, "pid": os.getpid()}
        )
        with open(out, "a", encoding="utf-8") as file:
            file.write(line + "\n")


async def _handle(event: Event, handler: str) -> None:
    data: dict[str, Any] = event.data if isinstance(event.data, dict) else {}
    if data.get("fail"):
        raise TimeoutError("connection timeout")
    if data.get("cancel"):
        _record(event, handler, "cancelled")
        raise asyncio.CancelledError("a timeout inside the handler leaked")
    if data.get("sleep"):
        _record(event, handler, "started")
        await asyncio.sleep(float(data["sleep"]))
    _record(event, handler, "done")


@bus.handler("like.added", name="SocialStatisticsHandler")
async def count_like(event: Event) -> None:
    """Counts a like."""
    await _handle(event, "SocialStatisticsHandler")


@bus.handler("comment.created", name="CommentNotificationHandler")
async def notify_author(event: Event) -> None:
    """Emails the author (the email service is back up)."""
    await _handle(event, "CommentNotificationHandler")
