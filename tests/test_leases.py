"""Leases: a claim holds an item while its handler runs, a lapsed claim's late
outcome is fenced off, and concurrent claims never share an item.

Runs against every store (the ``store``/``bus``/``clock`` fixtures), and, for
SQLite, against two store objects on one file used from two threads at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import retrybus
from retrybus import Event, EventBus, FixedDelay, ManualClock, RetryItem, RetryWorker, Store
from retrybus._outcomes import DeadLettered, Rescheduled, Succeeded
from retrybus._records import ErrorInfo

# Heartbeat ------------------------------------------------------------------------


async def test_a_handler_running_longer_than_its_lease_keeps_the_item_until_it_finishes(
    store: Store,
) -> None:
    bus = EventBus(store, default_policy=FixedDelay(delay=0))  # the real clock
    calls = 0

    async def slow(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("the first call fails")
        await asyncio.sleep(1.5)

    bus.subscribe("report.requested", slow, name="slow")
    await bus.publish(Event("report.requested"))
    # a lease long enough that a loaded machine still extends it in time
    worker = RetryWorker(bus, lease=0.6)
    running = asyncio.create_task(worker.run_once())

    stolen: list[RetryItem] = []
    for _ in range(12):  # every 0.1 s for 1.2 s: twice the lease
        await asyncio.sleep(0.1)
        stolen += await bus.retry_queue.claim_due(lease=0.3, owner="intruder")
    assert stolen == []
    assert calls == 2
    assert not running.done()

    assert await running == 1
    assert await bus.retry_queue.count() == 0
    assert await bus.retry_queue.claim_due(lease=0.3, owner="intruder") == []


# Fencing --------------------------------------------------------------------------

LEASE = 10.0


async def _taken_over(bus: EventBus, clock: ManualClock) -> tuple[RetryItem, RetryItem]:
    """One item claimed by worker A, whose lease then runs out, then claimed by worker B."""
    await bus.retry_queue.add(
        Event("like.added", {"post_id": 1}), "count_like", "boom", next_retry=clock.now()
    )
    (a,) = await bus.retry_queue.claim_due(lease=LEASE, owner="worker-a")
    clock.advance(LEASE + 1)
    (b,) = await bus.retry_queue.claim_due(lease=LEASE, owner="worker-b")
    assert (a.id, a.lease_owner, b.lease_owner) == (b.id, "worker-a", "worker-b")
    return a, b


LateCompletion = Callable[[EventBus, RetryItem], Awaitable[Any]]


async def _late_mark_success(bus: EventBus, a: RetryItem) -> Any:
    return await bus.retry_queue.mark_success(a)


async def _late_update_attempt(bus: EventBus, a: RetryItem) -> Any:
    return await bus.retry_queue.update_attempt(
        a, bus.clock.now() + timedelta(seconds=5), a.attempt + 1, error="A failed late"
    )


async def _late_mark_failed(bus: EventBus, a: RetryItem) -> Any:
    return await bus.retry_queue.mark_failed(a, error="A gave up late")


async def _late_complete_succeeded(bus: EventBus, a: RetryItem) -> Any:
    return await bus.store.complete([Succeeded(a)], "worker-a", bus.clock.now())


async def _late_complete_rescheduled(bus: EventBus, a: RetryItem) -> Any:
    later = a.rescheduled(
        attempt=a.attempt + 1,
        next_retry=bus.clock.now() + timedelta(seconds=5),
        error=ErrorInfo("A failed late", "TimeoutError"),
        now=bus.clock.now(),
    )
    return await bus.store.complete([Rescheduled(later)], "worker-a", bus.clock.now())


async def _late_complete_dead_lettered(bus: EventBus, a: RetryItem) -> Any:
    dead = a.to_dead_letter(reason="A gave up late", now=bus.clock.now())
    return await bus.store.complete([DeadLettered(a.id, dead)], "worker-a", bus.clock.now())


LATE_COMPLETIONS: dict[str, tuple[LateCompletion, Any]] = {
    # A's late action, and what it must return: nothing applied
    "mark_success": (_late_mark_success, False),
    "update_attempt": (_late_update_attempt, False),
    "mark_failed": (_late_mark_failed, None),
    "store.complete(Succeeded)": (_late_complete_succeeded, set()),
    "store.complete(Rescheduled)": (_late_complete_rescheduled, set()),
    "store.complete(DeadLettered)": (_late_complete_dead_lettered, set()),
}


@pytest.mark.parametrize("late", list(LATE_COMPLETIONS))
async def test_a_late_completion_does_not_touch_an_item_another_worker_now_holds(
    bus: EventBus, clock: ManualClock, late: str
) -> None:
    a, b = await _taken_over(bus, clock)
    complete_late, nothing = LATE_COMPLETIONS[late]

    assert await complete_late(bus, a) == nothing

    held = await bus.retry_queue.get(a.id)
    assert (held.lease_owner, held.lease_until, held.attempt) == (
        "worker-b",
        b.lease_until,
        b.attempt,
    )
    assert await bus.dead_letters.count() == 0
    assert await bus.retry_queue.mark_success(b) is True  # B still holds it


@pytest.mark.parametrize("late", list(LATE_COMPLETIONS))
async def test_a_late_completion_does_not_undo_the_new_holders_success(
    bus: EventBus, clock: ManualClock, late: str
) -> None:
    a, b = await _taken_over(bus, clock)
    assert await bus.retry_queue.mark_success(b) is True
    complete_late, nothing = LATE_COMPLETIONS[late]

    assert await complete_late(bus, a) == nothing

    assert await bus.retry_queue.count() == 0
    assert await bus.dead_letters.count() == 0
    assert (await bus.stats()).retry_queue_size == 0


@pytest.mark.parametrize("late", list(LATE_COMPLETIONS))
async def test_a_late_completion_does_not_override_the_new_holders_reschedule(
    bus: EventBus, clock: ManualClock, late: str
) -> None:
    a, b = await _taken_over(bus, clock)
    next_retry = clock.now() + timedelta(seconds=30)
    assert await bus.retry_queue.update_attempt(b, next_retry, 2, error="B failed") is True
    complete_late, nothing = LATE_COMPLETIONS[late]

    assert await complete_late(bus, a) == nothing

    item = await bus.retry_queue.get(a.id)
    assert (item.attempt, item.next_retry, item.error, item.lease_owner) == (
        2,
        next_retry,
        "B failed",
        None,
    )
    assert await bus.dead_letters.count() == 0


@pytest.mark.parametrize("late", list(LATE_COMPLETIONS))
async def test_a_late_completion_does_not_override_the_new_holders_dead_letter(
    bus: EventBus, clock: ManualClock, late: str
) -> None:
    a, b = await _taken_over(bus, clock)
    dead = await bus.retry_queue.mark_failed(b, error="B gave up")
    assert dead is not None
    complete_late, nothing = LATE_COMPLETIONS[late]

    assert await complete_late(bus, a) == nothing

    assert await bus.retry_queue.count() == 0
    assert await bus.dead_letters.list() == [dead]


# Concurrent claims ----------------------------------------------------------------


async def _add_due(bus: EventBus, count: int) -> set[str]:
    ids = set()
    for n in range(count):
        item = await bus.retry_queue.add(
            Event("like.added", {"post_id": n}), "count_like", "boom", next_retry=bus.clock.now()
        )
        ids.add(item.id)
    return ids


async def test_concurrent_claims_on_one_store_never_receive_the_same_item(
    bus: EventBus,
) -> None:
    added = await _add_due(bus, 200)

    claims = await asyncio.gather(
        *(bus.retry_queue.claim_due(7, lease=60, owner=f"claimer-{n}") for n in range(40))
    )

    claimed = [item.id for claim in claims for item in claim]
    assert len(claimed) == len(set(claimed))
    assert set(claimed) == added
    assert all(
        item.lease_owner == f"claimer-{n}" for n, claim in enumerate(claims) for item in claim
    )


def _claim_until_empty(
    url: str, clock: ManualClock, start: threading.Barrier, most: int
) -> list[str]:
    """Claim small batches through a store object of its own until nothing is due
    (or until it has claimed more than ``most``, which means claims repeat)."""

    async def claim_all() -> list[str]:
        async with retrybus.open_store(url) as store:
            bus = EventBus(store, clock=clock)
            start.wait()
            claimed: list[str] = []
            while len(claimed) <= most and (batch := await bus.retry_queue.claim_due(3, lease=60)):
                claimed += [item.id for item in batch]
                # a claim takes well under a millisecond: pause so that the other
                # thread gets the GIL and both really claim side by side
                await asyncio.sleep(0.001)
            return claimed

    return asyncio.run(claim_all())


async def test_two_sqlite_stores_on_one_file_claiming_at_once_never_receive_the_same_item(
    tmp_path: Path, clock: ManualClock
) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    async with retrybus.open_store(url) as store:
        added = await _add_due(EventBus(store, clock=clock), 600)

    start = threading.Barrier(2)
    first, second = await asyncio.gather(
        asyncio.to_thread(_claim_until_empty, url, clock, start, len(added)),
        asyncio.to_thread(_claim_until_empty, url, clock, start, len(added)),
    )

    assert set(first).isdisjoint(second)
    assert len(first) + len(second) == len(added)
    assert set(first) | set(second) == added
    assert first, "the first store took part"
    assert second, "the second store took part"
