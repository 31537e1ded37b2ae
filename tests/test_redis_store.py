"""What only the Redis store has to show: keys under a prefix, hand-written records,
indexed dead letter browsing, one-line errors, and four worker processes on one queue.

Needs a Redis server (``RETRYBUS_TEST_REDIS_URL``, default redis://127.0.0.1:6379/0):
without one these tests skip, or fail when CI=true.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from call_records import Call, overlapping, read_calls, wait_until
from engines._common import unique_name
from engines.redis import REDIS_URL, delete_prefix, open_test_store, ping, store_url
from retrybus import (
    DeadLetterItem,
    Event,
    EventBus,
    ManualClock,
    RetryItem,
    RetryWorker,
    StoreUnavailable,
    open_store,
)
from retrybus._records import ErrorInfo
from retrybus._stores.base import Counters
from retrybus._stores.memory import MemoryStore
from retrybus._stores.redis import RedisStore, _from_score, _score

APPS = Path(__file__).parent / "apps"
WORKER = APPS / "process_worker.py"
HANDLER = "record_item"


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    async with open_test_store() as store:
        yield store


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test server, to write records by hand."""
    await ping()
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


# times ---------------------------------------------------------------------------


def test_scores_give_back_the_exact_microsecond_and_keep_the_order() -> None:
    rng = random.Random(7)
    base = datetime(2025, 1, 7, tzinfo=UTC)
    moments = [base + timedelta(microseconds=rng.randrange(10**15)) for _ in range(20_000)]
    moments += [base, base + timedelta(microseconds=1), datetime(2255, 1, 1, tzinfo=UTC)]
    for moment in moments:
        assert _from_score(_score(moment)) == moment
    ordered = sorted(moments)
    scores = [float(_score(m)) for m in ordered]
    assert all(a < b for a, b in itertools.pairwise(scores) if a != b)
    assert scores == sorted(scores)
    for a, b in itertools.pairwise(ordered):
        assert (float(_score(a)) < float(_score(b))) == (a < b)


# durability and namespaces ---------------------------------------------------------


async def test_records_survive_closing_and_reopening_the_store(clock: ManualClock) -> None:
    async with open_test_store() as first:
        url = store_url(first.prefix)
        bus = EventBus(first, clock=clock)
        item = await bus.retry_queue.add(
            Event("like.added", {"n": 1, "x": [1.0, {}, []]}, subject="s"), "h", "e"
        )
        other = await bus.retry_queue.add(Event("like.added", {"n": 2}), "h", "e")
        leased = await bus.retry_queue.add(
            Event("like.added", {"n": 3}), "h", "e", next_retry=clock.now()
        )
        [claimed] = await bus.retry_queue.claim_due(10, lease=45, owner="w")
        assert claimed.id == leased.id
        dead = await bus.retry_queue.mark_failed(other)
        assert dead is not None
        stats = await bus.stats()
        await first.close()
        async with open_store(url) as second:
            again = EventBus(second, clock=clock)
            assert await again.retry_queue.get(item.id) == item
            assert await again.retry_queue.get(leased.id) == claimed
            assert await again.dead_letters.get(dead.id) == dead
            assert await again.stats() == stats
        # the first store reconnects after close()
        assert await bus.retry_queue.count() == 2


async def test_two_prefixes_on_one_server_do_not_see_each_other(clock: ManualClock) -> None:
    async with open_test_store() as a, open_test_store() as b:
        await EventBus(a, clock=clock).retry_queue.add(Event("x"), "h", "e")
        assert await b.retry_count() == 0
        assert await a.retry_count() == 1


async def test_every_key_lives_under_the_prefix_and_none_expires(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    bus = EventBus(redis_store, clock=clock)
    item = await bus.retry_queue.add(Event("x", {}), "h", "e", next_retry=clock.now())
    await bus.retry_queue.claim_due(1)
    await bus.dead_letters.add(item, reason="r")
    keys = [key async for key in raw.scan_iter(match=f"{redis_store.prefix}:*")]
    assert len(keys) >= 10
    for key in keys:
        assert await raw.ttl(key) == -1, key


# hand-written records ----------------------------------------------------------------


async def test_a_record_that_cannot_be_decoded_goes_to_the_dlq_and_the_worker_goes_on(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    bus = EventBus(redis_store, clock=clock)
    calls: list[str] = []
    bus.subscribe("x", lambda e: calls.append(e.id), name="h")
    good = await bus.retry_queue.add(Event("x", {"ok": True}), "h", "boom", next_retry=clock.now())
    broken = await bus.retry_queue.add(
        Event("x", {"ok": False}), "h", "boom", next_retry=clock.now()
    )
    prefix = redis_store.prefix
    due = _score(clock.now() - timedelta(seconds=1))
    # bad JSON in place of a stored record
    await raw.hset(f"{prefix}:retry:items", broken.id, '{"attempt":1,"id": not json')
    # records written by hand: one with missing fields, one with a time that is not one
    complete = json.loads(await raw.hget(f"{prefix}:retry:items", good.id) or "")
    hand_written = {
        "retry_hand": json.dumps({"id": "retry_hand", "event_id": "e1", "handler_name": "h"}),
        "retry_when": json.dumps({**complete, "id": "retry_when", "next_retry": "yesterday"}),
    }
    for item_id, text in hand_written.items():
        await raw.hset(f"{prefix}:retry:items", item_id, text)
        for key in ("retry:next", "retry:ready", "retry:created"):
            await raw.zadd(f"{prefix}:{key}", {item_id: float(due)})

    assert await RetryWorker(bus).run_once() == 1
    assert calls == [good.event_id]
    dead = {d.id: d for d in await bus.dead_letters.list()}
    assert set(dead) == {"dlq_hand", "dlq_when", "dlq_" + broken.id.removeprefix("retry_")}
    for item in dead.values():
        assert item.reason.startswith("undecodable record")
        assert item.metadata["raw_record"]
    assert dead["dlq_hand"].event_id == "e1"
    assert dead["dlq_hand"].handler_name == "h"
    assert "event_type" in dead["dlq_hand"].reason
    assert "yesterday" in dead["dlq_when"].reason
    assert dead["dlq_when"].metadata["raw_record"]["event_data"] == '{"ok":true}'
    assert await bus.retry_queue.count() == 0
    assert (await redis_store.counters()).retry_dead_lettered == 3


# the dead letter queue at a few hundred items ---------------------------------------------


def _dead_letters(count: int) -> list[DeadLetterItem]:
    """Dead letters of three types and four handlers, some processed, many sharing a time."""
    rng = random.Random(11)
    base = datetime(2025, 3, 1, tzinfo=UTC)
    letters = []
    for n in range(count):
        created = base + timedelta(seconds=rng.randrange(count // 3))
        event = Event(
            rng.choice(["like.added", "comment.created", "user.deleted"]),
            {"n": n},
            time=created,
        )
        letter = DeadLetterItem.for_failure(
            event,
            rng.choice(["A", "B", "C", "D"]),
            ErrorInfo("boom", "ValueError"),
            reason="failed after 3 retries",
            attempt=3,
            max_retries=3,
            now=created,
        )
        letters.append(replace(letter, processed=rng.random() < 0.3))
    return letters


async def test_dead_letter_filters_and_order_match_the_reference_at_three_hundred_items(
    redis_store: RedisStore,
) -> None:
    letters = _dead_letters(300)
    reference = MemoryStore()
    for start in range(0, len(letters), 100):
        await redis_store.record_failures([], letters[start : start + 100])
        await reference.record_failures([], letters[start : start + 100])
    assert await redis_store.count_dead() == 300
    for processed in (None, True, False):
        assert await redis_store.count_dead(processed) == await reference.count_dead(processed)
    filters = [
        {"event_type": t, "handler_name": h, "processed": p}
        for t in (None, "like.added", "user.deleted", "nope")
        for h in (None, "A", "D")
        for p in (None, True, False)
    ]
    for where in filters:
        for limit, offset in ((1000, 0), (7, 0), (7, 5), (50, 20), (10, 290)):
            got = await redis_store.list_dead(limit=limit, offset=offset, **where)  # type: ignore[arg-type]
            want = await reference.list_dead(limit=limit, offset=offset, **where)  # type: ignore[arg-type]
            assert [d.id for d in got] == [d.id for d in want], (where, limit, offset)
    assert await redis_store.list_dead(limit=1000, offset=0) == await reference.list_dead(
        limit=1000, offset=0
    )


async def test_updating_deleting_and_cleaning_keep_the_dead_letter_indexes_right(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    letters = _dead_letters(200)
    reference = MemoryStore()
    await redis_store.record_failures([], letters)
    await reference.record_failures([], letters)
    for letter in letters[:60]:
        changed = replace(letter, processed=not letter.processed, error="again")
        assert await redis_store.update_dead(changed)
        await reference.update_dead(changed)
    for letter in letters[60:80]:
        assert await redis_store.delete_dead(letter.id)
        await reference.delete_dead(letter.id)
    cutoff = letters[0].created_at + timedelta(seconds=20)
    assert await redis_store.cleanup_dead(cutoff) == await reference.cleanup_dead(cutoff)
    for where in ({}, {"processed": True}, {"handler_name": "B", "processed": False}):
        got = await redis_store.list_dead(limit=1000, offset=0, **where)  # type: ignore[arg-type]
        want = await reference.list_dead(limit=1000, offset=0, **where)  # type: ignore[arg-type]
        assert got == want
    for processed in (None, True, False):
        assert await redis_store.count_dead(processed) == await reference.count_dead(processed)
    # nothing is left behind in the per-value index sets once every letter is gone
    remaining = await redis_store.list_dead(limit=1000, offset=0)
    for letter in remaining:
        assert await redis_store.delete_dead(letter.id)
    keys = [key async for key in raw.scan_iter(match=f"{redis_store.prefix}:dead:*")]
    assert keys == []


# bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/zero", "must be a database number"),
        ("redis://127.0.0.1:6379/0?prefix=a:b", "prefix"),
        ("redis://127.0.0.1:6379/0?prefix=", "prefix"),
        ("redis://127.0.0.1:6379/0?colour=blue", "unknown option 'colour'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://", "no host"),
    ],
)
def test_a_bad_redis_url_raises_value_error_naming_it(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_store(url)
    assert url in str(info.value) or "99999" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_url_never_shows_its_password() -> None:
    with pytest.raises(ValueError, match=r"user:\*\*\*@127\.0\.0\.1") as info:
        open_store("redis://user:s3cret@127.0.0.1:6379/x")
    assert "s3cret" not in str(info.value)


async def test_an_unreachable_server_gives_a_one_line_error_naming_the_url() -> None:
    store = open_store("redis://user:s3cret@127.0.0.1:1/0?prefix=p")
    for operation in (store.connect, store.health, store.retry_count, store.next_due):
        with pytest.raises(StoreUnavailable) as info:
            await operation()
        message = str(info.value)
        assert "redis://user:***@127.0.0.1:1/0?prefix=p" in message
        assert "s3cret" not in message
        assert "\n" not in message
    with pytest.raises(StoreUnavailable):
        await store.claim_due(
            now=datetime.now(UTC), limit=1, owner="o", lease_until=datetime.now(UTC)
        )
    await store.close()


# watching ------------------------------------------------------------------------------


async def test_watch_hears_items_added_by_another_store(clock: ManualClock) -> None:
    async with open_test_store() as watched:
        other = RedisStore.from_url(store_url(watched.prefix))
        heard = asyncio.Event()
        stop = await watched.watch(heard.set)
        assert stop is not None
        await asyncio.sleep(0.05)
        heard.clear()  # watch calls on_change once when it (re)subscribes
        try:
            await EventBus(other, clock=clock).retry_queue.add(Event("x"), "h", "e")
            await asyncio.wait_for(heard.wait(), 2.0)
        finally:
            await stop()
            await other.close()


# four worker processes, ten thousand items -----------------------------------------------

ITEMS = 10_000
WORKER_NAMES = ("w1", "w2", "w3", "w4")


async def seed(url: str, count: int) -> dict[str, Call]:
    """Call a handler that fails for ``count`` events (the first call of each), and
    record a retry item for each, due at once, in batches of 500."""
    calls: dict[str, Call] = {}

    async def fails_the_first_time(event: Event) -> None:
        start = time.time_ns()
        calls[event.id] = Call(event.id, 0, start, time.time_ns())
        raise ConnectionError("the first call fails")

    async with open_store(url) as store:
        now = datetime.now(UTC)
        batch: list[RetryItem] = []
        for n in range(count):
            event = Event("item.created", {"n": n})
            try:
                await fails_the_first_time(event)
            except ConnectionError as exc:
                batch.append(
                    RetryItem.for_failure(
                        event,
                        HANDLER,
                        ErrorInfo.from_exception(exc),
                        attempt=1,
                        max_retries=3,
                        next_retry=now,
                        now=now,
                    )
                )
            if len(batch) == 500:
                await store.record_failures(batch, [])
                batch = []
        if batch:
            await store.record_failures(batch, [])
        assert await store.retry_count() == count
    return calls


@pytest.mark.slow
def test_four_worker_processes_handle_ten_thousand_items_exactly_once_each(
    tmp_path: Path,
) -> None:
    asyncio.run(ping())
    prefix = unique_name()
    url = store_url(prefix)
    try:
        started = time.monotonic()
        publish_calls = asyncio.run(seed(url, ITEMS))
        seeded = time.monotonic()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        go = tmp_path / "go"
        try:
            for name in WORKER_NAMES:
                with (tmp_path / f"{name}.log").open("wb") as log:
                    procs[name] = subprocess.Popen(
                        [
                            sys.executable,
                            str(WORKER),
                            "--store",
                            url,
                            "--record",
                            str(tmp_path / f"{name}.calls"),
                            "--name",
                            name,
                            "--batch-size=50",
                            "--concurrency=8",
                            "--lease=30",
                            "--sleep-min=0",
                            "--sleep-max=0.001",
                            "--until-empty",
                            f"--ready={tmp_path / name}.ready",
                            f"--go={go}",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
            wait_until(
                lambda: all((tmp_path / f"{name}.ready").exists() for name in WORKER_NAMES),
                "every worker process has connected",
            )
            go.touch()
            exit_codes = {name: procs[name].wait(90) for name in WORKER_NAMES}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finished = time.monotonic()
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in WORKER_NAMES}
        assert exit_codes == dict.fromkeys(WORKER_NAMES, 0), logs

        worker_calls = [c for name in WORKER_NAMES for c in read_calls(tmp_path / f"{name}.calls")]
        # every item handled exactly twice: its failing first call, then once by a worker
        retries = Counter(call.event_id for call in worker_calls)
        assert set(retries) == set(publish_calls)
        assert {event_id: n for event_id, n in retries.items() if n != 1} == {}
        assert all(call.end is not None for call in worker_calls)
        # never by two at once
        by_item: dict[str, list[Call]] = defaultdict(list)
        for call in [*publish_calls.values(), *worker_calls]:
            by_item[call.event_id].append(call)
        clashes = {event_id: overlapping(calls) for event_id, calls in by_item.items()}
        assert {event_id: pairs for event_id, pairs in clashes.items() if pairs} == {}
        # all four took part
        per_pid = Counter(call.pid for call in worker_calls)
        assert len(per_pid) == 4
        assert min(per_pid.values()) >= ITEMS // 20, per_pid

        async def after() -> tuple[int, int, Counters]:
            async with open_store(url) as store:
                return await store.retry_count(), await store.count_dead(), await store.counters()

        retry_count, dead_count, counters = asyncio.run(after())
        assert (retry_count, dead_count) == (0, 0)
        assert counters.retry_added == ITEMS
        assert counters.retry_succeeded == ITEMS
        assert counters.retry_dead_lettered == 0
        print(
            f"seeded {ITEMS} in {seeded - started:.1f}s; 4 workers handled them in "
            f"{finished - seeded:.1f}s ({ITEMS / (finished - seeded):.0f} items/s)"
        )
    finally:
        asyncio.run(delete_prefix(prefix))
