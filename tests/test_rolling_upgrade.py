"""Rolling upgrades: the previous release (tests/rolling/previous_release.py) beside
today's, on each engine with a schema (memory keeps nothing between releases).

- Today's worker delivers everything the previous release wrote (retry items,
  pending and scheduled deliveries, dead letters through the redrive it started)
  once ``retrybus migrate`` has run.
- The previous release's worker on a store today's release migrated: it delivers
  today's records where it accepts the schema, and refuses the store where it
  does not (SQLite: its workers must stop before the migration).
- Both side by side where the previous release accepts the store: each delivers
  what the other published, and neither finds a record it cannot decode.
- What makes the next upgrades rolling: today's release keeps working on a store a
  later release migrated when that release records it as compatible from today's
  version or earlier, and refuses it, saying which it needs, otherwise.

The previous release runs as tests/rolling/app.py in a subprocess with its own
``src`` first on ``PYTHONPATH``; today's runs the same code in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import retrybus
from retrybus import EventBus, StoreUnusable
from retrybus._stores.postgresql.migrate import SCHEMA_VERSION as POSTGRESQL_VERSION
from retrybus._stores.sqlite.migrate import SCHEMA_VERSION as SQLITE_VERSION
from rolling import app
from rolling.later_release import TODAY, migrate_as_later_release
from rolling.namespaces import fresh_url
from rolling.previous_release import source_tree

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = Path(app.__file__).resolve()
ENGINES = ["sqlite", "postgresql", "redis", "mongodb"]
#: the schema version each engine reports (``Store.schema_version``): the previous
#: release's, today's; Redis and MongoDB report none (their key layout, 4, and
#: layout, 3, are the same in both releases)
VERSIONS: dict[str, tuple[int | None, int | None]] = {
    "sqlite": (6, SQLITE_VERSION),
    "postgresql": (7, POSTGRESQL_VERSION),
    "redis": (None, None),
    "mongodb": (None, None),
}
#: the engines whose store the previous release refuses once today's has migrated
#: it, and what it says
REFUSED = {"sqlite": "has schema version 7, newer than this retrybus knows (6)"}
#: how long a worker gets to deliver what a test published (a deadline, not a speed)
DEADLINE = 30.0
COUNT = 2  # events of each kind


@pytest.fixture(scope="session")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's ``src``, checked to be what its subprocesses import."""
    src = source_tree(tmp_path_factory.mktemp("previous-release"))
    imported = subprocess.run(
        [sys.executable, "-c", "import retrybus; print(retrybus.__file__)"],
        env=environment(src),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(imported.stdout.strip()).is_relative_to(src), imported.stdout
    return src


def environment(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


async def run(src: Path, *args: str) -> str:
    """``python ARGS`` under the release whose source is ``src``, to its end; its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=environment(src),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out.decode()


@contextlib.asynccontextmanager
async def previous_worker(
    src: Path, url: str, handler: str, record: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The previous release's worker in a subprocess (its stderr in ``record``.err),
    stopped (SIGTERM) afterwards."""
    with record.with_suffix(".err").open("wb") as errors:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *(str(APP), "work", url, "--handler", handler, "--record", str(record)),
            env=environment(src),
            stderr=errors,
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()


@contextlib.asynccontextmanager
async def todays_worker(url: str, handler: str, record: Path) -> AsyncIterator[None]:
    """Today's worker (tests/rolling/app.py's ``work``) in this process."""
    stop = asyncio.Event()
    task = asyncio.create_task(app.work(url, handler, str(record), stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def delivered(
    record: Path, expected: set[str], process: asyncio.subprocess.Process | None = None
) -> set[str]:
    """The ids in ``record`` once ``expected`` are all there (or the deadline passed,
    or ``process`` ended)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        seen = set((await asyncio.to_thread(_text, record)).split())
        if expected <= seen or loop.time() > deadline:
            return seen
        if process is not None and process.returncode is not None:
            return seen
        await asyncio.sleep(0.05)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def redrives_finished(url: str) -> None:
    """Wait (up to the deadline) for every redrive of the store to be final."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    async with retrybus.open_store(url) as store:
        redrives = EventBus(store).redrives
        while loop.time() < deadline:
            if all(redrive.finished for redrive in await redrives.list()):
                return
            await asyncio.sleep(0.05)


async def assert_all_readable(url: str) -> None:
    """Today's release reads every record of the store at ``url``: no retry item or
    dead letter it cannot decode, its redrives and services too; nothing waits."""
    async with retrybus.open_store(url) as store:
        bus = EventBus(store)
        undecodable = [
            (letter.id, letter.reason)
            for letter in await bus.dead_letters.list(limit=1000)
            if letter.reason.startswith("undecodable record")
        ]
        assert undecodable == []
        assert await bus.retry_queue.list(limit=1000) == []
        for redrive in await bus.redrives.list():
            assert redrive.state == "completed", redrive
        assert all(subscription.handler_name for subscription in await bus.services.list())
        await bus.services.workers()


@pytest.mark.parametrize("kind", ENGINES)
async def test_todays_worker_delivers_what_the_previous_release_wrote_once_migrated(
    kind: str, previous: Path, tmp_path: Path
) -> None:
    before, today = VERSIONS[kind]
    record = tmp_path / "today.log"
    async with fresh_url(kind, tmp_path) as url:
        # retry items, dead letters, pending and scheduled deliveries, a redrive
        published = await run(
            previous, str(APP), "publish", url, "--handler", "rolling.h", "--prefix", "old",
            "--count", str(COUNT), "--redrive",
        )  # fmt: skip
        assert json.loads(published) == {"schema_version": before}
        migrated = await run(ROOT / "src", "-m", "retrybus", "migrate", "--store", url, "--json")
        assert json.loads(migrated)["schema_version"] == today

        expected = app.event_ids("old", COUNT)  # the dead letters too: the redrive requeues them
        async with todays_worker(url, "rolling.h", record):
            handled = await delivered(record, expected)
            await redrives_finished(url)
        assert handled == expected
        await assert_all_readable(url)


@pytest.mark.parametrize("kind", ENGINES)
async def test_the_previous_releases_worker_on_a_store_today_migrated(
    kind: str, previous: Path, tmp_path: Path
) -> None:
    record = tmp_path / "previous.log"
    kinds = ("retry", "pending", "scheduled")
    async with fresh_url(kind, tmp_path) as url:
        await app.publish(url, "rolling.h", "new", COUNT, kinds)  # migrates on first use
        async with previous_worker(previous, url, "rolling.h", record) as worker:
            handled = await delivered(record, app.event_ids("new", COUNT, kinds), worker)
        errors = await asyncio.to_thread(_text, record.with_suffix(".err"))
        if kind in REFUSED:
            # it does not start: its workers must stop before `retrybus migrate`
            assert worker.returncode == app.REFUSED, errors
            assert REFUSED[kind] in errors
            assert handled == set()
            return
        assert worker.returncode == 0, errors
        assert handled == app.event_ids("new", COUNT, kinds)
        await assert_all_readable(url)


@pytest.mark.parametrize("kind", ENGINES)
async def test_both_releases_side_by_side_deliver_what_the_other_published(
    kind: str, previous: Path, tmp_path: Path
) -> None:
    if kind in REFUSED:
        pytest.skip(f"the previous release refuses a migrated {kind} store (the test above)")
    kinds = ("retry", "pending", "scheduled")
    by_previous, by_today = tmp_path / "previous.log", tmp_path / "today.log"
    async with fresh_url(kind, tmp_path) as url:
        async with retrybus.open_store(url) as store:
            await store.connect()  # today's release sets the store up
        # each worker has its own handler: it can only take what the other published
        async with (
            previous_worker(previous, url, "rolling.previous", by_previous) as worker,
            todays_worker(url, "rolling.today", by_today),
        ):
            await run(
                previous, str(APP), "publish", url, "--handler", "rolling.today", "--prefix", "old",
                "--count", str(COUNT), "--kinds", ",".join(kinds),
            )  # fmt: skip
            await app.publish(url, "rolling.previous", "new", COUNT, kinds)
            handled_by_today = await delivered(by_today, app.event_ids("old", COUNT, kinds))
            handled_by_previous = await delivered(
                by_previous, app.event_ids("new", COUNT, kinds), worker
            )
        assert handled_by_today == app.event_ids("old", COUNT, kinds)
        assert handled_by_previous == app.event_ids("new", COUNT, kinds)
        assert worker.returncode == 0
        await assert_all_readable(url)


# the next upgrades: today's release is the older one ---------------------------------


@pytest.mark.parametrize("kind", ENGINES)
async def test_todays_worker_keeps_working_on_a_later_schema_compatible_with_its_own(
    kind: str, tmp_path: Path
) -> None:
    record = tmp_path / "today.log"
    async with fresh_url(kind, tmp_path) as url:
        await app.publish(url, "rolling.h", "new", COUNT, ("retry",))
        later = await migrate_as_later_release(kind, url, compatible_from=TODAY[kind])
        async with todays_worker(url, "rolling.h", record):
            handled = await delivered(record, app.event_ids("new", COUNT, ("retry",)))
        assert handled == app.event_ids("new", COUNT, ("retry",))
        async with retrybus.open_store(url) as store:
            reported = await store.schema_version()
        assert reported in (later, None)  # left at the later version (None: not reported)


@pytest.mark.parametrize("recorded", ["later", "nothing"])
@pytest.mark.parametrize("kind", ENGINES)
async def test_a_later_schema_not_compatible_with_todays_is_refused_saying_what_it_needs(
    kind: str, recorded: str, tmp_path: Path
) -> None:
    async with fresh_url(kind, tmp_path) as url:
        async with retrybus.open_store(url) as store:
            await store.connect()
        later = TODAY[kind] + 1
        await migrate_as_later_release(kind, url, later if recorded == "later" else None)
        needs = (
            f"can be used by retrybus of schema version {later} or later"
            if recorded == "later"
            else "records no older version that can use it"
        )
        store = retrybus.open_store(url)
        try:
            with pytest.raises(StoreUnusable) as refused:
                await store.connect()
        finally:
            await store.close()
        assert f"has schema version {later}, newer than this retrybus knows ({TODAY[kind]})" in (
            str(refused.value)
        )
        assert needs in str(refused.value)
