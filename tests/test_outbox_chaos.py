"""The outbox and the inbox under fire, a property test: whatever the schedule,
the events delivered are exactly the committed transactions' (none lost, none
from a rolled-back transaction), and each handler's effect exists once per event.

Hypothesis draws a plan: how many transactions, which fifth (about) roll back,
when the relay process and the worker process are killed with SIGKILL (and
started again), and, on PostgreSQL, when the server restarts (an immediate
shutdown, recovered from its WAL). Several stagers run the transactions at once,
each writing a business row and staging an event for it in the same transaction;
a relay process (``retrybus relay``) publishes the outbox table to the store,
and a worker process (``retrybus worker tests/apps/outbox_app.py``) runs the
handler, whose effect (a row of the ``effects`` table) is written with its inbox
claim in one transaction. Afterwards each business row that exists (the rows are
the truth: a commit cut off by the restart may have happened or not) has
exactly one effect, and no other order has any, although relays killed between
publishing and deleting a batch publish it again and killed workers leave
deliveries to run again.

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
import threading
import time
from collections import Counter
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
from retrybus import Event, EventBus, open_store

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

ORDER = "order.placed"
STAGERS = 6
#: seconds a relay or worker process runs at least before it is killed
UPTIME = 1.0
#: the longest pause of a stager between two transactions (seconds)
PAUSE = 0.03
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
    worker_kills: tuple[int, ...]
    restart_at: float
    seed: int


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    count = draw(st.integers(min_value=150, max_value=400))
    seed = draw(st.integers(min_value=0, max_value=2**32))
    # a fifth of them, whichever the seed picks
    chooser = random.Random(seed)
    rollbacks = tuple(chooser.random() < 0.2 for _ in range(count))
    points = st.lists(st.integers(min_value=1, max_value=count - 1), min_size=2, max_size=4)
    kills = draw(points)
    worker_kills = draw(points)
    return Plan(
        rollbacks=rollbacks,
        kills=tuple(sorted(set(kills))),
        worker_kills=tuple(sorted(set(worker_kills))),
        restart_at=draw(st.floats(min_value=0.2, max_value=0.8)),
        seed=seed,
    )


class Process:
    """A retrybus command as a process of its own, killed and started again."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.command = [sys.executable, "-m", "retrybus", *command]
        self.log = log
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.kills = 0
        # two stagers may reach kill points at once: one kill (and start) at a
        # time, or a process started by the first would be left running
        self._turn = threading.Lock()

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env
            )
        self.started = time.monotonic()

    def wait_uptime(self) -> None:
        """Until the process has run ``UPTIME`` seconds (a process killed before it
        has imported retrybus would test nothing)."""
        time.sleep(max(0.0, self.started + UPTIME - time.monotonic()))

    def kill(self) -> None:
        """SIGKILL (after ``wait_uptime``), then start it again."""
        with self._turn:
            assert self.process is not None
            self.wait_uptime()
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
            self.kills += 1
            self.start()

    def stop(self) -> None:
        with self._turn:
            self._stop()

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def relay_process(outbox: str, store: str, directory: Path) -> Process:
    return Process(
        ["relay", "--outbox", outbox, "--store", store, "--poll-interval", "0.05", "--batch", "40"],
        directory / "relay.log",
        {},
    )


def worker_process(outbox: str, store: str, directory: Path) -> Process:
    """``retrybus worker`` of tests/apps/outbox_app.py, short leases: a killed
    worker's deliveries are taken again within two seconds."""
    return Process(
        [
            "worker",
            "apps.outbox_app:bus",
            "--app-dir",
            str(ROOT / "tests"),
            "--no-relay",
            "--lease",
            "2",
            "--batch-size",
            "20",
            "--check-interval",
            "0.5",
            "--log-level",
            "warning",
        ],
        directory / "worker.log",
        {"OUTBOX_APP_DB": outbox, "OUTBOX_STORE": store},
    )


async def busy(effects: Callable[[], Awaitable[int]], within: float = 1.5) -> None:
    """Wait until the worker is making effects (the count moves on within 50 ms),
    for at most ``within`` seconds: a kill then cuts off handlers after their
    effect, whose deliveries run again."""
    deadline = asyncio.get_running_loop().time() + within
    with contextlib.suppress(Exception):  # the server restarting: kill anyway
        before = await effects()
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            now = await effects()
            if now != before:
                return
            before = now


async def run_plan(
    plan: Plan,
    transaction: Callable[[int, bool], Awaitable[None]],
    relay: Process,
    worker: Process,
    restart: Callable[[], None] | None,
    effects: Callable[[], Awaitable[int]],
) -> None:
    """Run the plan's transactions on ``STAGERS`` concurrent stagers, killing the
    relay and the worker (while it makes effects) and restarting the server at
    their points."""
    total = len(plan.rollbacks)
    todo = iter(range(total))
    done = 0
    kills = list(plan.kills)
    worker_kills = list(plan.worker_kills)
    restart_at = int(total * plan.restart_at) if restart is not None else None
    chooser = random.Random(plan.seed)

    async def stager() -> None:
        nonlocal done, restart_at
        for number in todo:
            await asyncio.sleep(chooser.random() * PAUSE)
            with contextlib.suppress(Exception):  # a commit cut off by the restart
                await transaction(number, plan.rollbacks[number])
            done += 1
            while kills and done >= kills[0]:
                kills.pop(0)
                await asyncio.to_thread(relay.kill)
            while worker_kills and done >= worker_kills[0]:
                worker_kills.pop(0)
                await asyncio.to_thread(worker.wait_uptime)
                await busy(effects)
                await asyncio.to_thread(worker.kill)
            if restart_at is not None and done >= restart_at:
                restart_at = None
                assert restart is not None
                await asyncio.to_thread(restart)

    await asyncio.gather(*(stager() for _ in range(STAGERS)))


async def settle(bus: EventBus, outbox_depth: Callable[[], Awaitable[int]]) -> None:
    """Wait until the relay emptied the outbox table and the worker the retry
    queue (a killed worker's leases run out within two seconds)."""
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        waiting = await outbox_depth()
        queued = (await bus.stats()).retry_queue_size
        if waiting == 0 and queued == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{waiting} rows left in the outbox, {queued} deliveries queued")
        await asyncio.sleep(0.2)


def check_effects(plan: Plan, committed: set[int], effects: list[int]) -> None:
    """One effect per committed order, none for the others."""
    twice = sorted(order for order, count in Counter(effects).items() if count > 1)
    assert not twice, f"effects made twice: {twice[:20]}"
    assert sorted(effects) == sorted(committed)
    rolled_back = {n for n, flag in enumerate(plan.rollbacks) if flag}
    assert not rolled_back & set(effects)


def order_event(number: int) -> Event:
    return Event(type=ORDER, data={"order": number}, id=f"order-{number}", source="shop")


def shop_bus(store_url: str) -> EventBus:
    """The stagers' bus: the shop's handler, as the worker's app has it."""
    bus = EventBus(open_store(store_url), service="shop")
    bus.subscribe(ORDER, lambda event: None, name="fulfil")
    return bus


# PostgreSQL --------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@settings(
    max_examples=2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=plans())
def test_postgresql_delivers_the_committed_transactions_and_each_effect_once(
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
    await setup.execute("CREATE TABLE effects (order_id integer)")  # no key: twice would show
    await setup.close()
    relay = relay_process(app_url, store_url, directory)
    worker = worker_process(app_url, store_url, directory)
    relay.start()
    worker.start()
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

    watcher: list[Any] = []

    async def effects() -> int:
        if not watcher or watcher[0].is_closed():
            watcher[:] = [await asyncpg.connect(app_url, timeout=2)]
        return int(await watcher[0].fetchval("SELECT count(*) FROM effects"))

    try:
        await run_plan(plan, transaction, relay, worker, restart, effects)
        check = await asyncpg.connect(app_url)
        try:
            await settle(bus, lambda: check.fetchval(OUTBOX_DEPTH))
            committed = {row[0] for row in await check.fetch("SELECT id FROM orders")}
            effects = [row[0] for row in await check.fetch("SELECT order_id FROM effects")]
        finally:
            await check.close()
    finally:
        relay.stop()
        worker.stop()
        for conn in [*connections.values(), *watcher]:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
    stats = await bus.stats()
    await bus.close()
    print(
        f"postgresql: {len(plan.rollbacks)} transactions, {len(committed)} committed, "
        f"{relay.kills} relay and {worker.kills} worker kills, {restarts} restart"
    )
    assert restarts == 1
    assert stats.dead_letter_queue_size == 0
    check_effects(plan, committed, effects)
    assert (relay.kills, worker.kills) == (len(plan.kills), len(plan.worker_kills))


# SQLite ----------------------------------------------------------------------


@settings(
    max_examples=2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=plans())
def test_sqlite_delivers_the_committed_transactions_and_each_effect_once(
    tmp_path: Path, plan: Plan
) -> None:
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
        await setup.execute("CREATE TABLE effects (order_id INTEGER)")  # no key: twice would show
        await setup.commit()
    relay = relay_process(f"sqlite:///{app_path}", store_url, directory)
    worker = worker_process(f"sqlite:///{app_path}", store_url, directory)
    relay.start()
    worker.start()
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

        async def effects() -> int:
            async with (
                aiosqlite.connect(app_path, timeout=30) as watcher,
                watcher.execute("SELECT count(*) FROM effects") as rows,
            ):
                (count,) = await rows.fetchone()  # type: ignore[misc]
                return int(count)

        await run_plan(plan, transaction, relay, worker, None, effects)
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

            await settle(bus, depth)
            async with check.execute("SELECT id FROM orders") as rows:
                committed = {row[0] for row in await rows.fetchall()}
            async with check.execute("SELECT order_id FROM effects") as rows:
                effects = [row[0] for row in await rows.fetchall()]
    finally:
        relay.stop()
        worker.stop()
        for conn in connections.values():
            await conn.close()
    stats = await bus.stats()
    await bus.close()
    print(
        f"sqlite: {len(plan.rollbacks)} transactions, {len(committed)} committed, "
        f"{relay.kills} relay and {worker.kills} worker kills"
    )
    assert stats.dead_letter_queue_size == 0
    check_effects(plan, committed, effects)
    assert (relay.kills, worker.kills) == (len(plan.kills), len(plan.worker_kills))
