"""Reading what worker processes recorded of their handler calls, for the
multi-process tests (the worker side is tests/apps/process_worker.py)."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Call:
    """One handler call: who made it and when (``end`` is None if it never returned)."""

    event_id: str
    pid: int
    start: int
    end: int | None = None


def read_calls(record: Path) -> list[Call]:
    """The calls a worker process recorded (``S``/``E`` lines, see process_worker.py)."""
    calls: dict[tuple[str, int, int], Call] = {}
    if not record.exists():
        return []
    for line in record.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4 or (fields[0] == "E" and len(fields) < 5):
            continue  # a line still being written, or cut short by a kill
        kind, event_id, pid, start, *rest = fields
        key = (event_id, int(pid), int(start))
        call = calls.setdefault(key, Call(event_id, int(pid), int(start)))
        if kind == "E":
            call.end = int(rest[0])
    return list(calls.values())


def overlapping(calls: list[Call]) -> list[tuple[Call, Call]]:
    """Pairs of calls of one item where the second started before the first ended."""
    ordered = sorted(calls, key=lambda call: call.start)
    return [
        (first, second)
        for first, second in itertools.pairwise(ordered)
        if first.end is None or second.start < first.end
    ]


def clashes(calls: list[Call]) -> dict[str, list[tuple[Call, Call]]]:
    """The items some of whose calls overlapped, with the overlapping pairs."""
    by_item: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        by_item[call.event_id].append(call)
    found = {event_id: overlapping(item_calls) for event_id, item_calls in by_item.items()}
    return {event_id: pairs for event_id, pairs in found.items() if pairs}


def epoch_ns(moment: datetime) -> int:
    """An aware datetime as integer nanoseconds since the epoch (no float rounding)."""
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.005)
