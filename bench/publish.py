"""Publish throughput on the memory store: one async handler, no failures.

Figures:
  publish_throughput_memory                      events/s, events built beforehand
  publish_throughput_memory_with_event_creation  events/s, Event(...) built in the loop

Run alone: .venv/bin/python bench/publish.py
"""

from __future__ import annotations

import asyncio
import gc
import time

from _common import Figure, emit, median, note, quiet_logging

from retrybus import Event, EventBus, open_store

EVENTS_PER_ROUND = 50_000
ROUNDS = 5
WARMUP_EVENTS = 5_000


async def _handle(event: Event) -> None:
    return None


def _make_bus() -> EventBus:
    bus = EventBus(open_store("memory://"))
    bus.subscribe("bench.published", _handle, name="bench.handle")
    return bus


async def _round_prebuilt(bus: EventBus, events: list[Event]) -> float:
    publish = bus.publish
    start = time.perf_counter_ns()
    for event in events:
        await publish(event)
    elapsed = time.perf_counter_ns() - start
    return len(events) / (elapsed / 1e9)


async def _round_with_creation(bus: EventBus, count: int) -> float:
    publish = bus.publish
    start = time.perf_counter_ns()
    for n in range(count):
        await publish(Event("bench.published", {"n": n}, source="bench"))
    elapsed = time.perf_counter_ns() - start
    return count / (elapsed / 1e9)


async def measure(events_per_round: int = EVENTS_PER_ROUND, rounds: int = ROUNDS) -> list[Figure]:
    quiet_logging()
    bus = _make_bus()
    warmup = [Event("bench.published", {"n": n}, source="bench") for n in range(WARMUP_EVENTS)]
    await _round_prebuilt(bus, warmup)
    await _round_with_creation(bus, WARMUP_EVENTS)

    prebuilt: list[float] = []
    created: list[float] = []
    for _ in range(rounds):
        events = [
            Event("bench.published", {"n": n}, source="bench") for n in range(events_per_round)
        ]
        gc.collect()
        prebuilt.append(await _round_prebuilt(bus, events))
        del events
        gc.collect()
        created.append(await _round_with_creation(bus, events_per_round))
    note(
        f"publish: {rounds} rounds x {events_per_round} events; "
        f"prebuilt rounds {[round(r) for r in prebuilt]}, "
        f"with creation {[round(r) for r in created]} events/s (median reported)"
    )
    return [
        Figure("publish_throughput_memory", median(prebuilt), "events/s"),
        Figure("publish_throughput_memory_with_event_creation", median(created), "events/s"),
    ]


def run() -> list[Figure]:
    return asyncio.run(measure())


if __name__ == "__main__":
    emit(run())
