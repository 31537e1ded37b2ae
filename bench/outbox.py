"""The outbox on PostgreSQL: what ``stage`` adds to the caller's transaction,
how fast a relay empties the outbox table into the store and into Redis Streams,
and how long a staged event takes to reach its handler.

Figures:
  outbox_floor_select1_postgresql_p50         ms  a bare SELECT 1 round trip (the floor)
  outbox_floor_commit_postgresql_p50          ms  BEGIN; INSERT a business row; COMMIT
  outbox_floor_one_insert_postgresql_p50      ms  what one more small INSERT adds to it (the
                                                  least a stage, one statement, can add)
  outbox_stage_store_overhead_postgresql_p50  ms  what stage adds to that transaction, the
                                                  connection to the store's own database
                                                  (pending deliveries written there)
  outbox_stage_table_overhead_postgresql_p50  ms  the same into the retrybus_outbox table
                                                  of another database
  outbox_relay_to_store_postgresql            events/s  a relay draining 20,000 rows into
                                                  a PostgreSQL store (batches of 500)
  outbox_relay_to_redis_streams               events/s  the same onto Redis Streams
  outbox_stage_to_handler_relayed_p50/_p99    ms  commit to handler call, through the
                                                  outbox table and a relay polling every
                                                  100 ms in another bus (no wake-up)
  outbox_stage_to_handler_store_p50/_p99      ms  commit to handler call, staged into the
                                                  store's own tables (a worker woken by
                                                  the NOTIFY the store sends after commit)

Overheads are p50(with) - p50(without), the two measured in alternation on one
connection. Everything runs in databases and schemas of its own, dropped
afterwards, on the server at RETRYBUS_BENCH_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/test); Redis at RETRYBUS_BENCH_REDIS_URL.

Run alone: .venv/bin/python bench/outbox.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg  # type: ignore[import-untyped]
from _common import Figure, emit, note, percentile, quiet_logging

from retrybus import Event, EventBus, RetryWorker, open_store, open_transport
from retrybus._transports.wire import encode

BASE_URL = os.environ.get(
    "RETRYBUS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("RETRYBUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SAMPLES = 1_500
WARMUP = 200
SETTLE = 0.003
RELAY_ROWS = 20_000
LATENCY_EVENTS = 400
LATENCY_RATE = 200  # staged per second


def _server(database: str) -> str:
    return BASE_URL.split("?", 1)[0].rsplit("/", 1)[0] + "/" + database


async def _alternating(
    steps: dict[str, Callable[[int], Awaitable[None]]], samples: int = SAMPLES
) -> dict[str, list[float]]:
    """Each step timed ``samples`` times (after ``WARMUP``), the steps taking turns."""
    for index in range(WARMUP):
        for step in steps.values():
            await step(-1 - index)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(samples):
        for name, step in steps.items():
            start = time.perf_counter()
            await step(index)
            times[name].append((time.perf_counter() - start) * 1000)
            # what a step leaves running (the store's NOTIFY after a staging
            # commit) ends before the next step is timed
            await asyncio.sleep(SETTLE)
    return times


async def _stage_overheads(
    store_url: str, app_url: str, same_db_dsn: str, schema: str
) -> list[Figure]:
    bus = EventBus(open_store(store_url), service="shop")
    bus.subscribe("order.placed", lambda event: None, name="confirm")
    await bus.store.connect()
    same = await asyncpg.connect(same_db_dsn)
    other = await asyncpg.connect(app_url)
    # business rows in real tables (a temporary one writes no WAL, so its commit
    # would flush nothing and make every durable write look expensive)
    await same.execute(f'CREATE TABLE "{schema}".orders (id bigint)')
    await same.execute(f'SET search_path TO "{schema}"')
    await other.execute("CREATE TABLE orders (id bigint)")
    events = [Event("order.placed", {"order": n}) for n in range(SAMPLES + WARMUP)]

    async def select1(_: int) -> None:
        await same.fetchval("SELECT 1")

    async def commit(index: int) -> None:
        async with same.transaction():
            await same.execute("INSERT INTO orders VALUES ($1)", index)

    async def one_more_insert(index: int) -> None:
        async with same.transaction():
            await same.execute("INSERT INTO orders VALUES ($1)", index)
            await same.execute("INSERT INTO orders VALUES ($1)", -index)

    async def staged_in_store(index: int) -> None:
        async with same.transaction():
            await same.execute("INSERT INTO orders VALUES ($1)", index)
            await bus.outbox.stage(events[index], connection=same)

    async def plain_other(index: int) -> None:
        async with other.transaction():
            await other.execute("INSERT INTO orders VALUES ($1)", index)

    async def staged_in_table(index: int) -> None:
        async with other.transaction():
            await other.execute("INSERT INTO orders VALUES ($1)", index)
            await bus.outbox.stage(events[index], connection=other)

    times = await _alternating(
        {
            "select1": select1,
            "commit": commit,
            "insert": one_more_insert,
            "store": staged_in_store,
            "plain_other": plain_other,
            "table": staged_in_table,
        }
    )
    p50 = {name: percentile(values, 0.5) for name, values in times.items()}
    await same.close()
    await other.close()
    await bus.close()
    return [
        Figure("outbox_floor_select1_postgresql_p50", p50["select1"], "ms"),
        Figure("outbox_floor_commit_postgresql_p50", p50["commit"], "ms"),
        # the least a stage can add: one more small statement in the transaction
        Figure("outbox_floor_one_insert_postgresql_p50", p50["insert"] - p50["commit"], "ms"),
        Figure("outbox_stage_store_overhead_postgresql_p50", p50["store"] - p50["commit"], "ms"),
        Figure(
            "outbox_stage_table_overhead_postgresql_p50",
            p50["table"] - p50["plain_other"],
            "ms",
        ),
    ]


async def _fill(app_url: str, rows: int) -> None:
    conn = await asyncpg.connect(app_url)
    try:
        await conn.execute("DELETE FROM retrybus_outbox")
        body = [("shop", encode(Event("order.placed", {"order": n})).decode()) for n in range(rows)]
        await conn.executemany(
            "INSERT INTO retrybus_outbox (service, event, staged_at) VALUES ($1, $2::json, now())",
            body,
        )
    finally:
        await conn.close()


async def _relay_rate(bus: EventBus, app_url: str) -> float:
    await _fill(app_url, RELAY_ROWS)
    relay = bus.outbox.relay(batch=500)
    start = time.perf_counter()
    relayed = 0
    while (count := await relay.relay_once()) > 0:
        relayed += count
    elapsed = time.perf_counter() - start
    await relay.close()
    assert relayed == RELAY_ROWS, relayed
    return relayed / elapsed


async def _relay_rates(store_url: str, app_url: str) -> list[Figure]:
    to_store = EventBus(open_store(store_url), service="shop", outbox=app_url)
    to_store.subscribe("order.placed", lambda event: None, name="confirm")
    await to_store.store.connect()
    store_rate = await _relay_rate(to_store, app_url)
    await to_store.close()
    figures = [Figure("outbox_relay_to_store_postgresql", store_rate, "events/s")]
    stream = f"bench-outbox-{uuid.uuid4().hex[:8]}"
    transport = open_transport(f"{REDIS_URL}?stream={stream}")
    to_redis = EventBus(open_store(store_url), service="shop", outbox=app_url, transport=transport)
    to_redis.subscribe("order.placed", lambda event: None, name="confirm")
    try:
        await transport.declare("shop", ["order.*"], _settings())
        figures.append(
            Figure(
                "outbox_relay_to_redis_streams", await _relay_rate(to_redis, app_url), "events/s"
            )
        )
    finally:
        await transport.forget("shop")
        await to_redis.close()
    return figures


def _settings():  # type: ignore[no-untyped-def]
    from retrybus._transports.base import TransportSettings

    return TransportSettings()


async def _latency(store_url: str, stage_dsn: str, relayed: bool, app_url: str) -> list[float]:
    """Commit-to-call times (ms) of LATENCY_EVENTS staged at LATENCY_RATE per second."""
    seen: dict[int, float] = {}
    all_seen = asyncio.Event()
    worker_bus = EventBus(
        open_store(store_url), service="shop", outbox=app_url if relayed else None
    )

    def confirm(event: Event) -> None:
        seen[event.data["n"]] = time.perf_counter()
        if len(seen) == LATENCY_EVENTS:
            all_seen.set()

    worker_bus.subscribe("order.placed", confirm, name="confirm")
    app_bus = EventBus(open_store(store_url), service="shop")  # stages: no wake-up of the relay
    app_bus.subscribe("order.placed", confirm, name="confirm")
    await app_bus.store.connect()
    committed: dict[int, float] = {}
    conn = await asyncpg.connect(stage_dsn)
    async with worker_bus, RetryWorker(worker_bus, check_interval=30):
        await asyncio.sleep(0.5)
        for n in range(LATENCY_EVENTS):
            async with conn.transaction():
                await app_bus.outbox.stage(Event("order.placed", {"n": n}), connection=conn)
            committed[n] = time.perf_counter()
            await asyncio.sleep(1 / LATENCY_RATE)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), 30)
    await conn.close()
    await app_bus.close()
    if len(seen) < LATENCY_EVENTS:
        note(f"only {len(seen)} of {LATENCY_EVENTS} events reached the handler")
    return [(seen[n] - committed[n]) * 1000 for n in seen]


async def measure() -> list[Figure]:
    app_db = f"bench_outbox_{uuid.uuid4().hex[:10]}"
    schema = f"bench_outbox_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(BASE_URL)
    await admin.execute(f'CREATE DATABASE "{app_db}"')
    app_url = _server(app_db)
    store_url = f"{BASE_URL}{'&' if '?' in BASE_URL else '?'}schema={schema}"
    same_db_dsn = BASE_URL.split("?", 1)[0]
    figures: list[Figure] = []
    try:
        figures += await _stage_overheads(store_url, app_url, same_db_dsn, schema)
        figures += await _relay_rates(store_url, app_url)
        # stores of their own: the relay benchmarks left 20,000 deliveries queued
        relayed = await _latency(f"{store_url}_relayed", app_url, True, app_url)
        direct = await _latency(f"{store_url}_direct", same_db_dsn, False, app_url)
        for name, values in (("relayed", relayed), ("store", direct)):
            figures.append(
                Figure(f"outbox_stage_to_handler_{name}_p50", percentile(values, 0.5), "ms")
            )
            figures.append(
                Figure(f"outbox_stage_to_handler_{name}_p99", percentile(values, 0.99), "ms")
            )
    finally:
        for name in (schema, f"{schema}_relayed", f"{schema}_direct"):
            await admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await admin.execute(f'DROP DATABASE IF EXISTS "{app_db}" WITH (FORCE)')
        await admin.close()
    return figures


def run() -> list[Figure]:
    quiet_logging()
    return asyncio.run(measure())


if __name__ == "__main__":
    emit(run())
