"""What rate limits and concurrency limits cost: the local bookkeeping of a
call (a concurrency slot taken and given back, a token spent from what the
worker holds), a handler call behind ``max_concurrency``, and a worker's claim
of a rate-limited handler (tokens from the store's bucket, then the claim).

Figures:
  rate_local_bookkeeping        µs per call: a ConcurrencyLimit slot in and out and
                                a token spent from a TokenAllowance
  rate_gate_call_overhead       µs per call: ``Subscription.call`` of an async handler
                                with ``max_concurrency``, minus without
  rate_take_tokens_sqlite       µs per ``Store.take_tokens`` (compare-and-set row)
  rate_take_tokens_redis        µs per ``Store.take_tokens`` (one Lua script; skipped
                                without the server at RETRYBUS_BENCH_REDIS_URL)
  rate_claim_with_tokens_sqlite ms per claim of 10 due records of a rate-limited
                                handler (tokens, then the claim)
  rate_claim_plain_sqlite       ms per claim of 10 due records without a rate

Run alone: .venv/bin/python bench/rate.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import Figure, emit, note

import retrybus
from retrybus import Event, EventBus, Rate, RetryItem, Store
from retrybus._concurrency import ConcurrencyLimit
from retrybus._flow import ClaimFlow
from retrybus._rate import TokenAllowance

REDIS = os.environ.get("RETRYBUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def local_bookkeeping(calls: int, rounds: int) -> float:
    limit = ConcurrencyLimit(8)
    allowance = TokenAllowance()
    samples = []
    for _ in range(rounds):
        allowance.add(calls, until=float("inf"))
        start = time.perf_counter()
        for _ in range(calls):
            allowance.take(1, 0.0)
            if limit.try_enter():
                limit.leave()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


async def gate_overhead(calls: int, rounds: int) -> float:
    bus = EventBus()

    async def handler(event: Event) -> None:
        return None

    plain = bus.subscribe("x", handler, name="plain")
    gated = bus.subscribe("x", handler, name="gated", max_concurrency=8)
    event = Event("x", {})

    async def per_call(call: object) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await call(event)  # type: ignore[operator]
        return (time.perf_counter() - start) / calls * 1e6

    differences = []
    for _ in range(rounds):
        differences.append(await per_call(gated.call) - await per_call(plain.call))
    return statistics.median(differences)


async def take_tokens(store: Store, takes: int) -> float:
    now = datetime.now(UTC)
    start = time.perf_counter()
    for n in range(takes):
        await store.take_tokens(
            "rate:bench:h", want=1, rate=1e9, burst=1e9, now=now + timedelta(microseconds=n)
        )
    return (time.perf_counter() - start) / takes * 1e6


async def claims(store: Store, claims: int, rated: bool) -> float:
    """ms per claim of 10 records, with a ClaimFlow as the worker uses it."""
    bus = EventBus(store, service="bench-rated" if rated else "bench-plain")
    name = "rated" if rated else "plain"
    bus.subscribe("x", lambda event: None, name=name, rate=Rate(1e9) if rated else None)
    now = datetime.now(UTC)
    items = [
        RetryItem.pending(
            Event("x", {"n": n}), name, max_retries=3, due=now, now=now, service=bus.service
        )
        for n in range(claims * 10)
    ]
    await store.record_pending(items)
    flow = ClaimFlow(bus.core)

    def claim(count: int, handlers: list[str]):  # type: ignore[no-untyped-def]
        return bus.retry_queue.claim_due(count, lease=60, handlers=handlers, service=bus.service)

    start = time.perf_counter()
    for _ in range(claims):
        if rated:
            _, limited = flow.split([name])
            got = await flow.claim(claim, limited, 10, dict)
        else:
            got = await claim(10, [name])
        assert len(got) == 10, len(got)
    return (time.perf_counter() - start) / claims * 1e3


async def on_stores(takes: int, claim_count: int) -> list[Figure]:
    figures = []
    with tempfile.TemporaryDirectory() as directory:
        async with retrybus.open_store(f"sqlite:///{Path(directory) / 'bench.db'}") as store:
            figures.append(Figure("rate_take_tokens_sqlite", await take_tokens(store, takes), "µs"))
            figures.append(
                Figure(
                    "rate_claim_with_tokens_sqlite", await claims(store, claim_count, True), "ms"
                )
            )
            figures.append(
                Figure("rate_claim_plain_sqlite", await claims(store, claim_count, False), "ms")
            )
    prefix = f"retrybus_bench_rate_{os.getpid()}"
    try:
        async with retrybus.open_store(f"{REDIS}?prefix={prefix}") as store:
            try:
                figures.append(
                    Figure("rate_take_tokens_redis", await take_tokens(store, takes), "µs")
                )
            finally:
                await store.delete_control("rate:bench:h")
    except retrybus.StoreUnavailable as exc:
        note(f"rate: redis skipped, {exc}")
    return figures


def measure(calls: int, rounds: int, takes: int, claim_count: int) -> list[Figure]:
    return [
        Figure("rate_local_bookkeeping", local_bookkeeping(calls, rounds), "µs"),
        Figure("rate_gate_call_overhead", asyncio.run(gate_overhead(calls, rounds)), "µs"),
        *asyncio.run(on_stores(takes, claim_count)),
    ]


def run() -> list[Figure]:
    """The figures at full size (``bench/run.py``)."""
    return measure(200_000, 7, 2_000, 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to try it out")
    options = parser.parse_args()
    emit(measure(2_000, 3, 50, 10) if options.quick else run())


if __name__ == "__main__":
    main()
