"""Durable delivery across processes, on every engine shared across processes: a
publisher killed with SIGKILL mid-publish loses nothing; deferred and scheduled
deliveries published in one process are each handled once by two worker
processes, never before their time; a handler that kills its worker is
dead-lettered as undeliverable after ``max_claims`` deaths."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from call_records import clashes, read_calls
from conftest import ENGINES, fresh_store
from private_servers import PrivateSecantus
from retrybus import EventBus, Store, open_store
from test_conformance_engines import needs

APPS = Path(__file__).parent / "apps"
WORKER = APPS / "process_worker.py"
HANDLER = "record_item"

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def killable(kind: str, directory: Path) -> AsyncIterator[tuple[str, Store]]:
    """A URL and a store on a fresh namespace that processes killed with SIGKILL
    may share. MongoDB runs on a private SecantusDB that aborts a killed client's
    open transaction after 2 s, as mongod does after transactionLifetimeLimitSeconds
    (the shared SecantusDB never does, and the others would wait on its locks)."""
    if kind != "mongodb":
        async with fresh_store(kind, directory) as store:
            yield ENGINES[kind].namespace_url(store), store
        return
    with PrivateSecantus(transaction_lifetime=2.0) as server:
        url = f"{server.url}/durable?timeout=30"
        async with open_store(url) as store:
            yield url, store


async def run_app(url: str, record: Path, *args: str) -> asyncio.subprocess.Process:
    log = record.with_suffix(".log").open("ab")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        "--store",
        url,
        "--record",
        str(record),
        f"--handler={HANDLER}",
        *args,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def finish(process: asyncio.subprocess.Process, within: float = 120) -> int | None:
    try:
        return await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@needs("shared_across_processes")
async def test_a_publisher_killed_mid_publish_loses_no_delivery(kind: str, tmp_path: Path) -> None:
    async with killable(kind, tmp_path) as (url, store):
        publisher_calls = tmp_path / "publisher.calls"
        publisher = await run_app(
            url,
            publisher_calls,
            "--publish=1000",
            "--publish-concurrency=50",
            "--sleep-min=0.005",
            "--sleep-max=0.05",
            "--lease=2",
        )
        deadline = time.monotonic() + 60
        while len(read_calls(publisher_calls)) < 200 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        publisher.send_signal(signal.SIGKILL)
        await publisher.wait()
        started_there = {call.event_id for call in read_calls(publisher_calls)}
        published = set(lines(Path(f"{publisher_calls}.published")))
        assert 200 <= len(started_there) < 1000  # killed mid-way, handlers running
        worker_calls = tmp_path / "worker.calls"
        worker = await run_app(url, worker_calls, "--until-empty", "--lease=2")
        assert await finish(worker) == 0, (tmp_path / "worker.log").read_text()
        every_call = read_calls(publisher_calls) + read_calls(worker_calls)
        finished = {call.event_id for call in every_call if call.end is not None}
        # every delivery recorded before the kill is handled: none lost
        assert started_there <= finished
        assert published <= finished
        cut_off = {c.event_id for c in read_calls(publisher_calls) if c.end is None}
        assert cut_off, "the kill should cut some handlers off mid-call"
        assert cut_off <= {call.event_id for call in read_calls(worker_calls)}
        # never two calls of one delivery at once (the killed calls just stopped)
        assert clashes([call for call in every_call if call.end is not None]) == {}
        assert await store.retry_count() == 0
        assert await EventBus(store).dead_letters.count() == 0


@needs("shared_across_processes")
async def test_deferred_and_scheduled_deliveries_are_handled_once_never_early(
    kind: str, tmp_path: Path
) -> None:
    count = 5000 if kind != "mongodb" else 1000
    async with fresh_store(kind, tmp_path) as store:
        url = ENGINES[kind].namespace_url(store)
        go = tmp_path / "go"
        workers = [
            await run_app(
                url,
                tmp_path / f"w{n}.calls",
                "--concurrency=16",
                "--batch-size=50",
                f"--ready={tmp_path / f'w{n}.ready'}",
                f"--go={go}",
            )
            for n in (1, 2)
        ]
        for n in (1, 2):
            ready = tmp_path / f"w{n}.ready"
            deadline = time.monotonic() + 30
            while not ready.exists() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        go.touch()
        publisher_calls = tmp_path / "publisher.calls"
        started = time.time_ns()
        deferred = await run_app(
            url, publisher_calls, f"--publish={count}", "--publish-concurrency=100", "--defer"
        )
        assert await finish(deferred) == 0, (tmp_path / "publisher.log").read_text()
        scheduled_calls = tmp_path / "scheduled.calls"
        spread = 2.0
        scheduled_at = time.time_ns()
        scheduled = await run_app(
            url,
            scheduled_calls,
            "--publish=200",
            "--publish-concurrency=50",
            f"--spread={spread}",
            "--id-prefix=s",
        )
        assert await finish(scheduled) == 0, (tmp_path / "scheduled.log").read_text()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            calls = read_calls(tmp_path / "w1.calls") + read_calls(tmp_path / "w2.calls")
            if len({c.event_id for c in calls if c.end is not None}) >= count + 200:
                break
            await asyncio.sleep(0.1)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
            assert await finish(worker, 60) == 0
        assert read_calls(publisher_calls) == []  # deferred: none ran in the publisher
        calls = read_calls(tmp_path / "w1.calls") + read_calls(tmp_path / "w2.calls")
        by_event: dict[str, int] = {}
        for call in calls:
            by_event[call.event_id] = by_event.get(call.event_id, 0) + 1
        assert set(by_event) == {f"e-{n}" for n in range(count)} | {f"s-{n}" for n in range(200)}
        assert {e: t for e, t in by_event.items() if t != 1} == {}  # each handled once
        assert all(call.start >= started for call in calls)
        assert {p.pid for p in calls} == {w.pid for w in workers}  # both took a share
        # a scheduled delivery never runs before its time (s-n was due n/200 of the spread on)
        for call in calls:
            if call.event_id.startswith("s-"):
                n = int(call.event_id[2:])
                assert call.start >= scheduled_at + int(spread * 1e9 * n / 200), call
        assert await store.retry_count() == 0


@needs("shared_across_processes")
async def test_a_handler_that_kills_its_worker_is_dead_lettered_after_three_deaths(
    kind: str, tmp_path: Path
) -> None:
    async with killable(kind, tmp_path) as (url, store):
        publisher = await run_app(
            url, tmp_path / "publisher.calls", "--publish=20", "--publish-concurrency=20", "--defer"
        )
        assert await finish(publisher) == 0
        calls = tmp_path / "workers.calls"
        exits: list[int | None] = []
        for _ in range(6):
            worker = await run_app(
                url, calls, "--until-empty", "--lease=0.5", "--exit-on=e-7", "--concurrency=4"
            )
            exits.append(await finish(worker))
            if exits[-1] == 0:
                break
        assert exits == [1, 1, 1, 0]
        handled = read_calls(calls)
        assert {c.event_id for c in handled if c.end is not None} == {
            f"e-{n}" for n in range(20) if n != 7
        }
        assert sum(1 for c in handled if c.event_id == "e-7") == 3
        bus = EventBus(store)
        (dead,) = await bus.dead_letters.list()
        assert (dead.event_id, dead.handler_name) == ("e-7", HANDLER)
        assert dead.reason == "undeliverable: claimed 3 times without an outcome"
        assert await store.retry_count() == 0


async def test_the_publisher_app_opens_the_store_it_is_given(tmp_path: Path) -> None:
    """The helper app itself: a durable publish in it handles and removes everything."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    record = tmp_path / "p.calls"
    process = await run_app(url, record, "--publish=30", "--publish-concurrency=10")
    assert await finish(process) == 0
    assert len(lines(Path(f"{record}.published"))) == 30
    async with open_store(url) as store:
        assert await store.retry_count() == 0
    assert read_calls(record) != []
