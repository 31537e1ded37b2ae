"""Transports across processes: a consumer killed with SIGKILL mid-handler (its
messages come back and are handled, through the store), a crash between the
store write and the ack (exactly one retry record), and a handler that kills its
consumer every time (dead-lettered as undeliverable after ``max_claims`` calls,
its neighbours all handled). Each on every transport shared across processes,
with an SQLite store file. Processes: tests/apps/transport_worker.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from call_records import read_calls
from retrybus import DeadLetterFilter, open_store
from retrybus._records import delivery_id
from retrybus._transports.base import Transport
from transports._common import all_transports

APP = Path(__file__).parent / "apps" / "transport_worker.py"
TRANSPORTS = {
    kind: module
    for kind, module in all_transports().items()
    if module.FEATURES.shared_across_processes
}

pytestmark = pytest.mark.slow

_started: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
def _kill_what_is_left() -> Iterator[None]:
    yield
    while _started:
        process = _started.pop()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


@pytest.fixture(params=list(TRANSPORTS))
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    async with TRANSPORTS[request.param].open_test_transport() as opened:
        yield opened


def url_of(transport: Transport) -> str:
    return str(TRANSPORTS[transport.kind].namespace_url(transport))


async def start(
    store: str, transport: Transport, record: Path, *args: str
) -> asyncio.subprocess.Process:
    log = record.with_suffix(".log").open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP),
        f"--store={store}",
        f"--transport={url_of(transport)}",
        f"--record={record}",
        *args,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _started.append(process)
    return process


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.05)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)


async def consuming(record: Path, workers: int) -> None:
    """Wait until ``workers`` worker processes have said they consume."""
    log = record.with_suffix(".log")
    await until(
        lambda: log.exists() and log.read_text().count("consuming from") >= workers,
        30,
        f"{workers} consuming worker(s)",
    )


def finished(record: Path, handler: str = "billing/count/") -> set[str]:
    return {
        c.event_id.removeprefix(handler)
        for c in read_calls(record)
        if c.end is not None and c.event_id.startswith(handler)
    }


def started_calls(record: Path, key: str) -> int:
    return sum(1 for c in read_calls(record) if c.event_id == key)


async def publish(store: str, transport: Transport, record: Path, count: int, *args: str) -> None:
    publisher = await start(store, transport, record, "--service=shop", f"--publish={count}", *args)
    assert await asyncio.wait_for(publisher.wait(), 60) == 0, record.with_suffix(".log").read_text()


async def test_killed_consumer_redelivers_its_messages(
    transport: Transport, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    record = tmp_path / "calls"
    worker_args = ("--service=billing", "--handler=count=job.*", "--sleep=0.2", "--lease=2")
    workers = [await start(store, transport, record, *worker_args) for _ in range(2)]
    await consuming(record, 2)
    await publish(store, transport, record, 300, "--type=job.run")
    await until(lambda: len(finished(record)) >= 60, 60, "60 events handled")
    workers[0].kill()
    await workers[0].wait()
    want = {f"e-{n}" for n in range(300)}
    await until(lambda: finished(record) >= want, 90, "every event handled")
    await stop(workers[1])


async def test_killed_before_ack_leaves_one_retry_record(
    transport: Transport, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    record = tmp_path / "calls"
    args = ("--service=billing", "--broken=broken=job.*", "--lease=2")
    dying = await start(store, transport, record, *args, "--kill-before-ack")
    await consuming(record, 1)
    await publish(store, transport, record, 1, "--type=job.run")
    assert await asyncio.wait_for(dying.wait(), 30) == -signal.SIGKILL
    worker = await start(store, transport, record, *args)
    expected = delivery_id("shop", "e-0", "broken", "billing")
    opened = open_store(store)
    try:

        async def records() -> list[tuple[str, int]]:
            items = await opened.list_retry(limit=10, offset=0)
            return [(i.id, i.attempt) for i in items]

        deadline = time.monotonic() + 30
        while await transport.lag("billing") not in (0, None) or await records() != [(expected, 1)]:
            assert time.monotonic() < deadline, (await records(), await transport.lag("billing"))
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)  # a lease later: still one record, nothing more
        assert await records() == [(expected, 1)]
    finally:
        await opened.close()
        await stop(worker)


async def test_a_consumer_killer_is_dead_lettered_after_max_claims(
    transport: Transport, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    record = tmp_path / "calls"
    args = ("--service=billing", "--handler=count=job.*", "--poison=job.poison", "--lease=2")
    worker = await start(store, transport, record, *args)
    await consuming(record, 1)
    await publish(store, transport, record, 100, "--type=job.run", "--id-prefix=a")
    await publish(store, transport, record, 1, "--type=job.poison", "--id-prefix=poison")
    await publish(store, transport, record, 100, "--type=job.run", "--id-prefix=b")
    opened = open_store(store)
    neighbours = {f"{p}-{n}" for p in "ab" for n in range(100)}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the poison was never dead-lettered"
            if worker.returncode is not None:  # killed by the poison: start another
                worker = await start(store, transport, record, *args)
            dead = await opened.list_dead(DeadLetterFilter(), limit=10, offset=0)
            if dead and finished(record) >= neighbours:
                break
            await asyncio.sleep(0.2)
        (letter,) = dead
        assert letter.event_id == "poison-0"
        assert letter.reason.startswith("undeliverable")
        assert started_calls(record, "billing/count/poison-0") == 3  # max_claims
    finally:
        await opened.close()
        await stop(worker)
