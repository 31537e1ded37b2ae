"""Failures around the handler, not in it: broken policies, mutated payloads,
handlers that hand back coroutines, forced stops."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from retrybus import (
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    RetryWorker,
    Store,
)


class BrokenPolicy(FixedDelay):
    def delay(self, attempt: int) -> float:
        raise ZeroDivisionError("bad maths in a custom policy")


async def test_a_policy_that_raises_on_publish_dead_letters_and_loses_nothing(
    bus: EventBus,
) -> None:
    async def fails(event: Event) -> None:
        raise TimeoutError("slow")

    bus.subscribe("x", fails, name="broken", policy=BrokenPolicy())
    bus.subscribe("x", fails, name="fine")
    result = await bus.publish(Event("x"))
    assert result.dead_lettered == ("broken",)
    assert result.retrying == ("fine",)
    [dead] = await bus.dead_letters.list()
    assert dead.reason == "retry decision failed: ZeroDivisionError: bad maths in a custom policy"


async def test_a_policy_that_raises_in_the_worker_dead_letters_and_the_worker_goes_on(
    bus: EventBus, clock: ManualClock
) -> None:
    calls: list[str] = []

    async def fails(event: Event) -> None:
        calls.append(event.id)
        raise TimeoutError("slow")

    bus.subscribe("x", fails, name="broken", policy=BrokenPolicy())
    for n in range(3):
        await bus.retry_queue.add(Event("x", {"n": n}), "broken", "boom", next_retry=clock.now())
    assert await RetryWorker(bus, concurrency=2).run_once() == 3
    assert len(calls) == 3
    assert await bus.retry_queue.count() == 0
    reasons = {d.reason for d in await bus.dead_letters.list()}
    assert reasons == {"retry decision failed: ZeroDivisionError: bad maths in a custom policy"}


async def test_retry_after_beyond_the_calendar_is_dead_lettered(bus: EventBus) -> None:
    from retrybus import RetryAfter

    async def far(event: Event) -> None:
        raise RetryAfter(1e12)

    bus.subscribe("x", far, name="far")
    result = await bus.publish(Event("x"))
    assert result.dead_lettered == ("far",)


async def test_a_plain_handler_that_returns_a_coroutine_is_awaited(bus: EventBus) -> None:
    ran: list[str] = []

    async def send(event: Event) -> None:
        ran.append(event.id)

    bus.subscribe("x", lambda event: send(event), name="lambda")
    result = await bus.publish(Event("x", id="e1"))
    assert result.succeeded == ("lambda",)
    assert ran == ["e1"]


async def test_a_handler_that_fails_from_a_returned_coroutine_is_retried(bus: EventBus) -> None:
    async def send(event: Event) -> None:
        raise ConnectionError("down")

    bus.subscribe("x", lambda event: send(event), name="lambda")
    result = await bus.publish(Event("x"))
    assert result.retrying == ("lambda",)


async def test_a_sibling_mutating_the_payload_does_not_change_what_is_stored(
    bus: EventBus, clock: ManualClock
) -> None:
    seen: list[object] = []

    async def mutates(event: Event) -> None:
        event.data["added_by_sibling"] = object()  # not even JSON

    async def fails_once(event: Event) -> None:
        seen.append(dict(event.data))
        if len(seen) == 1:
            raise TimeoutError("slow")

    bus.subscribe("x", mutates, name="mutates")
    bus.subscribe("x", fails_once, name="fails_once")
    event = Event("x", {"post_id": 7})
    result = await bus.publish(event)
    assert result.retrying == ("fails_once",)
    [item] = await bus.retry_queue.list()
    assert item.event_data == {"post_id": 7}
    clock.advance(5)
    await RetryWorker(bus).run_once()
    assert seen[-1] == {"post_id": 7}


async def test_a_retried_handler_cannot_change_the_stored_payload(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, clock=clock, default_policy=FixedDelay(delay=0))

    async def mutate_then_fail(event: Event) -> None:
        event.data["n"] += 1
        raise TimeoutError("slow")

    bus.subscribe("x", mutate_then_fail, name="h")
    await bus.publish(Event("x", {"n": 1}))
    await RetryWorker(bus).run_once()
    [item] = await bus.retry_queue.list()
    assert item.attempt == 2
    assert item.event_data == {"n": 1}


async def test_a_dead_letter_copy_does_not_swallow_the_later_real_one(bus: EventBus) -> None:
    item = await bus.retry_queue.add(Event("x"), "h", "boom")
    copy = await bus.dead_letters.add(item, reason="noted by an operator")
    moved = await bus.retry_queue.mark_failed(item.id, reason="failed after 3 retries")
    assert moved is not None
    assert moved.id != copy.id
    assert {d.reason for d in await bus.dead_letters.list()} == {
        "noted by an operator",
        "failed after 3 retries",
    }


async def test_a_forced_stop_keeps_cut_off_items_leased_until_the_lease_runs_out() -> None:
    bus = EventBus(default_policy=FixedDelay(delay=0))
    started = asyncio.Event()

    @bus.handler("x", name="stuck")
    async def stuck(event: Event) -> None:
        started.set()
        await asyncio.sleep(60)

    for n in range(3):
        await bus.retry_queue.add(Event("x", {"n": n}), "stuck", "boom", next_retry=bus.clock.now())
    worker = RetryWorker(bus, concurrency=1, batch_size=3, lease=30, check_interval=0.01)
    await worker.start()
    await asyncio.wait_for(started.wait(), 5)
    await worker.stop(timeout=0.05)
    # the two never started are back at once; the cut-off one waits for its lease
    assert len(await bus.retry_queue.claim_due(10, owner="next")) == 2
    [held] = [i for i in await bus.retry_queue.list() if i.lease_owner != "next"]
    assert held.lease_until is not None
    assert held.lease_until > bus.clock.now() + timedelta(seconds=20)


async def test_every_call_first_or_retry_gets_the_events_json_decoded_afresh(
    bus: EventBus, clock: ManualClock
) -> None:
    seen: list[tuple[str, object]] = []

    async def pops(event: Event) -> None:
        seen.append(("pops", json.dumps(event.data, sort_keys=True)))
        event.data.pop("t")

    async def fails_once(event: Event) -> None:
        await asyncio.sleep(0)  # let the sibling run first
        seen.append(("fails_once", json.dumps(event.data, sort_keys=True)))
        if [name for name, _data in seen].count("fails_once") == 1:
            raise TimeoutError("slow")

    def plain(event: Event) -> None:
        seen.append(("plain", json.dumps(event.data, sort_keys=True)))

    bus.subscribe("rt", pops, name="pops")
    bus.subscribe("rt", fails_once, name="fails_once")
    bus.subscribe("rt", plain, name="plain")
    payload = {1: "a", "t": (1, 2)}
    event = Event("rt", payload)
    payload["later"] = "the caller changed it after building the event"
    await bus.publish(event)
    clock.advance(5)
    await RetryWorker(bus).run_once()
    expected = json.dumps({"1": "a", "t": [1, 2]}, sort_keys=True)
    assert [data for _name, data in seen] == [expected] * 4
    # the event keeps its data in JSON form, a copy: the caller's later change is not in it
    assert event.data == {"1": "a", "t": [1, 2]}
    assert payload["t"] == (1, 2)


async def test_handlers_of_one_publish_each_get_their_own_copy() -> None:
    bus = EventBus()
    got: list[object] = []

    async def keep(event: Event) -> None:
        got.append(event.data)

    bus.subscribe("x", keep, name="a")
    bus.subscribe("x", keep, name="b")
    await bus.publish(Event("x", {"k": [1]}))
    assert got == [{"k": [1]}, {"k": [1]}]
    assert got[0] is not got[1]
