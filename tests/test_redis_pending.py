"""Pending deliveries in the Redis store, beyond the conformance suite: the due set of
each handler (a claim reads only its handlers' sets), the claims count kept beside
the record, one script per batch of pending records, the upgrade from key layout 2,
items an older layout makes due, and how fast a watching worker hears of a deferred
delivery.

Needs a Redis server (``RETRYBUS_TEST_REDIS_URL``, default redis://127.0.0.1:6379/0):
without one these tests skip, or fail when CI=true.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from engines.redis import REDIS_URL, open_test_store, ping, store_url
from retrybus import ManualClock, RetryItem
from retrybus._event import Event
from retrybus._outcomes import (
    CorruptRecord,
    Counters,
    DeadLettered,
    Rescheduled,
    Succeeded,
    corrupt_to_dead_letter,
)
from retrybus._records import ErrorInfo, delivery_id
from retrybus._stores.redis import LAYOUT_VERSION, RedisStore
from retrybus._stores.redis.codec import retry_json, to_score

OTHERS = 5_000
MINE = 10


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    async with open_test_store() as store:
        yield store


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test server, to read and write keys by hand."""
    await ping()
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


def pending(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    *,
    owner: str | None = None,
    lease: float = 60.0,
    due_in: float = 0.0,
    attempt: int = 0,
) -> RetryItem:
    """A first delivery (``attempt`` 0) of event ``n`` to ``handler``: leased to
    ``owner`` (a durable publish) or, without one, due in ``due_in`` seconds."""
    now = clock.now()
    event = Event("order.placed", {"n": n}, source="shop", id=f"event-{n}")
    item = RetryItem.for_failure(
        event,
        handler,
        ErrorInfo("", ""),
        attempt=attempt,
        max_retries=3,
        next_retry=now + timedelta(seconds=due_in),
        now=now,
    )
    item = replace(item, id=delivery_id(event.source, event.id, handler))
    if owner is None:
        return item
    return replace(item, lease_owner=owner, lease_until=now + timedelta(seconds=lease), claims=1)


async def claim(
    store: RedisStore,
    clock: ManualClock,
    handlers: list[str] | None,
    *,
    limit: int = 100,
    owner: str = "w",
) -> list[RetryItem]:
    now = clock.now()
    claimed = await store.claim_due(
        now=now,
        limit=limit,
        owner=owner,
        lease_until=now + timedelta(seconds=30),
        handlers=handlers,
    )
    items = [record for record in claimed if isinstance(record, RetryItem)]
    assert len(items) == len(claimed)
    return items


async def commands_of(
    raw: aioredis.Redis, prefix: str, action: Callable[[], Awaitable[Any]]
) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``action`` while MONITOR watches the server: its result, and every command
    that names a key under ``prefix`` (the scripts' own commands are the ``lua`` ones)."""
    sentinel = f"{prefix}-monitor-done"
    seen: list[dict[str, Any]] = []
    async with raw.monitor() as monitor:
        result = await action()
        await raw.echo(sentinel)
        while True:
            command = dict(await asyncio.wait_for(monitor.next_command(), 10))
            if sentinel in command["command"]:
                return result, seen
            if f"{prefix}:" in command["command"]:
                seen.append(command)


# the due set of each handler ---------------------------------------------------------


async def test_a_claim_reads_only_its_handlers_due_set(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    """With 5,000 due records of another handler ahead, claiming 10 of one's own
    returns them, and the script reads none of the other handler's entries."""
    theirs = [pending(clock, n, "mail.send", due_in=-60 + n / 1000) for n in range(OTHERS)]
    # (one script: its commands on each index key take the ids in chunks)
    assert len(await redis_store.record_pending(theirs)) == OTHERS
    mine = [pending(clock, OTHERS + n, "billing.charge", due_in=-1 + n / 100) for n in range(MINE)]
    await redis_store.record_pending(mine)
    prefix = redis_store.prefix

    assert await redis_store.next_due(["billing.charge"]) == mine[0].next_retry
    assert await redis_store.next_due(["mail.send", "billing.charge"]) == theirs[0].next_retry

    claimed, commands = await commands_of(
        raw, prefix, lambda: claim(redis_store, clock, ["billing.charge"], limit=MINE)
    )
    assert [item.id for item in claimed] == [item.id for item in mine]
    assert all(item.claims == 1 for item in claimed)
    script = [c["command"] for c in commands if c["client_type"] == "lua"]
    # a few commands per item claimed, none about the other handler's items
    assert 0 < len(script) <= 8 * MINE, script
    their_ids = {item.id for item in theirs}
    assert not [c for c in script if "mail.send" in c or set(c.split()) & their_ids]
    # the handler's due set was read from its front, once
    ranges = [c for c in script if c.startswith("ZRANGEBYSCORE")]
    assert ranges[0].startswith(f"ZRANGEBYSCORE {prefix}:retry:due:billing.charge ")


async def test_claims_without_a_filter_merge_every_handlers_set_by_due_time(
    redis_store: RedisStore, clock: ManualClock
) -> None:
    items = [
        pending(clock, n, handler, due_in=-100 + n)
        for n, handler in enumerate(["a", "b", "c", "a", "c", "b", "b", "a", "c"])
    ]
    # ids do not follow the order: recorded in reverse
    assert await redis_store.record_pending(items[::-1]) == {item.id for item in items}
    ids = [item.id for item in items]
    assert [i.id for i in await claim(redis_store, clock, None, limit=4)] == ids[:4]
    assert [i.id for i in await claim(redis_store, clock, ["c", "a", "c"], limit=2)] == [
        ids[4],
        ids[7],
    ]
    assert [i.id for i in await claim(redis_store, clock, ["b"])] == [ids[5], ids[6]]
    assert [i.id for i in await claim(redis_store, clock, None)] == [ids[8]]
    assert await claim(redis_store, clock, None) == []


async def test_due_sets_and_handler_names_go_when_their_items_go(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    """Nothing stays behind for a handler whose items are all done: the set of
    handler names lists only handlers with items (claims for every handler read it)."""
    prefix = redis_store.prefix
    leased = [pending(clock, n, "a", owner="publisher") for n in range(3)]
    deferred = [pending(clock, 10 + n, "b", due_in=5) for n in range(3)]
    await redis_store.record_pending([*leased, *deferred])
    assert await raw.smembers(f"{prefix}:retry:handlers") == {"a", "b"}
    # a leased record can be claimed when its lease ends; a deferred one when due
    assert await raw.zscore(f"{prefix}:retry:due:a", leased[0].id) == float(
        to_score(leased[0].lease_until or clock.now())
    )
    assert await raw.zscore(f"{prefix}:retry:due:b", deferred[0].id) == float(
        to_score(deferred[0].next_retry)
    )
    await redis_store.complete([Succeeded(item) for item in leased], "publisher", clock.now())
    assert await raw.smembers(f"{prefix}:retry:handlers") == {"b"}
    assert not await raw.exists(f"{prefix}:retry:due:a")
    clock.advance(5)
    claimed = await claim(redis_store, clock, ["b"])
    dead = claimed[0].to_dead_letter(reason="r", now=clock.now(), attempt=0)
    await redis_store.complete(
        [
            DeadLettered(claimed[0].id, dead, first_delivery=True),
            Rescheduled(
                claimed[1].rescheduled(
                    attempt=1, next_retry=clock.now(), error=ErrorInfo("e", "E"), now=clock.now()
                ),
                first_delivery=True,
            ),
        ],
        "w",
        clock.now(),
    )
    assert await redis_store.delete_retry(claimed[1].id)
    await redis_store.release([claimed[2].id], "w")
    assert await redis_store.delete_retry(claimed[2].id)
    assert await raw.smembers(f"{prefix}:retry:handlers") == set()
    retry_keys = [key async for key in raw.scan_iter(match=f"{prefix}:retry:*")]
    assert retry_keys == []
    assert await redis_store.next_due() is None
    assert await redis_store.counters() == Counters(retry_added=1)


async def test_handler_names_of_any_text_have_their_own_due_set(
    redis_store: RedisStore, clock: ManualClock
) -> None:
    names = ['Mail"er', "Zähler\\n", "a:b", "due:a", "", "x y"]
    items = [pending(clock, n, name, due_in=-n) for n, name in enumerate(names)]
    await redis_store.record_pending(items)
    for item in items:
        assert await redis_store.next_due([item.handler_name]) == item.next_retry
        (claimed,) = await claim(redis_store, clock, [item.handler_name])
        assert claimed.id == item.id


# the claims count -------------------------------------------------------------------


async def test_the_claims_count_lives_beside_the_record(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    """A claim adds one to the count without rewriting the record; a release takes
    one back (none stored at 0); a reschedule and a requeue start from 0."""
    prefix = redis_store.prefix
    item = pending(clock, 1, owner="publisher", lease=10)
    await redis_store.record_pending([item])
    record = await raw.hget(f"{prefix}:retry:items", item.id)
    assert record is not None
    assert "claims" not in json.loads(record)
    assert await raw.hget(f"{prefix}:retry:claim_count", item.id) == "1"
    clock.advance(11)
    (claimed,) = await claim(redis_store, clock, ["h"])
    assert claimed.claims == 2
    assert await raw.hget(f"{prefix}:retry:items", item.id) == record
    assert await redis_store.release([item.id], "w") == 1
    assert await raw.hget(f"{prefix}:retry:claim_count", item.id) == "1"
    assert await redis_store.release([item.id], "w") == 0  # no longer held: unchanged
    (claimed,) = await claim(redis_store, clock, ["h"])
    assert claimed.claims == 2
    retry = claimed.rescheduled(
        attempt=1, next_retry=clock.now(), error=ErrorInfo("e", "E"), now=clock.now()
    )
    assert await redis_store.complete([Rescheduled(retry, first_delivery=True)], "w", clock.now())
    assert not await raw.hexists(f"{prefix}:retry:claim_count", item.id)
    assert (await redis_store.get_retry(item.id)) == retry
    # a leased record of claims 0 (a retry item recorded leased) stays at 0
    other = replace(pending(clock, 2, owner="publisher"), claims=0)
    await redis_store.record_failures([other], [])
    assert await redis_store.release([other.id], "publisher") == 1
    released = await redis_store.get_retry(other.id)
    assert released is not None
    assert (released.claims, released.lease_owner) == (0, None)
    assert await raw.hlen(f"{prefix}:retry:claim_count") == 0


async def test_a_pending_record_that_expires_is_a_dead_letter_of_attempt_zero(
    redis_store: RedisStore, clock: ManualClock
) -> None:
    first = pending(clock, 1, due_in=3600)
    retry = pending(clock, 2, attempt=2)
    await redis_store.record_pending([first])
    await redis_store.record_failures([retry], [])
    clock.advance(10)
    # the retry by its age; the first delivery not before its time
    moved = await redis_store.expire_retry(before=clock.now(), now=clock.now(), reason="expired")
    assert [dead.event_id for dead in moved] == ["event-2"]
    clock.advance(3600)
    moved += await redis_store.expire_retry(before=clock.now(), now=clock.now(), reason="expired")
    assert {dead.event_id: dead.attempt for dead in moved} == {"event-1": 0, "event-2": 1}
    assert await redis_store.next_due() is None


# one script per batch -------------------------------------------------------------------


async def test_a_batch_of_pending_records_is_one_script_and_one_reply_character_each(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    items = [pending(clock, n, f"h{n % 3}", owner="publisher") for n in range(1000)]
    assert await redis_store.record_pending(items[:600:2]) == {item.id for item in items[:600:2]}
    assert await redis_store.record_pending(items) == {
        item.id for n, item in enumerate(items) if n >= 600 or n % 2
    }
    assert await redis_store.retry_count() == 1000
    assert await redis_store.counters() == Counters()
    # (MONITOR's reader takes lines of 64 kB at most: a few dozen records)
    more = [pending(clock, 2000 + n, "h", owner="publisher") for n in range(40)]
    added, commands = await commands_of(
        raw, redis_store.prefix, lambda: redis_store.record_pending(more)
    )
    assert added == {item.id for item in more}
    sent = [c["command"].split()[0] for c in commands if c["client_type"] != "lua"]
    assert sent == ["EVALSHA"]


# the upgrade from key layout 2 ------------------------------------------------------


async def _write_layout_two(raw: aioredis.Redis, prefix: str, item: RetryItem) -> None:
    """``item`` as key layout 2 kept it: in P:retry:ready, or leased in P:retry:leased
    with its claim, and no claims count."""
    pipe = raw.pipeline()
    pipe.hset(f"{prefix}:retry:items", item.id, retry_json(item))
    pipe.zadd(f"{prefix}:retry:next", {item.id: float(to_score(item.next_retry))})
    pipe.zadd(f"{prefix}:retry:created", {item.id: float(to_score(item.created_at))})
    if item.lease_until is None or item.lease_owner is None:
        pipe.zadd(f"{prefix}:retry:ready", {item.id: float(to_score(item.next_retry))})
    else:
        pipe.zadd(f"{prefix}:retry:leased", {item.id: float(to_score(item.lease_until))})
        claim_text = item.updated_at.isoformat(timespec="microseconds") + item.lease_owner
        pipe.hset(f"{prefix}:retry:claims", item.id, claim_text)
    await pipe.execute()


async def test_items_of_layout_two_go_into_their_handlers_due_sets_on_first_use(
    raw: aioredis.Redis, clock: ManualClock
) -> None:
    async with open_test_store() as store:
        prefix = store.prefix
        await raw.set(f"{prefix}:schema", 2)
        ready = [pending(clock, n, ['Mail"er', "b"][n % 2], attempt=1) for n in range(1200)]
        leased = pending(clock, 5000, "b", owner="old-worker", lease=30, attempt=2)
        later = pending(clock, 5001, "c", due_in=60, attempt=1)
        for item in [*ready, leased, later]:
            await _write_layout_two(raw, prefix, replace(item, claims=0))
        # a record that cannot be read: whoever claims first dead-letters it
        await raw.hset(f"{prefix}:retry:items", "retry_broken", "{not json")
        for key in ("retry:next", "retry:ready", "retry:created"):
            await raw.zadd(f"{prefix}:{key}", {"retry_broken": float(to_score(clock.now()))})

        upgraded = RedisStore.from_url(store_url(prefix))
        try:
            await upgraded.connect()
            assert await raw.get(f"{prefix}:schema") == str(LAYOUT_VERSION) == "4"
            assert await raw.zrange(f"{prefix}:retry:ready", 0, -1) == ["retry_broken"]
            assert await raw.zcard(f'{prefix}:retry:due:Mail"er') == 600
            assert await raw.smembers(f"{prefix}:retry:handlers") == {'Mail"er', "b", "c"}
            # old records read back whole, claims 0 (the leased one: its lease)
            assert await upgraded.get_retry(ready[0].id) == replace(ready[0], claims=0)
            assert await upgraded.get_retry(leased.id) == replace(leased, claims=0)
            # (the broken record counts for every handler until a claim takes it)
            assert await upgraded.next_due(["b"]) == ready[1].next_retry
            got = await upgraded.claim_due(
                now=clock.now(),
                limit=2000,
                owner="w",
                lease_until=clock.now() + timedelta(seconds=10),
                handlers=["b"],
            )
            assert {record.id for record in got} == {
                *(item.id for item in ready[1::2]),
                "retry_broken",
            }
            broken = next(r for r in got if isinstance(r, CorruptRecord))
            assert broken.id == "retry_broken"
            letter = corrupt_to_dead_letter(broken, clock.now(), "undecodable record")
            assert await upgraded.complete([DeadLettered(broken.id, letter)], "w", clock.now()) == {
                broken.id
            }
            done = [Succeeded(r) for r in got if isinstance(r, RetryItem)]
            assert len(await upgraded.complete(done, "w", clock.now())) == 600
            # the leased item waits for its lease; the later one for its time
            assert await upgraded.next_due(["b"]) == leased.lease_until
            assert await upgraded.next_due(["c"]) == later.next_retry
            clock.advance(31)
            (taken,) = await claim(upgraded, clock, ["b"], owner="new-worker")
            assert (taken.id, taken.claims, taken.attempt) == (leased.id, 1, 2)
            clock.advance(30)
            assert {i.id for i in await claim(upgraded, clock, ["c"])} == {later.id}
        finally:
            await upgraded.close()


async def test_the_first_claim_upgrades_a_store_not_connected_yet(
    raw: aioredis.Redis, clock: ManualClock
) -> None:
    async with open_test_store() as store:
        prefix = store.prefix
        await raw.set(f"{prefix}:schema", 2)
        leased = pending(clock, 1, owner="old-worker", lease=30, attempt=1)
        await _write_layout_two(raw, prefix, replace(leased, claims=0))
        clock.advance(31)
        fresh = RedisStore.from_url(store_url(prefix))  # not connected: first use upgrades
        try:
            assert [i.id for i in await claim(fresh, clock, ["h"])] == [leased.id]
            assert await raw.get(f"{prefix}:schema") == str(LAYOUT_VERSION)
        finally:
            await fresh.close()


async def test_an_item_an_older_layout_makes_due_moves_to_its_handlers_set(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    """A process of layout 2 still running puts items it releases or reschedules in
    P:retry:ready: the next claim moves each to its handler's due set, claiming it if
    it is one of its handlers; and an item such a process leased is not claimed
    again while its lease runs."""
    prefix = redis_store.prefix
    mine, theirs = pending(clock, 1, "mine", attempt=1), pending(clock, 2, "theirs", attempt=1)
    for item in (mine, theirs):
        await _write_layout_two(raw, prefix, item)
    assert await redis_store.next_due(["mine"]) == mine.next_retry
    assert [i.id for i in await claim(redis_store, clock, ["mine"])] == [mine.id]
    assert await raw.zcard(f"{prefix}:retry:ready") == 0
    assert await raw.zscore(f"{prefix}:retry:due:theirs", theirs.id) is not None
    # an old process claims it: no due set changes; its lease is what counts
    lease = clock.now() + timedelta(seconds=30)
    await raw.zadd(f"{prefix}:retry:leased", {theirs.id: float(to_score(lease))})
    await raw.hset(f"{prefix}:retry:claims", theirs.id, clock.now().isoformat() + "old")
    assert await claim(redis_store, clock, ["theirs"]) == []
    assert await redis_store.next_due(["theirs"]) == lease
    clock.advance(31)
    assert [i.id for i in await claim(redis_store, clock, ["theirs"])] == [theirs.id]


# watching ---------------------------------------------------------------------------


async def test_watch_wakes_a_worker_for_a_deferred_record_at_once(
    clock: ManualClock,
) -> None:
    """A second store object on the same prefix records deferred deliveries due now;
    the watching store hears each and claims it at once (well within a second from
    the start of ``record_pending`` to the claimed item, where a worker without the
    message would wait its check interval; the latency itself is a benchmark's
    figure). A durable publish's leased records publish nothing."""
    async with open_test_store() as watched:
        other = RedisStore.from_url(store_url(watched.prefix))
        await other.connect()
        heard = asyncio.Event()
        stop = await watched.watch(heard.set)
        assert stop is not None
        await asyncio.sleep(0.05)
        heard.clear()  # watch calls on_change once when it (re)subscribes
        took: list[float] = []
        try:
            leased = [pending(clock, 100 + n, owner="publisher") for n in range(3)]
            await other.record_pending(leased)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(heard.wait(), 0.3)
            for n in range(40):
                item = pending(clock, n)
                started = time.perf_counter()
                await other.record_pending([item])
                await asyncio.wait_for(heard.wait(), 2.0)
                heard.clear()
                (claimed,) = await claim(watched, clock, ["h"])
                done = time.perf_counter()
                assert claimed.id == item.id
                took.append(done - started)
            p50 = statistics.median(took)
            print(f"deferred record to claimed item: p50 {p50 * 1e3:.2f} ms")
            assert p50 < 1.0, sorted(took)  # at once, not a check interval later
        finally:
            await stop()
            await other.close()
