"""A global rate across processes: three worker processes share one handler's
``rate="100/s"`` through the store (a Lua script on Redis, a compare-and-set
row on PostgreSQL), with far more due records than 30 s can take, and the
handler's calls, counted over 30 s, stay within 10 % of 100 a second.

(SQLite's bucket is the same compare-and-set code as PostgreSQL's, and the
conformance suite checks it under concurrent takers: left out here to keep the
file near a minute.)"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import ENGINES
from retrybus import Event, RetryItem

pytestmark = pytest.mark.slow

APP = Path(__file__).parent / "apps" / "rate_worker.py"
RATE = 100.0
WORKERS = 3
#: seconds from the first call before the counted window: the bucket's first
#: burst (one second's worth) and the workers' start fall in it
WARM_UP = 2.0
WINDOW = 30.0


async def stop(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_a_rate_of_100_a_second_holds_within_10_percent_across_three_worker_processes(
    kind: str, tmp_path: Path
) -> None:
    engine = ENGINES[kind]
    async with engine.open_test_store() as store:
        now = datetime.now(UTC)
        total = int(RATE * (WARM_UP + WINDOW) * 1.3)  # more than the run can take
        items = [
            RetryItem.pending(Event("x", {"n": n}), "limited", max_retries=3, due=now, now=now)
            for n in range(total)
        ]
        for start in range(0, total, 500):
            await store.record_pending(items[start : start + 500])
        record, go = tmp_path / "calls.txt", tmp_path / "go"
        log = (tmp_path / "workers.log").open("ab")
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(APP),
                f"--store={engine.namespace_url(store)}",
                "--rate=100/s",
                f"--record={record}",
                f"--go={go}",
                stdout=log,
                stderr=log,
            )
            for _ in range(WORKERS)
        ]
        try:
            await asyncio.sleep(1.0)  # connected
            go.touch()
            await asyncio.sleep(WARM_UP + WINDOW + 1.5)
        finally:
            await stop(processes)
            log.close()
        assert [p.returncode for p in processes] == [0] * WORKERS, (
            tmp_path / "workers.log"
        ).read_text()
        left = await store.retry_count()
    calls = [line.split() for line in record.read_text().splitlines()]
    times = sorted(int(ns) / 1e9 for _, ns in calls)
    begin = times[0] + WARM_UP
    counted = sum(1 for t in times if begin <= t < begin + WINDOW)
    rate = counted / WINDOW
    by_process = Counter(pid for pid, _ in calls)
    print(f"{kind}: {rate:.1f} calls/s over {WINDOW:g}s, by process {sorted(by_process.values())}")
    assert left > 0, "the records ran out: the rate was not what held the workers back"
    assert len(by_process) == WORKERS, f"not every worker made calls: {by_process}"
    assert abs(rate - RATE) <= 0.1 * RATE, (
        f"{rate:.1f} calls a second over {WINDOW:g}s (by process: {dict(by_process)})"
    )
    # nor did any one second go far past the rate and burst (one second's worth)
    per_second = Counter(int(t - times[0]) for t in times)
    assert max(per_second.values()) <= 2 * RATE + 1, per_second
