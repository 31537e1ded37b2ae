"""Services in the Redis store (key layout 4), beyond tests/test_conformance_services.py:
the upgrade from layout 3 (no retry item moves; every record reads as the default
service's), the keys each service's records get (a default-service record is written
as layout 3 wrote it), claims that read only the lanes asked for, dead letters that a
process of layout 3 still running writes or deletes, the subscription rows, the
fences of ``dead_letter_unsubscribed``, and the walks of ``service_loads``,
``group_retry`` and ``list_retry`` against the memory reference.

Needs a Redis server (``RETRYBUS_TEST_REDIS_URL``, default redis://127.0.0.1:6379/0):
without one these tests skip, or fail when CI=true.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from engines.redis import REDIS_URL, open_test_store, ping, store_url
from retrybus import DeadLetterFilter, ManualClock, RetryItem
from retrybus._event import Event
from retrybus._outcomes import CorruptRecord, Rescheduled, Succeeded
from retrybus._records import DeadLetterItem, ErrorInfo
from retrybus._services import StoredSubscription
from retrybus._stores.memory import MemoryStore
from retrybus._stores.redis import LAYOUT_VERSION, RedisStore
from retrybus._stores.redis import admin as redis_admin
from retrybus._stores.redis import store as redis_store_module
from retrybus._stores.redis.codec import dead_texts, retry_json, to_score


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


def event(n: int, data: Any = None) -> Event:
    return Event("order.placed", {"n": n} if data is None else data, source="shop", id=f"e-{n}")


def pending(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    service: str = "default",
    *,
    due_in: float = 0.0,
    owner: str | None = None,
    data: Any = None,
) -> RetryItem:
    now = clock.now()
    return RetryItem.pending(
        event(n, data),
        handler,
        max_retries=3,
        due=now + timedelta(seconds=due_in),
        now=now,
        lease_owner=owner,
        lease_until=None if owner is None else now + timedelta(seconds=60),
        service=service,
    )


def retry(
    clock: ManualClock, n: int, handler: str = "h", service: str = "default", *, due_in: float = 0
) -> RetryItem:
    now = clock.now()
    return RetryItem.for_failure(
        event(n),
        handler,
        ErrorInfo(f"order {n} not found", "KeyError"),
        attempt=2,
        max_retries=3,
        next_retry=now + timedelta(seconds=due_in),
        now=now,
        service=service,
    )


def dead(
    clock: ManualClock, n: int, handler: str = "h", service: str = "default", **changes: Any
) -> DeadLetterItem:
    letter = DeadLetterItem.for_failure(
        event(n),
        handler,
        ErrorInfo(f"order {n} not found", "KeyError"),
        reason="non-retryable: KeyError",
        attempt=0,
        max_retries=3,
        now=clock.now(),
        service=service,
    )
    return replace(letter, **changes)


async def claim(
    store: RedisStore,
    clock: ManualClock,
    service: str | None,
    handlers: list[str] | None,
    *,
    limit: int = 100,
) -> list[str]:
    now = clock.now()
    got = await store.claim_due(
        now=now,
        limit=limit,
        owner="w",
        lease_until=now + timedelta(seconds=30),
        service=service,
        handlers=handlers,
    )
    return [record.id for record in got]


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


async def snapshot(raw: aioredis.Redis, pattern: str) -> dict[str, Any]:
    """Every key matching ``pattern`` with its content."""
    found: dict[str, Any] = {}
    async for key in raw.scan_iter(match=pattern):
        kind = await raw.type(key)
        if kind == "hash":
            found[key] = await raw.hgetall(key)
        elif kind == "zset":
            found[key] = await raw.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            found[key] = await raw.smembers(key)
        else:
            found[key] = await raw.get(key)
    return found


# layout 3, as it was written ----------------------------------------------------------


async def _write_retry_layout_three(raw: aioredis.Redis, prefix: str, item: RetryItem) -> None:
    """``item`` (of the default service) as key layout 3 keeps it."""
    record = retry_json(item)
    assert "service" not in json.loads(record)  # a default record is layout 3's record
    due = to_score(item.next_retry)
    pipe = raw.pipeline()
    pipe.hset(f"{prefix}:retry:items", item.id, record)
    pipe.zadd(f"{prefix}:retry:next", {item.id: float(due)})
    pipe.zadd(f"{prefix}:retry:created", {item.id: float(to_score(item.created_at))})
    if item.lease_until is not None and item.lease_owner is not None:
        due = max(due, to_score(item.lease_until), key=float)
        pipe.zadd(f"{prefix}:retry:leased", {item.id: float(to_score(item.lease_until))})
        claim_text = item.updated_at.isoformat(timespec="microseconds") + item.lease_owner
        pipe.hset(f"{prefix}:retry:claims", item.id, claim_text)
    if item.claims:
        pipe.hset(f"{prefix}:retry:claim_count", item.id, item.claims)
    pipe.zadd(f"{prefix}:retry:due:{item.handler_name}", {item.id: float(due)})
    pipe.hset(f"{prefix}:retry:handler_of", item.id, item.handler_name)
    pipe.sadd(f"{prefix}:retry:handlers", item.handler_name)
    await pipe.execute()


async def _write_dead_layout_three(
    raw: aioredis.Redis, prefix: str, letter: DeadLetterItem
) -> None:
    """``letter`` (of the default service) as key layout 3's ``put_dead`` indexes it:
    seven index elements, no service set."""
    record, index = dead_texts(letter)
    assert "service" not in json.loads(record)
    seven = json.loads(index)[:7]
    score = float(seven[3])
    pipe = raw.pipeline()
    pipe.hset(f"{prefix}:dead:items", letter.id, record)
    pipe.hset(f"{prefix}:dead:index", letter.id, json.dumps(seven, separators=(",", ":")))
    pipe.zadd(f"{prefix}:dead:created", {letter.id: score})
    for name, value, listed in (
        ("type", seven[0], True),
        ("handler", seven[1], True),
        ("processed", seven[2], False),
        ("reason", seven[4], True),
        ("group", seven[5], True),
    ):
        pipe.zadd(f"{prefix}:dead:{name}:{value}", {letter.id: score})
        if listed:
            pipe.sadd(f"{prefix}:dead:values:{name}", value)
    pipe.zadd(f"{prefix}:dead:events", {f"{letter.event_id}\0{letter.id}": 0})
    await pipe.execute()


async def _delete_dead_as_layout_three(raw: aioredis.Redis, prefix: str, letter_id: str) -> None:
    """What layout 3's ``drop_dead`` does: the record, its entry and the seven fields'
    index sets (it knows no service set)."""
    index = json.loads(await raw.hget(f"{prefix}:dead:index", letter_id) or "[]")
    pipe = raw.pipeline()
    pipe.hdel(f"{prefix}:dead:items", letter_id)
    pipe.hdel(f"{prefix}:dead:index", letter_id)
    pipe.zrem(f"{prefix}:dead:created", letter_id)
    for name, at in (("type", 0), ("handler", 1), ("processed", 2), ("reason", 4), ("group", 5)):
        pipe.zrem(f"{prefix}:dead:{name}:{index[at]}", letter_id)
    pipe.zrem(f"{prefix}:dead:events", f"{index[6]}\0{letter_id}")
    await pipe.execute()


async def test_a_store_of_layout_three_opens_as_layout_four_and_reads_all_as_default(
    raw: aioredis.Redis, clock: ManualClock
) -> None:
    """Records and dead letters written at layout 3: after the upgrade on connect,
    every one reads back whole with service "default", no retry key changed (no item
    moved), and each dead letter is indexed by its service."""
    items = [pending(clock, n, ["a", "b"][n % 2], due_in=-n) for n in range(6)]
    items.append(pending(clock, 6, "a", owner="old-publisher"))
    items.append(retry(clock, 7, "b", due_in=30))
    letters = [dead(clock, 10 + n, ["a", "b"][n % 2], processed=n == 0) for n in range(5)]
    async with open_test_store() as store:
        prefix = store.prefix
        await raw.set(f"{prefix}:schema", 3)
        for item in items:
            await _write_retry_layout_three(raw, prefix, item)
        for letter in letters:
            await _write_dead_layout_three(raw, prefix, letter)
        before = await snapshot(raw, f"{prefix}:retry:*")

        upgraded = RedisStore.from_url(store_url(prefix))
        try:
            await upgraded.connect()
            assert await raw.get(f"{prefix}:schema") == str(LAYOUT_VERSION) == "4"
            assert await snapshot(raw, f"{prefix}:retry:*") == before
            for item in items:
                assert await upgraded.get_retry(item.id) == item
            listed = await upgraded.list_retry(limit=100, offset=0, service="default")
            assert {item.service for item in listed} == {"default"}
            assert len(listed) == len(items)
            assert await upgraded.list_retry(limit=100, offset=0, service="billing") == []
            for letter in letters:
                assert await upgraded.get_dead(letter.id) == letter
            indexes = [json.loads(v) for v in await raw.hvals(f"{prefix}:dead:index")]
            assert {(len(index), index[7]) for index in indexes} == {(8, "default")}
            everything, default = DeadLetterFilter(), DeadLetterFilter(service="default")
            assert await upgraded.count_dead(default) == len(letters)
            assert await upgraded.count_dead(DeadLetterFilter(service="billing")) == 0
            groups = await upgraded.group_dead("service", everything, limit=10)
            assert [(g.key, g.count) for g in groups] == [("default", 5)]
            loads = await upgraded.service_loads(clock.now())
            assert [(x.service, x.handler_name, x.queued, x.leased) for x in loads] == [
                ("default", "a", 4, 1),
                ("default", "b", 4, 0),
            ]
            assert (loads[0].dead_processed, loads[0].dead_unprocessed) == (1, 2)
            # the default service's claims read the due sets layout 3 made
            assert await upgraded.next_due(["a"], service="billing") is None
            assert await upgraded.next_due(["a"], service="default") == items[4].next_retry
            got = await claim(upgraded, clock, "default", ["a", "b"])
            assert set(got) == {item.id for item in items[:6]}
            assert await claim(upgraded, clock, "billing", ["a", "b"]) == []
        finally:
            await upgraded.close()


async def test_each_services_records_get_their_keys_the_defaults_as_layout_three(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    prefix = redis_store.prefix
    mine, theirs = pending(clock, 1), pending(clock, 1, service="billing")
    letter = dead(clock, 2, service="billing")
    await redis_store.record_pending([mine, theirs])
    await redis_store.record_failures([], [letter])
    record = await raw.hget(f"{prefix}:retry:items", mine.id) or ""
    assert "service" not in json.loads(record)
    other = await raw.hget(f"{prefix}:retry:items", theirs.id) or ""
    assert other.endswith(',"service":"billing"}')
    assert await raw.zrange(f"{prefix}:retry:due:h", 0, -1) == [mine.id]
    assert await raw.zrange(f"{prefix}:retry:due:billing\0h", 0, -1) == [theirs.id]
    assert await raw.hget(f"{prefix}:retry:handler_of", theirs.id) == "billing\0h"
    assert await raw.smembers(f"{prefix}:retry:handlers") == {"h", "billing\0h"}
    index = json.loads(await raw.hget(f"{prefix}:dead:index", letter.id) or "")
    assert index[7] == "billing"
    assert await raw.zrange(f"{prefix}:dead:service:billing", 0, -1) == [letter.id]
    assert await raw.smembers(f"{prefix}:dead:values:service") == {"billing"}
    # an outcome keeps the lane; the last one out takes its keys along
    now = clock.now()
    assert await claim(redis_store, clock, "billing", ["h"]) == [theirs.id]
    later = replace(theirs, lease_owner=None, lease_until=None, claims=0)
    later = later.rescheduled(
        attempt=1, next_retry=now + timedelta(seconds=5), error=ErrorInfo("e", "E"), now=now
    )
    assert await redis_store.complete([Rescheduled(later, first_delivery=True)], "w", now)
    assert await raw.zrange(f"{prefix}:retry:due:billing\0h", 0, -1) == [theirs.id]
    assert await redis_store.delete_retry(theirs.id)
    assert await redis_store.complete([Succeeded(mine)], None, now) == {mine.id}
    assert await redis_store.delete_dead(letter.id)
    left = [key async for key in raw.scan_iter(match=f"{prefix}:*")]
    assert sorted(left) == [
        f"{prefix}:counters",
        f"{prefix}:schema",
        f"{prefix}:schema:compatible_from",
    ]


async def test_a_claim_for_a_service_reads_only_its_lanes(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    """5,000 due records of the default service's handler "h" ahead: billing's claim
    for its own "h" reads none of them."""
    theirs = [pending(clock, n, due_in=-60 + n / 1000) for n in range(5_000)]
    assert len(await redis_store.record_pending(theirs)) == 5_000
    mine = [pending(clock, 9_000 + n, service="billing", due_in=-1 + n / 100) for n in range(10)]
    await redis_store.record_pending(mine)
    prefix = redis_store.prefix
    assert await redis_store.next_due(["h"], service="billing") == mine[0].next_retry
    assert await redis_store.next_due(["h"]) == theirs[0].next_retry

    claimed, commands = await commands_of(
        raw, prefix, lambda: claim(redis_store, clock, "billing", ["h"], limit=10)
    )
    assert claimed == [item.id for item in mine]
    script = [c["command"] for c in commands if c["client_type"] == "lua"]
    assert 0 < len(script) <= 80, script
    their_ids = {item.id for item in theirs}
    assert not [c for c in script if f"{prefix}:retry:due:h " in c or set(c.split()) & their_ids]
    assert not [c for c in script if c.startswith("SMEMBERS")]  # lanes named: no lookup


async def test_claims_without_a_service_or_handlers_take_the_lanes_that_match(
    redis_store: RedisStore, clock: ManualClock
) -> None:
    # handler names of any text, in any service; one "a" of each service
    spec = [("default", "a"), ("billing", "a"), ("billing", "b:c"), ("ship.eu", ""), ("x", "a")]
    items = [
        pending(clock, n, handler, service, due_in=-100 + n)
        for n, (service, handler) in enumerate(spec * 2)
    ]
    await redis_store.record_pending(items[::-1])
    ids = [item.id for item in items]
    assert await claim(redis_store, clock, None, ["a"], limit=3) == [ids[0], ids[1], ids[4]]
    assert await claim(redis_store, clock, "billing", None) == [ids[2], ids[6], ids[7]]
    assert await claim(redis_store, clock, "ship.eu", [""]) == [ids[3], ids[8]]
    assert await redis_store.next_due(service="x") == items[9].next_retry
    assert await claim(redis_store, clock, None, None) == [ids[5], ids[9]]
    assert await redis_store.next_due() == clock.now() + timedelta(seconds=30)  # the leases


# dead letters of a process of layout 3 still running ---------------------------------


async def test_dead_letters_a_layout_three_process_writes_or_deletes_are_mended_on_connect(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    prefix = redis_store.prefix
    billing = [dead(clock, n, service="billing") for n in range(3)]
    await redis_store.record_failures([], billing)
    # meanwhile, a process of layout 3 dead-letters two default records and deletes one
    # of billing's (its drop_dead knows no service set)
    old, older = dead(clock, 9), dead(clock, 8)
    await _write_dead_layout_three(raw, prefix, old)
    await _write_dead_layout_three(raw, prefix, older)
    await _delete_dead_as_layout_three(raw, prefix, billing[0].id)
    assert await redis_store.count_dead(DeadLetterFilter(service="billing")) == 3  # stale
    async with RedisStore.from_url(store_url(prefix)) as later:
        assert await later.count_dead(DeadLetterFilter(service="billing")) == 2
        assert await later.count_dead(DeadLetterFilter(service="default")) == 2
        groups = await later.group_dead("service", DeadLetterFilter(), limit=10)
        assert [(g.key, g.count) for g in groups] == [("billing", 2), ("default", 2)]
        index = json.loads(await raw.hget(f"{prefix}:dead:index", old.id) or "")
        assert index[7] == "default"
        # every billing letter gone the old way: the service's set and value go too
        for letter in billing[1:]:
            await _delete_dead_as_layout_three(raw, prefix, letter.id)
    async with RedisStore.from_url(store_url(prefix)) as last:
        assert await last.count_dead(DeadLetterFilter(service="billing")) == 0
        assert await raw.smembers(f"{prefix}:dead:values:service") == {"default"}
        assert not await raw.exists(f"{prefix}:dead:service:billing")


async def test_connect_reads_the_recent_dead_letters_and_the_rest_only_if_counts_differ(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    """Consistent: a store opened reads no index entry but the recent ones. A
    layout-3 process that adds one and deletes another: mended on connect (the added
    one is recent; then a set has one member too many). One whose clock is far behind
    adding a dead letter while another goes: ``migrate()`` mends that."""
    prefix = redis_store.prefix
    letters = [dead(clock, n, service=["billing", "default"][n % 2]) for n in range(4)]
    older = [dead(clock, 20 + n) for n in range(50)]
    for n, letter in enumerate(older):  # created an hour and more before the others
        older[n] = replace(letter, created_at=letter.created_at - timedelta(hours=1, seconds=n))
    await redis_store.record_failures([], [*letters, *older])

    async def open_one() -> None:
        async with RedisStore.from_url(store_url(prefix)) as store:
            await store.health()

    await open_one()  # the first store after these: every dead letter read, once
    _, commands = await commands_of(raw, prefix, open_one)
    assert not [c for c in commands if "SCAN" in c["command"].split()[0]]
    read = [c for c in commands if c["command"].startswith(f"HGET {prefix}:dead:index ")]
    assert len(read) == len(letters)  # the recent ones only

    old = dead(clock, 9)
    await _write_dead_layout_three(raw, prefix, old)
    await _delete_dead_as_layout_three(raw, prefix, letters[0].id)
    _, commands = await commands_of(raw, prefix, open_one)
    assert not [c for c in commands if c["command"].startswith("HSCAN")]
    assert await redis_store.count_dead(DeadLetterFilter(service="default")) == 3 + 50
    assert await redis_store.count_dead(DeadLetterFilter(service="billing")) == 1

    skewed = replace(dead(clock, 10), created_at=clock.now() - timedelta(days=1))
    await _write_dead_layout_three(raw, prefix, skewed)
    await _delete_dead_as_layout_three(raw, prefix, letters[2].id)  # billing's other one
    await open_one()
    assert await redis_store.count_dead(DeadLetterFilter(service="billing")) == 1  # stale
    fixer = RedisStore.from_url(store_url(prefix))
    try:
        assert await fixer.migrate() is None  # (no schema version reported, as before)
    finally:
        await fixer.close()
    assert await redis_store.count_dead(DeadLetterFilter(service="billing")) == 0
    assert await redis_store.count_dead(DeadLetterFilter(service="default")) == 4 + 50


# subscriptions ---------------------------------------------------------------------------


def subscription(handler: str, **terms: Any) -> StoredSubscription:
    stamp = ManualClock().now()
    values: dict[str, Any] = {
        "service": "billing",
        "handler_name": handler,
        "patterns": ("order.*", "zahlung.eingegangen"),
        "policy": "ExponentialBackoff(max_retries=3)",
        "max_retries": 3,
        "handler_timeout": 30.0,
        "registered_at": stamp,
        "updated_at": stamp,
        "details": {"b": 1, "a": {"y": [1, 2], "x": "ü"}},
    }
    values.update(terms)
    return StoredSubscription(**values)


async def test_subscription_terms_compare_as_canonical_json(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    now = clock.now()
    first = await redis_store.put_subscriptions(
        "billing", [subscription("charge")], prune=False, now=now, actor='w/1 "quoted"'
    )
    assert first.added == ("charge",)
    row = await raw.hget(f"{redis_store.prefix}:subs", "billing\0charge")
    assert row is not None
    assert json.loads(row)["terms"]["details"] == {"a": {"x": "ü", "y": [1, 2]}, "b": 1}
    assert await raw.get(f"{redis_store.prefix}:subs:revision") == "1"
    # the same terms in another key order, a whole-number timeout: unchanged
    same = subscription(
        "charge", details={"a": {"x": "ü", "y": [1, 2]}, "b": 1}, handler_timeout=30
    )
    again = await redis_store.put_subscriptions(
        "billing", [same], prune=True, now=now + timedelta(seconds=1), actor="w"
    )
    assert again.unchanged == ("charge",)
    assert not again.wrote
    assert await raw.hget(f"{redis_store.prefix}:subs", "billing\0charge") == row
    # a removal by anyone keeps the actor's text exactly
    await redis_store.remove_subscriptions("billing", None, now=now, actor='ops "bob" \\ /')
    (tombstone,) = await redis_store.list_subscriptions("billing", removed=True)
    assert tombstone.removed_by == 'ops "bob" \\ /'
    assert tombstone.details == {"a": {"x": "ü", "y": [1, 2]}, "b": 1}
    assert tombstone.patterns == ("order.*", "zahlung.eingegangen")


async def test_dead_lettering_the_unsubscribed_moves_only_what_is_still_as_it_read(
    redis_store: RedisStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the read and the move: a handler back, or an item claimed, stays."""
    now = clock.now()
    items = [pending(clock, n, service="billing", due_in=-n) for n in range(3)]
    other = pending(clock, 9, "g", service="billing")
    await redis_store.record_pending([*items, other])
    terms = [subscription("h"), subscription("g")]
    await redis_store.put_subscriptions("billing", terms, prune=False, now=now, actor="w")
    await redis_store.remove_subscriptions("billing", ["h", "g"], now=now, actor="alice")
    run = redis_store._run
    between: list[Callable[[], Awaitable[Any]]] = []

    async def interposed(script: str, *args: Any) -> Any:
        reply = await run(script, *args)
        if script == "unsubscribed_candidates":
            for step in between:
                await step()
        return reply

    monkeypatch.setattr(redis_store, "_run", interposed)
    between.append(
        lambda: redis_store.put_subscriptions(
            "billing", [subscription("g")], prune=False, now=now, actor="w"
        )
    )
    between.append(lambda: claim(redis_store, clock, "billing", ["h"], limit=1))
    moved = await redis_store.dead_letter_unsubscribed(now=now, limit=10)
    # items[2] is due first: the claim took it; "g" came back
    assert [letter.event_id for letter in moved] == ["e-1", "e-0"]
    assert {letter.reason for letter in moved} == {"subscription removed: billing/h (by alice)"}
    between.clear()
    assert await redis_store.dead_letter_unsubscribed(now=now, limit=10) == []
    left = {item.id for item in await redis_store.list_retry(limit=10, offset=0)}
    assert left == {items[2].id, other.id}


async def test_an_undecodable_record_of_a_removed_handler_is_dead_lettered_too(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    item = pending(clock, 1, service="billing")
    await redis_store.record_pending([item])
    await raw.hset(f"{redis_store.prefix}:retry:items", item.id, '{"attempt":0,"id": broken')
    now = clock.now()
    await redis_store.put_subscriptions(
        "billing", [subscription("h")], prune=False, now=now, actor="w"
    )
    await redis_store.remove_subscriptions("billing", None, now=now, actor="a")
    (letter,) = await redis_store.dead_letter_unsubscribed(now=now, limit=10)
    assert letter.reason == "subscription removed: billing/h (by a)"
    assert letter.error_type == "retrybus.CorruptRecord"
    assert await redis_store.retry_count() == 0


# walks against the reference -----------------------------------------------------------


async def _filled(store: RedisStore, clock: ManualClock) -> MemoryStore:
    """The same records of three services in ``store`` and a memory store, some of
    whose events name a service in their data (as "service" keys), some leased."""
    reference = MemoryStore()
    records: list[RetryItem] = []
    for n in range(30):
        service = ["default", "billing", "ship.eu"][n % 3]
        handler = ["h", "g"][n % 2]
        data = {"service": "decoy", "n": n} if n % 4 == 0 else None
        if n % 5 == 0:
            records.append(retry(clock, n, handler, service, due_in=n % 7))
        else:
            owner = "p" if n % 7 == 0 else None
            records.append(
                pending(clock, n, handler, service, due_in=(n % 6) - 3, owner=owner, data=data)
            )
    letters = [
        dead(
            clock,
            100 + n,
            ["h", "g"][n % 2],
            ["default", "billing"][n % 3 % 2],
            processed=n % 4 == 0,
        )
        for n in range(12)
    ]
    for target in (store, reference):
        await target.record_pending([r for r in records if r.attempt == 0])
        await target.record_failures([r for r in records if r.attempt != 0], letters)
    return reference


async def test_service_loads_groups_and_listings_match_the_reference_in_small_chunks(
    redis_store: RedisStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_admin, "GROUP_CHUNK", 4)
    monkeypatch.setattr(redis_admin, "CHUNK", 5)
    reference = await _filled(redis_store, clock)
    for seconds in (0, 2, 120):
        now = clock.now() + timedelta(seconds=seconds)
        assert await redis_store.service_loads(now) == await reference.service_loads(now)
    for by in ("service", "handler_name", "event_type"):
        for limit in (1, 10):
            want = await reference.group_retry(by, limit=limit)  # type: ignore[arg-type]
            assert await redis_store.group_retry(by, limit=limit) == want  # type: ignore[arg-type]
    now = clock.now()
    for service in ("default", "billing", "ship.eu", "nobody"):
        for offset, limit in ((0, 100), (2, 3)):
            for kind in (None, "pending", "retry"):
                got = await redis_store.list_retry(
                    limit=limit, offset=offset, service=service, kind=kind, now=now
                )
                want = await reference.list_retry(
                    limit=limit, offset=offset, service=service, kind=kind, now=now
                )
                assert got == want, (service, offset, limit, kind)


async def test_service_of_records_in_another_field_order_is_read_whole(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    reference = await _filled(redis_store, clock)
    items = await redis_store.list_retry(limit=100, offset=0)
    for item in items[::3]:
        key = f"{redis_store.prefix}:retry:items"
        record = json.loads(await raw.hget(key, item.id) or "")
        reordered = {"service": record.pop("service", "default"), **record}
        await raw.hset(key, item.id, json.dumps(reordered))
    assert await redis_store.group_retry("service", limit=10) == await reference.group_retry(
        "service", limit=10
    )
    now = clock.now()
    assert await redis_store.service_loads(now) == await reference.service_loads(now)
    broken = items[1]
    await raw.hset(f"{redis_store.prefix}:retry:items", broken.id, '{"service": nope')
    groups = {g.key: g.count for g in await redis_store.group_retry("service", limit=10)}
    assert sum(groups.values()) == len(items) - 1  # what cannot be read is not counted
    got = await redis_store.claim_due(
        now=now + timedelta(seconds=60),
        limit=100,
        owner="w",
        lease_until=now + timedelta(seconds=90),
        service=broken.service,
        handlers=[broken.handler_name],
    )
    assert broken.id in {r.id for r in got if isinstance(r, CorruptRecord)}


def test_only_the_subscription_scripts_define_the_subscription_helpers() -> None:
    """Every helper a script defines costs each call of it: the hot paths' scripts
    (publish, claim, complete) define no subscription helper."""
    lua = redis_store_module._LUA
    assert set(lua) >= redis_store_module.SUBSCRIPTION_SCRIPTS
    for name, body in lua.items():
        script = redis_store_module._script(name, body)
        keeps = "local function subscription_row" in script
        assert keeps == (name in redis_store_module.SUBSCRIPTION_SCRIPTS), name
    for name in ("record_pending", "claim_due", "complete", "record_failures"):
        assert "subscription" not in redis_store_module._script(name, lua[name])
