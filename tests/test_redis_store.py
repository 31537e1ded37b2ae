"""What only the Redis store has to show: keys under a prefix, indexed dead letter
queries (and the back-fill of dead letters of the previous key layout), retry queue
breakdowns, control records, and watching.

Needs a Redis server (``RETRYBUS_TEST_REDIS_URL``, default redis://127.0.0.1:6379/0):
without one these tests skip, or fail when CI=true. Reopening a prefix, two prefixes
on one server, damaged records, bad URLs, an unreachable server and four worker
processes on one queue: tests/test_conformance_engines.py, for every engine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from engines.redis import REDIS_URL, open_test_store, ping, store_url
from retrybus import (
    DeadLetterFilter,
    DeadLetterItem,
    Event,
    EventBus,
    ManualClock,
    open_store,
)
from retrybus._records import ErrorInfo
from retrybus._stores.base import DEAD_LETTER_GROUP_FIELDS
from retrybus._stores.memory import MemoryStore
from retrybus._stores.redis import LAYOUT_VERSION, RedisStore
from retrybus._stores.redis import admin as redis_admin
from retrybus._stores.redis.codec import dead_json, from_score, to_score


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
        assert from_score(to_score(moment)) == moment
    ordered = sorted(moments)
    scores = [float(to_score(m)) for m in ordered]
    assert all(a < b for a, b in itertools.pairwise(scores) if a != b)
    assert scores == sorted(scores)
    for a, b in itertools.pairwise(ordered):
        assert (float(to_score(a)) < float(to_score(b))) == (a < b)


# keys under the prefix ---------------------------------------------------------------


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


# the dead letter queue at a few hundred items ---------------------------------------------


def _dead_letters(count: int) -> list[DeadLetterItem]:
    """Dead letters of three types, four handlers, three reasons and a few failure groups,
    some processed, many sharing a time, some events failing in two handlers, most of
    the default service and some of two others."""
    rng = random.Random(11)
    base = datetime(2025, 3, 1, tzinfo=UTC)
    letters = []
    events: list[Event] = []
    for n in range(count):
        created = base + timedelta(seconds=rng.randrange(count // 3))
        if events and rng.random() < 0.2:
            event = rng.choice(events)  # the same event failed in another handler too
        else:
            event = Event(
                rng.choice(["like.added", "comment.created", "user.deleted"]),
                {"n": n},
                time=created,
            )
            events.append(event)
        error = rng.choice(
            [
                ErrorInfo(f"order {n} not found", "KeyError"),
                ErrorInfo(f"smtp 10.0.0.{n % 200}:25 refused", "ConnectionError"),
                ErrorInfo("boom", "ValueError"),
            ]
        )
        letter = DeadLetterItem.for_failure(
            event,
            rng.choice(["A", "B", "C", "D"]),
            error,
            reason=rng.choice(
                ["failed after 3 retries", "non-retryable: ValueError", "expired in retry queue"]
            ),
            attempt=3,
            max_retries=3,
            now=created,
            service=rng.choice(["default", "default", "billing", "shipping.eu"]),
        )
        letters.append(replace(letter, processed=rng.random() < 0.3))
    return letters


def _filters(letters: list[DeadLetterItem]) -> list[DeadLetterFilter]:
    """Every kind of filter, alone and combined, some matching nothing."""
    sample = letters[len(letters) // 2]
    middle = sample.created_at
    shared_event = Counter(letter.event_id for letter in letters).most_common(1)[0][0]
    filters = [
        DeadLetterFilter(event_type=t, handler_name=h, processed=p)
        for t in (None, "like.added", "nope")
        for h in (None, "A", "D")
        for p in (None, True, False)
    ]
    filters += [
        DeadLetterFilter(reason="expired in retry queue"),
        DeadLetterFilter(reason="expired in retry queue", handler_name="B", processed=False),
        DeadLetterFilter(failure_group=sample.failure_group),
        DeadLetterFilter(failure_group=sample.failure_group, created_before=middle),
        DeadLetterFilter(failure_group=sample.failure_group, event_type=sample.event_type),
        DeadLetterFilter(created_after=middle),
        DeadLetterFilter(created_before=middle),
        DeadLetterFilter(created_after=middle, created_before=middle),
        DeadLetterFilter(
            created_after=middle - timedelta(seconds=20), created_before=middle, handler_name="C"
        ),
        DeadLetterFilter(event_id=shared_event),
        DeadLetterFilter(event_id=shared_event, created_after=middle),
        DeadLetterFilter(event_id=sample.event_id, handler_name=sample.handler_name),
        DeadLetterFilter(event_id="no-such-event"),
        DeadLetterFilter(failure_group="grp_0000000000000000"),
        DeadLetterFilter(service="billing"),
        DeadLetterFilter(service="default", handler_name="A", processed=False),
        DeadLetterFilter(service="shipping.eu", created_before=middle),
        DeadLetterFilter(service=sample.service, failure_group=sample.failure_group),
        DeadLetterFilter(service="billing", event_id=shared_event),
        DeadLetterFilter(service="nobody"),
    ]
    return filters


def _cursor_filters(letters: list[DeadLetterItem]) -> list[DeadLetterFilter]:
    """Keyset cursors: at a letter, between two ids of one time, below and above every
    id of a time, before every letter, and combined with the other fields."""
    sample = letters[len(letters) // 2]
    middle = sample.created_at
    shared_event = Counter(letter.event_id for letter in letters).most_common(1)[0][0]
    tied = Counter(letter.created_at for letter in letters).most_common(1)[0][0]
    tied_ids = sorted(letter.id for letter in letters if letter.created_at == tied)
    cursors = [
        (middle, sample.id),
        (tied, tied_ids[len(tied_ids) // 2]),
        (tied, tied_ids[0][:-1] + "!"),  # below every id of that time
        (tied, tied_ids[-1] + "~"),  # above every id of that time
        (middle + timedelta(microseconds=1), ""),
        (letters[0].created_at - timedelta(days=1), "dlq_z"),  # before them all
    ]
    return [
        *(DeadLetterFilter(cursor=cursor) for cursor in cursors),
        DeadLetterFilter(cursor=(tied, tied_ids[1]), handler_name="A"),
        DeadLetterFilter(cursor=(middle, sample.id), handler_name="B", processed=False),
        DeadLetterFilter(cursor=(middle, sample.id), created_after=middle),
        DeadLetterFilter(cursor=(middle, sample.id), created_before=middle),
        DeadLetterFilter(cursor=(middle, sample.id), created_before=middle + timedelta(seconds=9)),
        DeadLetterFilter(cursor=(middle, sample.id), failure_group=sample.failure_group),
        DeadLetterFilter(cursor=(middle, sample.id), event_id=shared_event),
        DeadLetterFilter(cursor=(tied, tied_ids[-1]), event_id=sample.event_id),
        DeadLetterFilter(cursor=(middle, sample.id), service="default"),
    ]


async def _assert_like_the_reference(
    store: RedisStore, reference: MemoryStore, where: DeadLetterFilter
) -> None:
    assert await store.count_dead(where) == await reference.count_dead(where), where
    for limit, offset in ((1000, 0), (7, 0), (7, 5), (50, 20), (10, 290)):
        got = await store.list_dead(where, limit=limit, offset=offset)
        want = await reference.list_dead(where, limit=limit, offset=offset)
        assert [d.id for d in got] == [d.id for d in want], (where, limit, offset)
    for by in DEAD_LETTER_GROUP_FIELDS:
        for limit in (1, 3, 100):
            got_groups = await store.group_dead(by, where, limit=limit)  # type: ignore[arg-type]
            want_groups = await reference.group_dead(by, where, limit=limit)  # type: ignore[arg-type]
            assert got_groups == want_groups, (by, where, limit)


async def test_dead_letter_queries_match_the_reference_at_three_hundred_items(
    redis_store: RedisStore,
) -> None:
    letters = _dead_letters(300)
    reference = MemoryStore()
    for start in range(0, len(letters), 100):
        await redis_store.record_failures([], letters[start : start + 100])
        await reference.record_failures([], letters[start : start + 100])
    assert await redis_store.count_dead(DeadLetterFilter()) == 300
    for where in [*_filters(letters), *_cursor_filters(letters)]:
        await _assert_like_the_reference(redis_store, reference, where)
    everything = DeadLetterFilter()
    assert await redis_store.list_dead(everything, limit=1000, offset=0) == (
        await reference.list_dead(everything, limit=1000, offset=0)
    )
    # paging by cursor through many equally old letters sees each one once, in order
    for where in (everything, DeadLetterFilter(handler_name="C", processed=False)):
        seen: list[str] = []
        page_where = where
        while page := await redis_store.list_dead(page_where, limit=7, offset=0):
            seen += [d.id for d in page]
            page_where = replace(where, cursor=(page[-1].created_at, page[-1].id))
        want = await reference.list_dead(where, limit=1000, offset=0)
        assert seen == [d.id for d in want]


async def test_updating_deleting_and_cleaning_keep_the_dead_letter_indexes_right(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    letters = _dead_letters(200)
    reference = MemoryStore()
    await redis_store.record_failures([], letters)
    await reference.record_failures([], letters)
    for n, letter in enumerate(letters[:60]):
        # a reprocess changes the error, so the failure group; a reason change moves it too
        changed = replace(
            letter,
            processed=not letter.processed,
            error=f"again {n}",
            error_type="RuntimeError",
            reason="reprocessed" if n % 3 == 0 else letter.reason,
        )
        assert changed.failure_group != letter.failure_group
        assert await redis_store.update_dead(changed)
        await reference.update_dead(changed)
    for letter in letters[60:80]:
        assert await redis_store.delete_dead(letter.id)
        await reference.delete_dead(letter.id)
    ids = [letter.id for letter in letters[80:90]] + ["dlq_missing", letters[80].id]
    assert await redis_store.delete_dead_many(ids) == await reference.delete_dead_many(ids) == 10
    cutoff = letters[0].created_at + timedelta(seconds=20)
    assert await redis_store.cleanup_dead(cutoff) == await reference.cleanup_dead(cutoff)
    for where in [
        *_filters(letters),
        *_cursor_filters(letters),
        DeadLetterFilter(reason="reprocessed"),
    ]:
        await _assert_like_the_reference(redis_store, reference, where)
    old_group = DeadLetterFilter(failure_group=letters[0].failure_group)
    assert letters[0].id not in {
        d.id for d in await redis_store.list_dead(old_group, limit=1000, offset=0)
    }
    # nothing is left behind in the per-value index sets once every letter is gone
    remaining = await redis_store.list_dead(DeadLetterFilter(), limit=1000, offset=0)
    assert await redis_store.delete_dead_many([letter.id for letter in remaining]) == len(remaining)
    keys = [key async for key in raw.scan_iter(match=f"{redis_store.prefix}:dead:*")]
    assert keys == []
    assert await redis_store.group_dead("failure_group", DeadLetterFilter(), limit=10) == []


async def _write_layout_one(raw: aioredis.Redis, prefix: str, letter: DeadLetterItem) -> None:
    """Write a dead letter as the previous version of the store did: no reason, failure
    group or event id index, no value sets."""
    score = to_score(letter.created_at)
    index = json.dumps(
        [letter.event_type, letter.handler_name, int(letter.processed), score],
        separators=(",", ":"),
    )
    async with raw.pipeline(transaction=True) as pipe:
        pipe.hset(f"{prefix}:dead:items", letter.id, dead_json(letter))
        pipe.hset(f"{prefix}:dead:index", letter.id, index)
        for key in (
            "dead:created",
            f"dead:type:{letter.event_type}",
            f"dead:handler:{letter.handler_name}",
            f"dead:processed:{int(letter.processed)}",
        ):
            pipe.zadd(f"{prefix}:{key}", {letter.id: float(score)})
        await pipe.execute()


async def test_dead_letters_of_layout_one_get_the_new_indexes_on_first_use(
    raw: aioredis.Redis,
) -> None:
    """Dead letters as the previous version wrote them (and no layout version) are
    back-filled when a store connects, in batches."""
    # more than one HSCAN batch; all of the default service, as layout 1 knew no other
    letters = [replace(letter, service="default") for letter in _dead_letters(1200)]
    reference = MemoryStore()
    await reference.record_failures([], letters)
    async with open_test_store() as store:
        prefix = store.prefix
        await raw.delete(f"{prefix}:schema")
        for letter in letters:
            await _write_layout_one(raw, prefix, letter)
        async with open_store(store_url(prefix)) as upgraded:
            assert isinstance(upgraded, RedisStore)
            assert await raw.get(f"{prefix}:schema") == str(LAYOUT_VERSION)
            indexes = await raw.hvals(f"{prefix}:dead:index")
            assert {len(json.loads(index)) for index in indexes} == {8}
            for where in _filters(letters)[-12:]:
                await _assert_like_the_reference(upgraded, reference, where)
            assert await upgraded.count_dead(DeadLetterFilter(service="default")) == 1200
        # one an older process writes later is indexed by the next store to start
        # (tests/test_redis_services.py: the quick check that decides it)
        extra = _dead_letters(3)[0]
        await _write_layout_one(raw, prefix, extra)
        async with open_store(store_url(prefix)) as later:
            assert isinstance(later, RedisStore)
            index = await raw.hget(f"{prefix}:dead:index", extra.id)
            assert index is not None
            assert len(json.loads(index)) == 8


async def test_a_damaged_dead_letter_of_layout_one_is_indexed_as_it_is_shown(
    raw: aioredis.Redis,
) -> None:
    letter = _dead_letters(3)[0]
    async with open_test_store() as store:
        await raw.delete(f"{store.prefix}:schema")
        await _write_layout_one(raw, store.prefix, letter)
        await raw.hset(f"{store.prefix}:dead:items", letter.id, "{not json")
        async with open_store(store_url(store.prefix)) as upgraded:
            shown = await upgraded.get_dead(letter.id)
            assert shown is not None
            assert shown.reason == "undecodable dead letter"
            for where in (
                DeadLetterFilter(reason=shown.reason),
                DeadLetterFilter(failure_group=shown.failure_group),
            ):
                assert [d.id for d in await upgraded.list_dead(where, limit=5, offset=0)] == [
                    letter.id
                ]


async def test_a_lazy_upgrade_runs_before_the_first_query(raw: aioredis.Redis) -> None:
    letter = _dead_letters(3)[0]
    async with open_test_store() as store:
        prefix = store.prefix
        await raw.delete(f"{prefix}:schema")
        score = to_score(letter.created_at)
        await raw.hset(f"{prefix}:dead:items", letter.id, dead_json(letter))
        await raw.hset(
            f"{prefix}:dead:index",
            letter.id,
            json.dumps([letter.event_type, letter.handler_name, 0, score]),
        )
        await raw.zadd(f"{prefix}:dead:created", {letter.id: float(score)})
        fresh = RedisStore.from_url(store_url(prefix))  # not connected: first use upgrades
        try:
            groups = await fresh.group_dead("failure_group", DeadLetterFilter(), limit=5)
            assert [(g.key, g.count, g.sample_id) for g in groups] == [
                (letter.failure_group, 1, letter.id)
            ]
        finally:
            await fresh.close()


# retry queue breakdowns ------------------------------------------------------------------


async def test_group_retry_reads_records_of_any_field_order_and_escaped_names(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    bus = EventBus(redis_store, clock=clock)
    reference = MemoryStore()
    names = ['Mail"er', "Zähler\\n", "plain", "back\\slash\\"]
    items = []
    for n in range(40):
        event = Event(["a.x", "b/y", 'c"z'][n % 3], {"n": n, "handler_name": "decoy"})
        due = clock.now() + timedelta(seconds=n % 7)
        item = await bus.retry_queue.add(event, names[n % 4], "boom", next_retry=due)
        await reference.record_failures([item], [])
        items.append(item)
    # records written by the previous version: handler_name after the event fields
    for item in items[::5]:
        text = await raw.hget(f"{redis_store.prefix}:retry:items", item.id)
        assert text is not None
        record = json.loads(text)
        reordered = {
            "attempt": record.pop("attempt"),
            "id": record.pop("id"),
            "event_id": record.pop("event_id"),
        }
        reordered.update(record)
        await raw.hset(f"{redis_store.prefix}:retry:items", item.id, json.dumps(reordered))
    for by in ("handler_name", "event_type"):
        for limit in (1, 2, 10):
            got = await redis_store.group_retry(by, limit=limit)
            want = await reference.group_retry(by, limit=limit)
            assert got == want, (by, limit)


async def test_group_retry_walks_the_queue_in_chunks(
    redis_store: RedisStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_admin, "GROUP_CHUNK", 3)
    reference = MemoryStore()
    bus = EventBus(redis_store, clock=clock)
    for n in range(20):
        due = clock.now() + timedelta(seconds=n % 4)
        item = await bus.retry_queue.add(Event(f"t{n % 2}"), f"h{n % 3}", "e", next_retry=due)
        await reference.record_failures([item], [])
    for by in ("handler_name", "event_type"):
        want = await reference.group_retry(by, limit=10)
        assert await redis_store.group_retry(by, limit=10) == want


async def test_kinds_walk_the_queue_in_chunks_and_read_records_of_any_field_order(
    redis_store: RedisStore,
    raw: aioredis.Redis,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_admin, "GROUP_CHUNK", 3)
    monkeypatch.setattr(redis_admin, "CHUNK", 4)
    reference = MemoryStore()
    bus = EventBus(redis_store, clock=clock)
    bus.subscribe("t", lambda event: None, name="h")
    for n in range(12):
        await bus.publish(Event("t", {"n": n}), deliver_in=(n % 5) * 10 + 1)
        due = clock.now() + timedelta(seconds=(n % 4) * 10)
        await bus.retry_queue.add(Event("t", {"n": n}), "h", "e", next_retry=due)
    items = await redis_store.list_retry(limit=100, offset=0)
    assert len(items) == 24
    await reference.record_failures(items, [])
    # records written by an older version: attempt not first (decoded whole)
    for item in items[::3]:
        text = await raw.hget(f"{redis_store.prefix}:retry:items", item.id)
        assert text is not None
        record = json.loads(text)
        record["attempt"] = record.pop("attempt")
        await raw.hset(f"{redis_store.prefix}:retry:items", item.id, json.dumps(record))
    for seconds in (0, 11, 25, 60):
        now = clock.now() + timedelta(seconds=seconds)
        assert await redis_store.count_retry_kinds(now) == await reference.count_retry_kinds(now)
        for kind in ("retry", "pending", "scheduled"):
            for offset, limit in ((0, 100), (1, 3), (5, 2)):
                got = await redis_store.list_retry(limit=limit, offset=offset, kind=kind, now=now)
                want = await reference.list_retry(limit=limit, offset=offset, kind=kind, now=now)
                assert [i.id for i in got] == [i.id for i in want], (seconds, kind, offset)
    cancellable = next(item for item in items[::3] if item.first_delivery)
    assert await redis_store.cancel_delivery(cancellable.id, now=clock.now()) is True
    retried = next(item for item in items[::3] if not item.first_delivery)
    assert await redis_store.cancel_delivery(retried.id, now=clock.now()) is False


# control records -----------------------------------------------------------------------


async def test_control_records_compare_and_set_across_connections(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    others = [RedisStore.from_url(store_url(redis_store.prefix)) for _ in range(6)]
    try:
        assert await redis_store.put_control("race", {"n": 0}, version=0) == 1
        results = await asyncio.gather(
            *(store.put_control("race", {"n": n}, version=1) for n, store in enumerate(others, 1))
        )
        assert [r for r in results if r is not None] == [2]
        record = await redis_store.get_control("race")
        assert record is not None
        winner = results.index(2) + 1
        assert (record.version, dict(record.value)) == (2, {"n": winner})
    finally:
        for store in others:
            await store.close()
    keys = {key async for key in raw.scan_iter(match=f"{redis_store.prefix}:control:*")}
    assert keys == {
        f"{redis_store.prefix}:control:index",
        f"{redis_store.prefix}:control:rec:race",
    }
    assert await redis_store.delete_control("race")
    assert [key async for key in raw.scan_iter(match=f"{redis_store.prefix}:control:*")] == []


async def test_list_control_takes_exactly_the_keys_with_the_prefix(
    redis_store: RedisStore,
) -> None:
    keys = ["a", "a:", "a:b", "a:\u00e9", "a:\U0001f600", "a;", "a\x00", "b", "ä:1", "ä:2", ""]
    for key in keys:
        assert await redis_store.put_control(key, {"k": key}, version=0) == 1
    for prefix in ("", "a", "a:", "ä", "ä:", "a:\U0001f600", "z", "a:b:c"):
        listed = await redis_store.list_control(prefix)
        want = sorted(key for key in keys if key.startswith(prefix))
        assert [record.key for record in listed] == want, prefix
        assert [dict(record.value) for record in listed] == [{"k": key} for key in want]


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
