"""Conformance suite, part four: failure groups, bulk actions, edit-and-requeue and
redrives (rate-limited, probed, paused, resumed, cancelled, resumed by another
process), on every store engine."""

from __future__ import annotations

from datetime import timedelta

import pytest

from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    FixedDelay,
    ItemNotFound,
    ManualClock,
    RetryWorker,
    Store,
)
from seeding import dead_letter as dead

# failure groups --------------------------------------------------------------


async def test_groups_show_one_row_per_handler_error_type_and_shape(bus: EventBus) -> None:
    for n in range(6):
        await dead(bus, n, handler="Mailer", error=ConnectionError(f"smtp 10.0.0.{n}:25 refused"))
    for n in range(2):
        await dead(bus, n, handler="Mailer", error=KeyError(f"user {n} unknown"))
    groups = await bus.dead_letters.groups()
    assert [(g.handler_name, g.error_type, g.shape, g.count) for g in groups] == [
        ("Mailer", "ConnectionError", "smtp <ip> refused", 6),
        ("Mailer", "KeyError", "'<str>'", 2),
    ]
    members = await bus.dead_letters.list(failure_group=groups[0].key)
    assert len(members) == 6
    assert groups[0].sample_id in {m.id for m in members}
    assert groups[0].sample_error.startswith("smtp 10.0.0.")


async def test_groups_honour_a_filter(bus: EventBus) -> None:
    await dead(bus, 1, handler="A")
    await dead(bus, 2, handler="B")
    groups = await bus.dead_letters.groups(DeadLetterFilter(handler_name="B"))
    assert [(g.handler_name, g.count) for g in groups] == [("B", 1)]


async def test_counts_by_rejects_an_unknown_field(bus: EventBus) -> None:
    with pytest.raises(ValueError, match="'colour'"):
        await bus.dead_letters.counts_by("colour")


# bulk actions ----------------------------------------------------------------


async def test_delete_matching_deletes_what_matches_and_keeps_the_rest(bus: EventBus) -> None:
    for n in range(5):
        await dead(bus, n, handler="A")
    keep = await dead(bus, 9, handler="B")
    assert await bus.dead_letters.delete_matching(DeadLetterFilter(handler_name="A")) == 5
    assert [d.id for d in await bus.dead_letters.list()] == [keep.id]


async def test_delete_matching_keeps_dead_letters_created_after_it_started(
    bus: EventBus, store: Store, clock: ManualClock
) -> None:
    await dead(bus, 1)
    where = DeadLetterFilter(handler_name="h")
    assert await bus.dead_letters.delete_matching(where) == 1
    clock.advance(1)
    late = await dead(bus, 2)
    assert [d.id for d in await bus.dead_letters.list()] == [late.id]


async def test_requeue_many_and_delete_many_report_missing_ids(bus: EventBus) -> None:
    a, b = await dead(bus, 1), await dead(bus, 2)
    result = await bus.dead_letters.requeue_many([a.id, "dlq_missing", a.id], actor="alice")
    assert result.succeeded == (a.id,)
    assert result.missing == ("dlq_missing",)
    queued = await bus.retry_queue.list()
    assert [i.metadata["requeued_by"] for i in queued] == ["alice"]
    assert await bus.dead_letters.delete_many([b.id, "dlq_missing"]) == 1
    assert await bus.dead_letters.count() == 0


async def test_reprocess_many_separates_successes_from_failures(bus: EventBus) -> None:
    def handler(event: Event) -> None:
        if event.data["n"] % 2:
            raise ValueError(f"odd {event.data['n']}")

    bus.subscribe("like.added", handler, name="h")
    letters = [await dead(bus, n) for n in range(4)]
    orphan = await dead(bus, 9, handler="Gone")
    result = await bus.dead_letters.reprocess_many([d.id for d in letters] + [orphan.id])
    assert set(result.succeeded) == {letters[0].id, letters[2].id}
    assert set(result.failed) == {letters[1].id, letters[3].id, orphan.id}
    assert result.failed[letters[1].id] == "ValueError: odd 1"
    assert "Gone" in result.failed[orphan.id]
    assert await bus.dead_letters.count(processed=True) == 2


# edit and requeue ------------------------------------------------------------


async def test_edit_and_requeue_replaces_the_payload_and_keeps_an_audit_trail(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h", policy=FixedDelay(max_retries=2))
    letter = await dead(bus, 1)
    retry = await bus.dead_letters.requeue(letter.id, data={"n": 1, "fixed": True}, actor="alice")
    stored = await bus.retry_queue.get(retry.id)
    assert stored.event_data == {"n": 1, "fixed": True}
    assert stored.to_event().id == letter.event_id
    (edit,) = stored.metadata["edits"]
    assert edit == {
        "at": clock.now().isoformat(),
        "by": "alice",
        "original_data": {"n": 1},
        "data": {"n": 1, "fixed": True},
    }
    assert stored.metadata["requeued_by"] == "alice"
    # the trail follows the item back into the dead letter queue
    again = await bus.retry_queue.mark_failed(stored)
    assert again is not None
    assert (await bus.dead_letters.get(again.id)).metadata["edits"] == [edit]


async def test_edit_and_requeue_refuses_a_payload_that_is_not_json(bus: EventBus) -> None:
    letter = await dead(bus, 1)
    with pytest.raises(TypeError, match=letter.id):
        await bus.dead_letters.requeue(letter.id, data={"when": object()})
    assert await bus.dead_letters.count() == 1


# redrives --------------------------------------------------------------------


async def test_a_redrive_requeues_what_matched_and_nothing_else(
    bus: EventBus, clock: ManualClock
) -> None:
    for n in range(5):
        await dead(bus, n, handler="A")
    other = await dead(bus, 9, handler="B")
    redrive = await bus.redrives.start(DeadLetterFilter(handler_name="A"), actor="alice")
    assert (redrive.state, redrive.total) == ("running", 5)
    clock.advance(1)
    late = await dead(bus, 10, handler="A")  # created after the redrive started: not taken
    finished = await bus.redrives.run(redrive.id, interval=0)
    assert (finished.state, finished.done, finished.failed) == ("completed", 5, 0)
    assert {d.id for d in await bus.dead_letters.list()} == {other.id, late.id}
    queued = await bus.retry_queue.list()
    assert len(queued) == 5
    assert {i.metadata["requeued_by"] for i in queued} == {"alice"}


async def test_a_redrive_keeps_to_its_rate(bus: EventBus, clock: ManualClock) -> None:
    for n in range(10):
        await dead(bus, n)
    redrive = await bus.redrives.start(rate="2/s")
    assert redrive.rate == 2.0
    first = await bus.redrives.step(redrive.id)
    assert first.done == 1  # one at once, then the rate
    same_instant = await bus.redrives.step(redrive.id)
    assert same_instant.done == 1
    clock.advance(1)
    assert (await bus.redrives.step(redrive.id)).done == 3
    clock.advance(0.5)
    assert (await bus.redrives.step(redrive.id)).done == 4
    clock.advance(60)  # a long pause allows a burst of at most one second's worth
    assert (await bus.redrives.step(redrive.id)).done == 6
    assert await bus.retry_queue.count() == 6


async def test_a_probe_that_succeeds_lets_the_redrive_go_on(
    bus: EventBus, clock: ManualClock
) -> None:
    bus.subscribe("like.added", lambda event: None, name="h")
    for n in range(6):
        await dead(bus, n)
    redrive = await bus.redrives.start(probe=2)
    probing = await bus.redrives.step(redrive.id)
    assert (probing.state, probing.done, len(probing.probe_ids)) == ("probing", 2, 2)
    assert "waiting for a worker" in probing.message
    waiting = await bus.redrives.step(redrive.id)
    assert waiting.state == "probing"
    assert await bus.dead_letters.count() == 4  # nothing more until the probe is through
    await RetryWorker(bus).run_once()
    passed = await bus.redrives.step(redrive.id)
    assert (passed.state, passed.message) == ("running", "probe passed: 2 of 2 succeeded")
    finished = await bus.redrives.run(redrive.id, interval=0)
    assert (finished.state, finished.done) == ("completed", 6)
    assert await bus.dead_letters.count() == 0


async def test_a_probe_that_fails_again_stops_the_redrive(
    bus: EventBus, clock: ManualClock
) -> None:
    def still_broken(event: Event) -> None:
        raise ConnectionError("email service unavailable")

    bus.subscribe("like.added", still_broken, name="h", policy=FixedDelay(max_retries=3))
    for n in range(5):
        await dead(bus, n)
    redrive = await bus.redrives.start(probe=1)
    await bus.redrives.step(redrive.id)
    await RetryWorker(bus).run_once()  # the probe item fails again and is rescheduled
    stopped = await bus.redrives.step(redrive.id)
    assert stopped.state == "stopped"
    assert stopped.message == (
        "probe failed: 1 of 1 failed again (ConnectionError: email service unavailable)"
    )
    assert stopped.finished_at == clock.now()
    assert (await bus.redrives.step(redrive.id)).state == "stopped"
    assert await bus.dead_letters.count() == 4  # the rest stay where they are


async def test_a_probe_item_dead_lettered_again_counts_as_a_failure(
    bus: EventBus, clock: ManualClock
) -> None:
    def still_broken(event: Event) -> None:
        raise ConnectionError("down")

    bus.subscribe("like.added", still_broken, name="h", policy=FixedDelay(max_retries=0))
    await dead(bus, 1)
    await dead(bus, 2)
    redrive = await bus.redrives.start(probe=1)
    await bus.redrives.step(redrive.id)
    await RetryWorker(bus).run_once()
    assert (await bus.redrives.step(redrive.id)).state == "stopped"


async def test_pause_resume_and_cancel(bus: EventBus, clock: ManualClock) -> None:
    for n in range(6):
        await dead(bus, n)
    redrive = await bus.redrives.start(rate=1)
    assert (await bus.redrives.step(redrive.id)).done == 1
    paused = await bus.redrives.pause(redrive.id)
    assert paused.state == "paused"
    clock.advance(10)
    assert (await bus.redrives.step(redrive.id)).done == 1  # a paused redrive stays put
    with pytest.raises(ValueError, match="paused"):
        await bus.redrives.pause(redrive.id)
    resumed = await bus.redrives.resume(redrive.id)
    assert resumed.state == "running"
    assert (await bus.redrives.step(redrive.id)).done == 2  # no burst saved up while paused
    cancelled = await bus.redrives.cancel(redrive.id)
    assert (cancelled.state, cancelled.finished_at) == ("cancelled", clock.now())
    clock.advance(10)
    assert (await bus.redrives.step(redrive.id)).done == 2
    with pytest.raises(ValueError, match="cancelled"):
        await bus.redrives.resume(redrive.id)
    assert await bus.dead_letters.count() == 4


async def test_a_redrive_outlives_the_process_that_started_it(
    store: Store, clock: ManualClock
) -> None:
    first = EventBus(store, clock=clock)
    for n in range(4):
        await dead(first, n)
    redrive = await first.redrives.start(rate=1)
    await first.redrives.step(redrive.id)  # first holds it now
    second = EventBus(store, clock=clock)  # another process, after a restart
    assert [r.id for r in await second.redrives.list()] == [redrive.id]
    assert (await second.redrives.step(redrive.id)).done == 1  # first's lease is live
    clock.advance(31)  # first is gone: its lease runs out
    taken = await second.redrives.step(redrive.id)
    assert taken.runner == second.redrives.owner
    assert taken.done == 2
    finished = await second.redrives.run(
        redrive.id, interval=0, on_progress=lambda _: clock.advance(1)
    )
    assert (finished.state, finished.done) == ("completed", 4)


async def test_a_reprocess_redrive_calls_the_handlers_and_skips_failures(
    bus: EventBus,
) -> None:
    def handler(event: Event) -> None:
        if event.data["n"] == 2:
            raise ValueError("still bad")

    bus.subscribe("like.added", handler, name="h")
    for n in range(5):
        await dead(bus, n)
    redrive = await bus.redrives.start(action="reprocess")
    finished = await bus.redrives.run(redrive.id, interval=0)
    assert (finished.state, finished.done, finished.failed) == ("completed", 4, 1)
    assert finished.message == "4 reprocessed, 1 failed again"
    assert await bus.dead_letters.count(processed=False) == 1


async def test_redrive_arguments_are_checked(bus: EventBus) -> None:
    with pytest.raises(ValueError, match="'move'"):
        await bus.redrives.start(action="move")
    with pytest.raises(ValueError, match="'fast'"):
        await bus.redrives.start(rate="fast")
    with pytest.raises(ValueError, match="-1"):
        await bus.redrives.start(probe=-1)
    with pytest.raises(ItemNotFound):
        await bus.redrives.get("redrive_missing")


async def test_finished_redrives_can_be_deleted(bus: EventBus, clock: ManualClock) -> None:
    await dead(bus, 1)
    redrive = await bus.redrives.start()
    with pytest.raises(ValueError, match="cancel it first"):
        await bus.redrives.delete(redrive.id)
    await bus.redrives.run(redrive.id, interval=0)
    clock.advance(timedelta(seconds=1).total_seconds())
    await bus.redrives.delete(redrive.id)
    assert await bus.redrives.list() == []
