"""The outbox under fire, a property test: whatever the schedule, the events
delivered are exactly the committed transactions' (none lost, none from a
rolled-back transaction).

Hypothesis draws a plan: how many transactions, which fifth (about) roll back,
when the relay process is killed with SIGKILL (and started again), and, on
PostgreSQL, when the server restarts (an immediate shutdown, recovered from its
WAL). Several stagers run the transactions at once, each writing a business row
and staging an event for it in the same transaction; a relay process
(``retrybus relay``, a real process) publishes the outbox table to the store.
Afterwards the store holds exactly one pending delivery for each business row
that exists (the rows are the truth: a commit cut off by the restart may have
happened or not), and none for the others.

PostgreSQL: a private cluster (tests/private_servers.py) holding the store (its
schema) and the application's database; SQLite: two files, staged through
aiosqlite connections (their waits for the write lock happen off the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines._common import unique_name
from private_servers import PrivatePostgres
from retrybus import Event, EventBus, RetryItem, open_store

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

ORDER = "order.placed"
STAGERS = 6
ROOT = Path(__file__).resolve().parents[1]
# no row ever committed: the table's creation rolled back with them
OUTBOX_DEPTH = """
SELECT CASE WHEN to_regclass('retrybus_outbox') IS NULL THEN 0
            ELSE (xpath('/row/c/text()', query_to_xml('SELECT count(*) AS c FROM retrybus_outbox',
                  false, true, '')))[1]::text::int END
"""


@dataclass(frozen=True)
class Plan:
    """One run: ``rollbacks[n]`` says whether transaction n rolls back; the relay
    is killed when that many transactions are done (``kills``); PostgreSQL
    restarts at ``restart_at`` (a fraction of them)."""

    rollbacks: tuple[bool, ...]
    kills: tuple[int, ...]
    restart_at: float
    seed: int


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    count = draw(st.integers(min_value=150, max_value=400))
    seed = draw(st.integers(min_value=0, max_value=2**32))
    # a fifth of them, whichever the seed picks
    chooser = random.Random(seed)
    rollbacks = tuple(chooser.random() < 0.2 for _ in range(count))
    kills = draw(st.lists(st.integers(min_value=1, max_value=count - 1), min_size=2, max_size=4))
    return Plan(
        rollbacks=rollbacks,
        kills=tuple(sorted(set(kills))),
        restart_at=draw(st.floats(min_value=0.2, max_value=0.8)),
        seed=seed,
    )


class Relay:
    """``retrybus relay`` as a process of its own, killed and started again."""

    def __init__(self, outbox: str, store: str, log: Path) -> None:
        self.command = [
            sys.executable,
            "-m",
            "retrybus",
            "relay",
            "--outbox",
            outbox,
            "--store",
            store,
            "--poll-interval",
            "0.05",
            "--batch",
            "40",
        ]
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.kills += 1
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


async def run_plan(
    plan: Plan,
    transaction: Callable[[int, bool], Awaitable[None]],
    relay: Relay,
    restart: Callable[[], None] | None,
) -> None:
    """Run the plan's transactions on ``STAGERS`` concurrent stagers, killing the
    relay and restarting the server at their points."""
    total = len(plan.rollbacks)
    todo = iter(range(total))
    done = 0
    kills = list(plan.kills)
    restart_at = int(total * plan.restart_at) if restart is not None else None
    chooser = random.Random(plan.seed)

    async def stager() -> None:
        nonlocal done, restart_at
        for number in todo:
            await asyncio.sleep(chooser.random() * 0.004)
            with contextlib.suppress(Exception):  # a commit cut off by the restart
                await transaction(number, plan.rollbacks[number])
            done += 1
            while kills and done >= kills[0]:
                kills.pop(0)
                await asyncio.to_thread(relay.kill)
            if restart_at is not None and done >= restart_at:
                restart_at = None
                assert restart is not None
                await asyncio.to_thread(restart)

    await asyncio.gather(*(stager() for _ in range(STAGERS)))


async def wait_for_empty(depth: Callable[[], Awaitable[int]], within: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while (waiting := await depth()) > 0:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the relay left {waiting} rows in the outbox")
        await asyncio.sleep(0.1)


def staged_orders(items: list[RetryItem]) -> list[int]:
    return [int(item.event_id.removeprefix("order-")) for item in items]


def order_event(number: int) -> Event:
    return Event(type=ORDER, data={"order": number}, id=f"order-{number}", source="shop")


def shop_bus(store_url: str) -> EventBus:
    bus = EventBus(open_store(store_url), service="shop")
    bus.subscribe(ORDER, lambda event: None, name="fulfil")
    return bus


# PostgreSQL --------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=plans())
def test_postgresql_delivers_exactly_the_committed_transactions(
    postgres: PrivatePostgres, tmp_path: Path, plan: Plan
) -> None:
    asyncio.run(postgresql_run(postgres, tmp_path, plan))


async def postgresql_run(server: PrivatePostgres, directory: Path, plan: Plan) -> None:
    app_name = unique_name("app")
    admin = await asyncpg.connect(server.url)
    await admin.execute(f'CREATE DATABASE "{app_name}"')
    await admin.close()
    base = server.url.rsplit("/", 1)[0]
    app_url = f"{base}/{app_name}"
    store_url = f"{server.url}?schema={unique_name('bus')}"
    bus = shop_bus(store_url)
    await bus.register()  # the relay routes by the stored subscriptions
    setup = await asyncpg.connect(app_url)
    await setup.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
    await setup.close()
    relay = Relay(app_url, store_url, directory / f"relay-{app_name}.log")
    relay.start()
    connections: dict[int, Any] = {}

    async def transaction(number: int, roll_back: bool) -> None:
        conn = connections.get(id(asyncio.current_task()))
        while conn is None or conn.is_closed():
            try:  # through the restart: the server is back within seconds
                conn = await asyncpg.connect(app_url, timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(0.1)
                continue
            connections[id(asyncio.current_task())] = conn
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO orders VALUES ($1)", number)
            await bus.outbox.stage(order_event(number), connection=conn)
            if roll_back:
                await tx.rollback()
            else:
                await tx.commit()
        except Exception:
            await conn.close(timeout=1) if not conn.is_closed() else None
            raise

    restarts = 0

    def restart() -> None:
        nonlocal restarts
        server.restart(0.3, "immediate")
        restarts += 1

    try:
        await run_plan(plan, transaction, relay, restart)
        check = await asyncpg.connect(app_url)
        try:
            await wait_for_empty(lambda: check.fetchval(OUTBOX_DEPTH))
            committed = {row[0] for row in await check.fetch("SELECT id FROM orders")}
        finally:
            await check.close()
    finally:
        relay.stop()
        for conn in connections.values():
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
    items = await bus.retry_queue.list(limit=10_000)
    delivered = staged_orders(items)
    await bus.close()
    print(
        f"postgresql: {len(plan.rollbacks)} transactions, {len(committed)} committed, "
        f"{relay.kills} relay kills, {restarts} restart"
    )
    assert restarts == 1
    assert sorted(delivered) == sorted(committed)  # one each: none lost, none twice
    assert {(item.service, item.handler_name) for item in items} <= {("shop", "fulfil")}
    rolled_back = {n for n, flag in enumerate(plan.rollbacks) if flag}
    assert not rolled_back & set(delivered)
    assert relay.kills == len(plan.kills)


# SQLite ----------------------------------------------------------------------


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=plans())
def test_sqlite_delivers_exactly_the_committed_transactions(tmp_path: Path, plan: Plan) -> None:
    directory = tmp_path / unique_name("run")
    directory.mkdir()
    asyncio.run(sqlite_run(directory, plan))


async def sqlite_run(directory: Path, plan: Plan) -> None:
    app_path = directory / "app.db"
    store_url = f"sqlite:///{directory / 'bus.db'}"
    bus = shop_bus(store_url)
    await bus.register()
    async with aiosqlite.connect(app_path) as setup:
        await setup.execute("PRAGMA journal_mode=WAL")
        await setup.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        await setup.commit()
    relay = Relay(f"sqlite:///{app_path}", store_url, directory / "relay.log")
    relay.start()
    connections: dict[int, aiosqlite.Connection] = {}

    async def transaction(number: int, roll_back: bool) -> None:
        conn = connections.get(id(asyncio.current_task()))
        if conn is None:
            conn = connections[id(asyncio.current_task())] = await aiosqlite.connect(
                app_path, timeout=30
            )
        await conn.execute("INSERT INTO orders VALUES (?)", (number,))
        await bus.outbox.stage(order_event(number), connection=conn)
        if roll_back:
            await conn.rollback()
        else:
            await conn.commit()

    try:
        await run_plan(plan, transaction, relay, None)
        async with aiosqlite.connect(app_path) as check:

            async def depth() -> int:
                # no row ever committed: the table's creation rolled back with them
                async with check.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'retrybus_outbox'"
                ) as rows:
                    (tables,) = await rows.fetchone()  # type: ignore[misc]
                if not tables:
                    return 0
                async with check.execute("SELECT count(*) FROM retrybus_outbox") as rows:
                    (count,) = await rows.fetchone()  # type: ignore[misc]
                    return int(count)

            await wait_for_empty(depth)
            async with check.execute("SELECT id FROM orders") as rows:
                committed = {row[0] for row in await rows.fetchall()}
    finally:
        relay.stop()
        for conn in connections.values():
            await conn.close()
    items = await bus.retry_queue.list(limit=10_000)
    await bus.close()
    print(f"sqlite: {len(plan.rollbacks)} transactions, {len(committed)} committed")
    assert sorted(staged_orders(items)) == sorted(committed)
    assert not {n for n, flag in enumerate(plan.rollbacks) if flag} & set(staged_orders(items))
    assert relay.kills == len(plan.kills)
