"""The inbox's remembered successes on every store engine: ``remember_successes``,
``remembered`` and ``forget_successes``, with expiry read on the manual clock."""

from __future__ import annotations

from datetime import timedelta

from retrybus import Event, ManualClock, RetryItem, Store
from retrybus._outcomes import Succeeded


async def test_remembered_ids_are_found_until_their_time(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    assert await store.remembered({"a", "b"}, now) == set()
    await store.remember_successes(["a", "b"], now + timedelta(hours=1))
    assert await store.remembered({"a", "b", "c"}, now) == {"a", "b"}
    assert await store.remembered(set(), now) == set()
    clock.advance(3599)
    assert await store.remembered(["a", "c"], clock.now()) == {"a"}
    clock.advance(1)  # until is now: forgotten, swept or not
    assert await store.remembered({"a", "b"}, clock.now()) == set()


async def test_nothing_to_remember_is_a_no_op(store: Store, clock: ManualClock) -> None:
    await store.remember_successes([], clock.now() + timedelta(hours=1))
    assert await store.forget_successes(clock.now()) == 0


async def test_remembering_again_keeps_the_later_time(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    await store.remember_successes(["a", "b", "a"], now + timedelta(hours=2))
    await store.remember_successes(["a"], now + timedelta(hours=1))  # earlier: kept at 2 h
    await store.remember_successes(["b"], now + timedelta(hours=3))  # later: moved on
    at = now + timedelta(hours=2, seconds=1)
    assert await store.remembered({"a", "b"}, at) == {"b"}
    assert await store.remembered({"a", "b"}, now + timedelta(hours=3)) == set()


async def test_times_are_kept_to_the_microsecond(store: Store, clock: ManualClock) -> None:
    until = clock.now() + timedelta(seconds=10, microseconds=1)
    await store.remember_successes(["a"], until)
    assert await store.remembered({"a"}, until - timedelta(microseconds=1)) == {"a"}
    assert await store.remembered({"a"}, until) == set()


async def test_forget_deletes_what_has_expired(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    await store.remember_successes(["old1", "old2"], now + timedelta(minutes=1))
    await store.remember_successes(["new"], now + timedelta(days=7))
    assert await store.forget_successes(now) == 0
    clock.advance(60)
    assert await store.forget_successes(clock.now()) == 2
    assert await store.remembered({"old1", "old2", "new"}, now) == {"new"}
    assert await store.forget_successes(clock.now()) == 0


async def test_many_ids_at_once(store: Store, clock: ManualClock) -> None:
    ids = [f"delivery-{n}" for n in range(1200)]
    until = clock.now() + timedelta(hours=1)
    await store.remember_successes(ids[::2], until)
    found = await store.remembered(ids, clock.now())
    assert found == set(ids[::2])


async def test_complete_remembering_removes_and_remembers_in_one_step(
    store: Store, clock: ManualClock
) -> None:
    now = clock.now()
    record = RetryItem.pending(Event("x", {}), "h", max_retries=3, due=now, now=now)
    await store.record_pending([record])
    [claimed] = await store.claim_due(
        now=now, limit=10, owner="w", lease_until=now + timedelta(minutes=1)
    )
    assert isinstance(claimed, RetryItem)
    applied = await store.complete_remembering(
        [Succeeded(claimed)], "w", now, ["d1", "d2"], now + timedelta(hours=1)
    )
    assert applied == {record.id}
    assert await store.retry_count() == 0
    assert await store.remembered({"d1", "d2", "d3"}, now) == {"d1", "d2"}
