"""Redrives and reprocesses under concurrency: every item tried once, decisions that
survive a pause, leases that are let go and lost, and a dead letter held while it
is being reprocessed. On every store engine."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    ItemBusy,
    ManualClock,
    Store,
)
from retrybus import _redrives as redrives_module
from seeding import dead_letter as dead


async def test_a_reprocess_redrive_tries_each_item_once_when_a_failure_leaves_the_filter(
    bus: EventBus, clock: ManualClock
) -> None:
    calls: list[int] = []

    async def handler(event: Event) -> None:
        calls.append(event.data["n"])
        if len(calls) == 1:  # fails with a message of another shape: another group
            raise RuntimeError("something else entirely")

    bus.subscribe("like.added", handler, name="h")
    for n in range(5):
        await dead(bus, n, error=ConnectionError(f"smtp 10.0.0.{n}:25 refused"))
        clock.advance(1)
    (group,) = await bus.dead_letters.groups()
    redrive = await bus.redrives.start(
        DeadLetterFilter(failure_group=group.key), action="reprocess", rate=1
    )
    finished = await bus.redrives.run(
        redrive.id, interval=0, on_progress=lambda _: clock.advance(1)
    )
    assert sorted(calls) == [0, 1, 2, 3, 4]
    assert (finished.state, finished.done, finished.failed) == ("completed", 4, 1)


async def test_a_failed_reprocess_probe_stops_the_redrive_even_if_paused_meanwhile(
    bus: EventBus,
) -> None:
    started: list[str] = []

    async def handler(event: Event) -> None:
        await bus.redrives.pause(started[0])  # an operator pauses while the probe runs
        raise ValueError("still broken")

    bus.subscribe("like.added", handler, name="h")
    for n in range(3):
        await dead(bus, n)
    redrive = await bus.redrives.start(action="reprocess", probe=1)
    started.append(redrive.id)
    after = await bus.redrives.step(redrive.id)
    assert after.state == "stopped"
    assert after.message.startswith("probe failed: 1 of 1 failed again")
    with pytest.raises(ValueError, match="stopped"):
        await bus.redrives.resume(redrive.id)
    assert await bus.dead_letters.count(processed=False) == 3


async def test_a_paused_redrive_is_let_go_so_another_process_resumes_it_at_once(
    store: Store, clock: ManualClock
) -> None:
    first = EventBus(store, clock=clock)
    for n in range(4):
        await dead(first, n)
    redrive = await first.redrives.start(rate=1)
    assert (await first.redrives.step(redrive.id)).done == 1  # first holds the lease
    await first.redrives.pause(redrive.id)
    second = EventBus(store, clock=clock)
    await second.redrives.resume(redrive.id)
    taken = await second.redrives.step(redrive.id)
    assert (taken.runner, taken.done) == (second.redrives.owner, 2)


async def test_a_step_that_loses_its_redrive_stops_before_its_next_item(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redrives_module, "RUNNER_LEASE", 0.06)  # renewed every 20 ms
    calls: list[int] = []
    ids: list[str] = []

    async def handler(event: Event) -> None:
        calls.append(event.data["n"])
        if len(calls) == 1:
            await bus.redrives.cancel(ids[0])
            await asyncio.sleep(0.2)  # the lease keeper notices meanwhile

    bus.subscribe("like.added", handler, name="h")
    for n in range(4):
        await dead(bus, n)
    redrive = await bus.redrives.start(action="reprocess")
    ids.append(redrive.id)
    after = await bus.redrives.step(redrive.id)
    assert len(calls) == 1
    assert (after.state, after.done) == ("cancelled", 1)


async def test_steps_of_one_redrive_never_overlap_in_a_process(bus: EventBus) -> None:
    running = 0
    most = 0
    calls: list[int] = []

    async def handler(event: Event) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        calls.append(event.data["n"])
        await asyncio.sleep(0.01)
        running -= 1

    bus.subscribe("like.added", handler, name="h")
    for n in range(3):
        await dead(bus, n)
    redrive = await bus.redrives.start(action="reprocess")
    await asyncio.gather(*(bus.redrives.step(redrive.id) for _ in range(3)))
    assert most == 1
    assert sorted(calls) == [0, 1, 2]
    assert (await bus.redrives.get(redrive.id)).done == 3


async def test_a_dead_letter_being_reprocessed_is_held_until_the_call_ends(
    bus: EventBus,
) -> None:
    letter_ids: list[str] = []
    refused: list[str] = []

    async def handler(event: Event) -> None:
        for attempt in (
            bus.dead_letters.reprocess(letter_ids[0]),
            bus.dead_letters.requeue(letter_ids[0]),
            bus.dead_letters.delete(letter_ids[0]),
        ):
            try:
                await attempt
            except ItemBusy as exc:
                refused.append(str(exc))

    bus.subscribe("like.added", handler, name="h")
    letter = await dead(bus, 1)
    letter_ids.append(letter.id)
    done = await bus.dead_letters.reprocess(letter.id, actor="alice")
    assert done.processed
    assert len(refused) == 3
    assert all("being reprocessed by alice" in message for message in refused)
    assert await bus.dead_letters.delete_many([letter.id]) == 1  # free again afterwards


async def test_a_claim_left_by_a_crashed_process_runs_out_and_is_forgotten(
    bus: EventBus, store: Store, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    letter = await dead(bus, 1)
    until = (clock.now() + timedelta(seconds=60)).isoformat()
    await store.put_control(
        f"reprocessing:{letter.id}", {"token": "gone", "by": "crashed", "until": until}, version=0
    )
    with pytest.raises(ItemBusy, match="crashed"):
        await bus.dead_letters.requeue(letter.id)
    clock.advance(61)
    assert (await bus.dead_letters.reprocess(letter.id)).processed
    other = await dead(bus, 2)
    await store.put_control(
        f"reprocessing:{other.id}", {"token": "gone", "until": until}, version=0
    )
    await bus.dead_letters.cleanup()
    assert await store.list_control("reprocessing:") == []
