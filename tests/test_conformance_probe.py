"""Conformance suite: a requeue's probe says when no worker runs, stops after its
time limit, and does not count an item someone deleted as a success, on every
store engine."""

from __future__ import annotations

from datetime import timedelta

import pytest

from retrybus import EventBus, ManualClock, RetryWorker
from retrybus._redrive import Redrive
from retrybus._services import WorkerBeat
from seeding import dead_letter as dead


async def _beat(bus: EventBus, clock: ManualClock, handlers: tuple[str, ...] = ("h",)) -> None:
    now = clock.now()
    await bus.store.beat(
        WorkerBeat(
            name="w1",
            service=bus.service,
            host="here",
            pid=1,
            started_at=now,
            last_seen=now,
            interval=5.0,
            lanes=1,
            handlers=handlers,
        )
    )


async def test_a_probe_with_no_worker_running_says_so(bus: EventBus, clock: ManualClock) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    await dead(bus, 1)
    redrive = await bus.redrives.start(probe=1)
    await bus.redrives.step(redrive.id)
    waiting = await bus.redrives.step(redrive.id)
    assert waiting.state == "probing"
    assert waiting.message == (
        "no worker of service default is running: the probe waits for one (0 of 1 handled)"
    )
    await _beat(bus, clock, handlers=("other",))  # a worker that does not run the handler
    assert (await bus.redrives.step(redrive.id)).message.startswith("no worker of service")
    await _beat(bus, clock)
    assert (await bus.redrives.step(redrive.id)).message == (
        "probe: 0 of 1 handled, waiting for a worker"
    )
    clock.advance(16)  # three intervals without a beat: no longer live
    assert (await bus.redrives.step(redrive.id)).message.startswith("no worker of service")


async def test_a_probe_stops_after_its_time_limit_and_leaves_its_items_queued(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    for n in range(3):
        await dead(bus, n)
    redrive = await bus.redrives.start(probe=2)
    assert redrive.probe_timeout == 600.0
    probing = await bus.redrives.step(redrive.id)
    assert probing.probe_since == clock.now()
    clock.advance(599)
    assert (await bus.redrives.step(redrive.id)).state == "probing"
    clock.advance(1)
    stopped = await bus.redrives.step(redrive.id)
    assert stopped.state == "stopped"
    assert stopped.message == "probe timed out after 10m: 0 of 2 handled (the rest stay queued)"
    assert stopped.finished_at == clock.now()
    assert await bus.retry_queue.count() == 2  # nothing lost
    assert await bus.dead_letters.count() == 1


async def test_a_probe_timeout_is_stored_and_restarts_on_resume(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    await dead(bus, 1)
    redrive = await bus.redrives.start(probe=1, probe_timeout=90)
    assert (await bus.redrives.get(redrive.id)).probe_timeout == 90.0
    await bus.redrives.step(redrive.id)
    clock.advance(60)
    await bus.redrives.pause(redrive.id)
    clock.advance(600)  # paused time does not count
    resumed = await bus.redrives.resume(redrive.id)
    assert resumed.probe_since == clock.now()
    clock.advance(89)
    assert (await bus.redrives.step(redrive.id)).state == "probing"
    clock.advance(1)
    stopped = await bus.redrives.step(redrive.id)
    assert (stopped.state, stopped.message) == (
        "stopped",
        "probe timed out after 1m30s: 0 of 1 handled (the rest stay queued)",
    )


async def test_a_probe_without_a_time_limit_waits(bus: EventBus, clock: ManualClock) -> None:
    await dead(bus, 1)
    redrive = await bus.redrives.start(probe=1, probe_timeout=None)
    await bus.redrives.step(redrive.id)
    clock.advance(365 * 24 * 3600)
    assert (await bus.redrives.step(redrive.id)).state == "probing"


@pytest.mark.parametrize("bad", [0, -1, float("inf"), "10m", True])
async def test_a_bad_probe_timeout_is_refused(bus: EventBus, bad: object) -> None:
    with pytest.raises(ValueError, match="probe_timeout"):
        await bus.redrives.start(probe=1, probe_timeout=bad)  # type: ignore[arg-type]
    assert await bus.redrives.list() == []


async def test_a_deleted_probe_item_is_not_a_success(bus: EventBus, clock: ManualClock) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    for n in range(4):
        await dead(bus, n)
    redrive = await bus.redrives.start(probe=1)
    first = await bus.redrives.step(redrive.id)
    await bus.retry_queue.delete(first.probe_ids[0])  # someone else deletes it
    again = await bus.redrives.step(redrive.id)
    assert (again.state, again.probe_ids) == ("probing", ())
    assert again.message == (
        "probe: 1 of 1 gone without a success (deleted by someone?): "
        "neither passed nor failed, probing the next items"
    )
    second = await bus.redrives.step(redrive.id)  # the next item is the probe now
    assert len(second.probe_ids) == 1
    assert second.probe_ids != first.probe_ids
    await RetryWorker(bus).run_once()
    passed = await bus.redrives.step(redrive.id)
    assert (passed.state, passed.message) == ("running", "probe passed: 1 of 1 succeeded")


async def test_a_probe_with_one_success_and_one_deleted_passes_and_says_so(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    for n in range(3):
        await dead(bus, n)
    redrive = await bus.redrives.start(probe=2)
    probing = await bus.redrives.step(redrive.id)
    await bus.retry_queue.delete(probing.probe_ids[0])
    await RetryWorker(bus).run_once()
    passed = await bus.redrives.step(redrive.id)
    assert (passed.state, passed.message) == (
        "running",
        "probe passed: 1 of 2 succeeded; 1 gone without a success (deleted by someone?)",
    )


async def test_a_probe_success_is_remembered_without_the_inbox(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    await dead(bus, 1)
    redrive = await bus.redrives.start(probe=1)
    probing = await bus.redrives.step(redrive.id)
    assert not bus.core.remembered.in_use
    assert await bus.store.remembered(probing.probe_deliveries, clock.now()) == set()
    await RetryWorker(bus).run_once()
    remembered = await bus.store.remembered(probing.probe_deliveries, clock.now())
    assert remembered == set(probing.probe_deliveries)


def test_a_redrive_stored_before_probe_timeouts_gets_the_default(clock: ManualClock) -> None:
    from retrybus import DeadLetterFilter

    now = clock.now()
    redrive = Redrive(
        id="r1",
        action="requeue",
        where=DeadLetterFilter(),
        rate=None,
        probe=1,
        state="probing",
        total=1,
        created_at=now,
        updated_at=now,
        probe_since=now + timedelta(seconds=1),
        probe_timeout=30.0,
    )
    stored = redrive.to_dict()
    assert Redrive.from_dict(stored, 1) == Redrive(**{**_fields(redrive), "version": 1})
    for key in ("probe_timeout", "probe_since", "probe_deliveries"):
        del stored[key]
    old = Redrive.from_dict(stored, 1)
    assert (old.probe_timeout, old.probe_since, old.probe_deliveries) == (600.0, None, ())


def _fields(redrive: Redrive) -> dict[str, object]:
    return {name: getattr(redrive, name) for name in Redrive.__dataclass_fields__}
