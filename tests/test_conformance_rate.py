"""``Store.take_tokens``, as every engine must answer it: a token bucket shared
by every taker of a key (a handler's global rate limit), which never grants more
than ``burst + rate * elapsed`` however many take at once."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import ENGINES, STORE_KINDS, fresh_store
from retrybus import Store, open_store

START = datetime(2025, 1, 7, 10, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(kind, tmp_path) as opened:
        yield opened


async def test_a_new_bucket_is_full_and_grants_at_most_its_burst(store: Store) -> None:
    assert await store.take_tokens("rate:s:h", want=5, rate=10.0, burst=3.0, now=at(0)) == 3
    assert await store.take_tokens("rate:s:h", want=5, rate=10.0, burst=3.0, now=at(0)) == 0


async def test_the_bucket_refills_at_its_rate_in_whole_tokens(store: Store) -> None:
    key = "rate:s:h"
    assert await store.take_tokens(key, want=4, rate=4.0, burst=4.0, now=at(0)) == 4
    assert await store.take_tokens(key, want=4, rate=4.0, burst=4.0, now=at(0.2)) == 0  # 0.8
    assert await store.take_tokens(key, want=4, rate=4.0, burst=4.0, now=at(0.55)) == 2  # 2.2
    assert await store.take_tokens(key, want=1, rate=4.0, burst=4.0, now=at(0.8)) == 1  # 1.2


async def test_a_quiet_bucket_fills_up_to_its_burst_only(store: Store) -> None:
    key = "rate:s:h"
    assert await store.take_tokens(key, want=2, rate=100.0, burst=2.0, now=at(0)) == 2
    assert await store.take_tokens(key, want=50, rate=100.0, burst=2.0, now=at(3600)) == 2


async def test_a_taker_whose_clock_is_behind_mints_no_tokens(store: Store) -> None:
    key = "rate:s:h"
    assert await store.take_tokens(key, want=10, rate=10.0, burst=10.0, now=at(5)) == 10
    # earlier than the last take: no refill (the bucket's time stays at 5 s)
    assert await store.take_tokens(key, want=10, rate=10.0, burst=10.0, now=at(1)) == 0
    assert await store.take_tokens(key, want=10, rate=10.0, burst=10.0, now=at(5.5)) == 5


async def test_want_zero_takes_nothing_and_bad_arguments_are_refused(store: Store) -> None:
    assert await store.take_tokens("rate:s:h", want=0, rate=1.0, burst=1.0, now=at(0)) == 0
    assert await store.take_tokens("rate:s:h", want=1, rate=1.0, burst=1.0, now=at(0)) == 1
    with pytest.raises(ValueError, match="want"):
        await store.take_tokens("rate:s:h", want=-1, rate=1.0, burst=1.0, now=at(0))
    with pytest.raises(ValueError, match="rate"):
        await store.take_tokens("rate:s:h", want=1, rate=0.0, burst=1.0, now=at(0))
    with pytest.raises(ValueError, match="burst"):
        await store.take_tokens("rate:s:h", want=1, rate=1.0, burst=0.5, now=at(0))


async def test_keys_have_buckets_of_their_own_kept_as_control_records(store: Store) -> None:
    assert await store.take_tokens("rate:s:a", want=3, rate=1.0, burst=3.0, now=at(0)) == 3
    assert await store.take_tokens("rate:s:b", want=3, rate=1.0, burst=3.0, now=at(0)) == 3
    assert [r.key for r in await store.list_control("rate:s:")] == ["rate:s:a", "rate:s:b"]


async def test_concurrent_takers_never_get_more_than_burst_plus_rate_times_elapsed(
    kind: str, store: Store
) -> None:
    """Many takers at once, on two store objects where the engine shares a
    namespace between them (as processes do), with times handed out in order
    but written in any order."""
    rate, burst, step = 50.0, 5.0, 0.004  # 0.2 tokens a take-time step
    stores = [store]
    second = None
    if ENGINES[kind].FEATURES.shared_across_processes:
        second = open_store(ENGINES[kind].namespace_url(store))
        await second.connect()
        stores.append(second)
    ticks = itertools.count()
    granted: list[int] = []
    latest = [0.0]
    chance = random.Random(16)

    async def taker(n: int) -> None:
        target = stores[n % len(stores)]
        for _ in range(15):
            seconds = next(ticks) * step
            latest[0] = max(latest[0], seconds)
            granted.append(
                await target.take_tokens(
                    "rate:s:h", want=chance.randint(1, 3), rate=rate, burst=burst, now=at(seconds)
                )
            )

    try:
        await asyncio.gather(*(taker(n) for n in range(12)))
    finally:
        if second is not None:
            await second.close()
    bound = burst + rate * latest[0]
    assert sum(granted) <= bound
    assert sum(granted) >= burst  # the takers did get tokens
