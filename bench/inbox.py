"""The inbox's cost on PostgreSQL: ``bus.inbox.claim`` in a handler's transaction.

Figures (ms, per transaction, p50 of SAMPLES after WARMUP):
  inbox_floor_select1_postgresql_p50     a bare SELECT 1 round trip (the machine's floor)
  inbox_txn_without_claim_postgresql_p50 BEGIN; INSERT the effect row; COMMIT
  inbox_txn_with_claim_postgresql_p50    the same with ``async with bus.inbox.claim(...)``
  inbox_claim_overhead_postgresql_p50    the difference of the two (target: under 0.2 ms)
  inbox_claim_skip_postgresql_p50        a second delivery: its claim finds the row
                                         (AlreadyHandled), the transaction rolled back

And the store's remembered successes (``EventBus(inbox=True)``), a worker draining
deliveries on the PostgreSQL store, rounds with and without the inbox interleaved
(ms per delivery, median of the rounds):
  inbox_worker_without_postgresql_p50    a worker's time per delivery, inbox off
  inbox_worker_with_postgresql_p50       the same, inbox on (one look per claimed
                                         batch, one write per group of removals)
  inbox_worker_overhead_postgresql_p50   the difference (target: under 0.2 ms)
  inbox_worker_skip_postgresql_p50       a worker's time per delivery already
                                         handled (found, finished, not called)

Everything runs in a schema of its own (dropped afterwards) of the server at
RETRYBUS_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test).

Run alone: .venv/bin/python bench/inbox.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

import asyncpg  # type: ignore[import-untyped]
from _common import Figure, emit, percentile, quiet_logging

from retrybus import AlreadyHandled, Event, EventBus, RetryItem, open_store

BASE_URL = os.environ.get(
    "RETRYBUS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
SAMPLES = 2_000
WARMUP = 200
#: deliveries per worker round, and rounds of each kind (interleaved)
WORKER_ITEMS = 2_000
WORKER_ROUNDS = 5


async def _timed(step, samples: int = SAMPLES) -> list[float]:  # type: ignore[no-untyped-def]
    for index in range(WARMUP):
        await step(-1 - index)
    times: list[float] = []
    for index in range(samples):
        start = time.perf_counter()
        await step(index)
        times.append((time.perf_counter() - start) * 1000)
    return times


async def measure() -> list[Figure]:
    schema = f"bench_inbox_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(BASE_URL)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        conn = await asyncpg.connect(BASE_URL, server_settings={"search_path": schema})
        await conn.execute("CREATE TABLE effects (event_id text, n int)")
        bus = EventBus()
        events = [Event("bench.inbox", {"n": i}) for i in range(SAMPLES + WARMUP)]

        async def select1(_: int) -> None:
            await conn.fetchval("SELECT 1")

        async def without_claim(index: int) -> None:
            async with conn.transaction():
                await conn.execute("INSERT INTO effects VALUES ($1, $2)", events[index].id, 1)

        async def with_claim(index: int) -> None:
            event = events[index]
            async with (
                conn.transaction(),
                bus.inbox.claim(event, connection=conn, handler="bench"),
            ):
                await conn.execute("INSERT INTO effects VALUES ($1, $2)", event.id, 1)

        async def skipped(index: int) -> None:
            with contextlib.suppress(AlreadyHandled):
                await with_claim(index)

        floor = await _timed(select1)
        plain = await _timed(without_claim)
        claimed = await _timed(with_claim)
        skips = await _timed(skipped)  # the same events again: every claim is found
        await conn.close()
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
    p50 = {
        name: percentile(v, 0.5)
        for name, v in (("floor", floor), ("plain", plain), ("claimed", claimed), ("skips", skips))
    }
    return [
        Figure("inbox_floor_select1_postgresql_p50", p50["floor"], "ms"),
        Figure("inbox_txn_without_claim_postgresql_p50", p50["plain"], "ms"),
        Figure("inbox_txn_with_claim_postgresql_p50", p50["claimed"], "ms"),
        Figure("inbox_claim_overhead_postgresql_p50", p50["claimed"] - p50["plain"], "ms"),
        Figure("inbox_claim_skip_postgresql_p50", p50["skips"], "ms"),
    ]


async def _drain(bus: EventBus, events: list[Event]) -> float:
    """Record a first delivery of each of ``events`` (due now, for a worker), then
    drain them with one worker; ms per delivery."""
    store = bus.store
    now = bus.clock.now()
    for start in range(0, len(events), 500):
        await store.record_pending(
            [
                RetryItem.pending(event, "bench", max_retries=3, due=now, now=now)
                for event in events[start : start + 500]
            ]
        )
    worker = bus.consumer(relay=False)
    started = time.perf_counter()
    done = 0
    while done < len(events):
        done += await worker.run_once()
    await bus.core.ledger.flush()
    return (time.perf_counter() - started) * 1000 / len(events)


async def measure_worker() -> list[Figure]:
    schema = f"bench_inbox_{uuid.uuid4().hex[:10]}"
    separator = "&" if "?" in BASE_URL else "?"
    store = open_store(f"{BASE_URL}{separator}schema={schema}")
    admin = await asyncpg.connect(BASE_URL)
    try:
        buses = {inbox: EventBus(store, inbox=inbox) for inbox in (False, True)}
        for bus in buses.values():
            bus.subscribe("bench.worker", lambda event: None, name="bench")
        times: dict[str, list[float]] = {"without": [], "with": [], "skip": []}
        for round_ in range(WORKER_ROUNDS + 1):  # the first round warms up
            for inbox in (False, True):
                events = [Event("bench.worker", {"n": n}) for n in range(WORKER_ITEMS)]
                took = await _drain(buses[inbox], events)
                if round_:
                    times["with" if inbox else "without"].append(took)
                if inbox:  # the same deliveries again: each is found, not run
                    skipped = await _drain(buses[True], events)
                    if round_:
                        times["skip"].append(skipped)
        floor = await _timed(lambda _: admin.fetchval("SELECT 1"))
    finally:
        await store.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
    p50 = {name: percentile(v, 0.5) for name, v in times.items()}
    return [
        Figure("inbox_worker_floor_select1_postgresql_p50", percentile(floor, 0.5), "ms"),
        Figure("inbox_worker_without_postgresql_p50", p50["without"], "ms"),
        Figure("inbox_worker_with_postgresql_p50", p50["with"], "ms"),
        Figure("inbox_worker_overhead_postgresql_p50", p50["with"] - p50["without"], "ms"),
        Figure("inbox_worker_skip_postgresql_p50", p50["skip"], "ms"),
    ]


async def measure_all() -> list[Figure]:
    return [*(await measure()), *(await measure_worker())]


def run() -> list[Figure]:
    quiet_logging()
    return asyncio.run(measure_all())


if __name__ == "__main__":
    emit(run())
