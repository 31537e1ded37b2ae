"""Services across processes (issue 12), on every engine shared across processes:
three services with two worker processes each and two publisher processes, a
worker killed with SIGKILL mid-run; a service whose workers are all stopped, which
catches up when one starts while the others go on; a service registered late;
pruned and removed subscriptions, whose waiting deliveries are dead-lettered with
the reason, never dropped and never run as "unknown handler".
Processes: tests/apps/service_worker.py."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from call_records import Call, clashes, read_calls
from conftest import ENGINES, fresh_store
from retrybus import Event, EventBus, Store, open_store
from test_conformance_engines import needs
from test_durable_processes import finish, killable

APP = Path(__file__).parent / "apps" / "service_worker.py"

pytestmark = pytest.mark.slow

#: service -> handler -> pattern: two services name a handler alike (Audit), one
#: service has two handlers for one type (billing's Invoice and Receipt)
SERVICES = {
    "billing": {"Invoice": "order.placed", "Receipt": "order.placed", "Audit": "order.*"},
    "shipping": {"Ship": "order.paid"},
    "crm": {"Welcome": "user.signed_up", "Audit": "*"},
}
TYPES = ("order.placed", "order.paid", "user.signed_up", "like.added")


def handler_args(handlers: dict[str, str]) -> list[str]:
    return [f"--handler={name}={pattern}" for name, pattern in handlers.items()]


#: the processes the running test started: killed when it ends, failed or not
_started: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
def _kill_what_is_left() -> Iterator[None]:
    yield
    while _started:
        process = _started.pop()
        if process.returncode is None:  # by pid: the test's event loop may be closed
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


async def start(url: str, service: str, record: Path, *args: str) -> asyncio.subprocess.Process:
    log = record.with_suffix(".log").open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP),
        f"--store={url}",
        f"--service={service}",
        f"--record={record}",
        *args,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _started.append(process)
    return process


async def stop(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    assert await finish(process, 60) == 0


async def eventually(condition: Callable[[], object], what: str, within: float = 180) -> None:
    deadline = time.monotonic() + within
    while not await _holds(condition):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting until {what}")
        await asyncio.sleep(0.1)


async def _holds(condition: Callable[[], object]) -> bool:
    result = condition()
    if asyncio.iscoroutine(result):
        result = await result
    return bool(result)


def calls_in(paths: Iterable[Path]) -> list[Call]:
    return [call for path in paths for call in read_calls(path)]


def finished(calls: list[Call]) -> set[str]:
    return {call.event_id for call in calls if call.end is not None}


def published(paths: Iterable[Path]) -> dict[str, str]:
    """event id -> type, of what the publisher processes published."""
    found: dict[str, str] = {}
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                event_id, event_type = line.split()
                found[event_id] = event_type
    return found


def expected_keys(events: dict[str, str]) -> set[str]:
    """Every (service, handler, event) that should be handled, as record keys."""
    return {
        f"{service}/{handler}/{event_id}"
        for event_id, event_type in events.items()
        for service, handlers in SERVICES.items()
        for handler, pattern in handlers.items()
        if fnmatch.fnmatchcase(event_type, pattern)
    }


async def registered(store: Store, expected: set[str]) -> bool:
    stored = await EventBus(store).services.list()
    return {f"{s.service}/{s.handler_name}" for s in stored} >= expected


@needs("shared_across_processes")
async def test_three_services_two_workers_each_two_publishers_and_a_kill(
    kind: str, tmp_path: Path
) -> None:
    per_publisher = 2500 if kind != "mongodb" else 150
    async with killable(kind, tmp_path) as (url, store):
        records = {
            (service, n): tmp_path / f"{service}-{n}.calls" for service in SERVICES for n in (1, 2)
        }
        # short, so that what the killed worker held runs again soon; SecantusDB, a
        # server in Python shared by nine processes, can take longer than that to
        # write an outcome (the lease would run out: handled again, at least once)
        lease = ("--lease=2" if kind != "mongodb" else "--lease=15",)
        workers = {
            (service, n): await start(
                url,
                service,
                record,
                *handler_args(SERVICES[service]),
                f"--name={service}-{n}",
                "--sleep-max=0.002",
                *lease,
            )
            for (service, n), record in records.items()
        }
        every_handler = {f"{s}/{h}" for s, handlers in SERVICES.items() for h in handlers}
        await eventually(lambda: registered(store, every_handler), "every service registered")
        publisher_records = [tmp_path / f"shop-{n}.calls" for n in (1, 2)]
        publishers = [
            await start(
                url,
                "shop",
                record,
                f"--publish={per_publisher}",
                f"--types={','.join(TYPES)}",
                "--publish-concurrency=20",
                f"--id-prefix=p{n}",
            )
            for n, record in enumerate(publisher_records, 1)
        ]
        # kill one billing worker once it is in the middle of its share
        killed = workers["billing", 1]
        # (billing has 2 * per_publisher deliveries to run, about half each)
        await eventually(
            lambda: len(read_calls(records["billing", 1])) >= per_publisher // 8,
            "billing-1 handled some",
        )
        killed.send_signal(signal.SIGKILL)
        await killed.wait()
        records["billing", 3] = tmp_path / "billing-3.calls"
        workers["billing", 3] = await start(
            url, "billing", records["billing", 3], *handler_args(SERVICES["billing"]), *lease
        )
        for publisher, record in zip(publishers, publisher_records, strict=True):
            assert await finish(publisher) == 0, record.with_suffix(".log").read_text()
        events = published(Path(f"{record}.published") for record in publisher_records)
        assert len(events) == 2 * per_publisher
        expected = expected_keys(events)
        await eventually(
            lambda: finished(calls_in(records.values())) >= expected, "every delivery handled"
        )
        # what the killed worker held runs again once its lease has run out
        await eventually(lambda: _empty(store), "the retry queue is empty")
        for key, worker in workers.items():
            if worker is not killed:
                await stop(worker)
                assert "Traceback" not in records[key].with_suffix(".log").read_text()

        calls = calls_in(records.values())
        # every matching (event, service, handler) handled, and nothing else: no
        # worker ran another service's delivery (billing's and crm's Audit differ)
        assert finished(calls) == expected
        for (service, _n), record in records.items():
            assert {c.event_id.split("/")[0] for c in read_calls(record)} <= {service}
        # once where no process was killed; a repeat only of what the killed one held
        counts = Counter(call.event_id for call in calls)
        killed_held = {c.event_id for c in calls if c.pid == killed.pid}
        repeated = {key for key, n in counts.items() if n > 1}
        assert repeated <= killed_held
        assert all(key.startswith("billing/") for key in repeated)
        # never twice at once (the killed calls just stopped)
        assert clashes([call for call in calls if call.end is not None]) == {}
        assert await store.retry_count() == 0
        assert await EventBus(store).dead_letters.count() == 0
        assert read_calls(publisher_records[0]) == []  # the shop has no handlers


@needs("shared_across_processes")
async def test_a_stopped_service_accumulates_its_deliveries_and_catches_up(
    kind: str, tmp_path: Path
) -> None:
    count = 1000 if kind != "mongodb" else 300
    async with fresh_store(kind, tmp_path) as store:
        url = ENGINES[kind].namespace_url(store)
        handler = ("--handler=Count=job.*",)
        running = await start(url, "running", tmp_path / "running.calls", *handler)
        paused = await start(url, "paused", tmp_path / "paused-1.calls", *handler)
        await eventually(
            lambda: registered(store, {"running/Count", "paused/Count"}), "both registered"
        )
        await stop(paused)  # a deploy: no worker of it runs
        publisher = await start(
            url,
            "shop",
            tmp_path / "shop.calls",
            f"--publish={count}",
            "--publish-concurrency=20",
        )
        assert await finish(publisher) == 0, (tmp_path / "shop.log").read_text()
        every = {f"e-{n}" for n in range(count)}

        def handled(record: str, service: str) -> set[str]:
            return {
                key.removeprefix(f"{service}/Count/")
                for key in finished(read_calls(tmp_path / record))
            }

        # the running service handles everything while the paused one waits
        await eventually(lambda: handled("running.calls", "running") == every, "running done")
        bus = EventBus(store)
        await eventually(lambda: _nothing_waits(bus, "running"), "running's outcomes written")
        summaries = {s.service: s for s in await bus.services.overview()}
        assert (summaries["paused"].waiting, summaries["running"].waiting) == (count, 0)
        assert summaries["paused"].warning == "no live worker"
        assert summaries["running"].warning is None
        assert read_calls(tmp_path / "paused-1.calls") == []
        # a worker of it starts: it catches up, each delivery once
        paused = await start(url, "paused", tmp_path / "paused-2.calls", *handler)
        await eventually(lambda: handled("paused-2.calls", "paused") == every, "paused caught up")
        await stop(paused)
        await stop(running)
        for record in ("running.calls", "paused-2.calls"):
            assert (
                Counter(c.event_id for c in read_calls(tmp_path / record)).most_common(1)[0][1] == 1
            )
        assert await store.retry_count() == 0


@needs("shared_across_processes")
async def test_a_service_registered_later_receives_only_later_events(
    kind: str, tmp_path: Path
) -> None:
    async with fresh_store(kind, tmp_path) as store:
        url = ENGINES[kind].namespace_url(store)
        shop = EventBus(store, service="shop", route_refresh=0)
        for n in range(50):
            await shop.publish(Event("job.run", id=f"before-{n}"))
        late = await start(url, "late", tmp_path / "late.calls", "--handler=Late=job.*")
        await eventually(lambda: registered(store, {"late/Late"}), "late registered")
        for n in range(50):
            await shop.publish(Event("job.run", id=f"after-{n}"))
        after = {f"late/Late/after-{n}" for n in range(50)}
        await eventually(lambda: finished(read_calls(tmp_path / "late.calls")) >= after, "handled")
        await stop(late)
        assert finished(read_calls(tmp_path / "late.calls")) == after
        assert await store.retry_count() == 0


@needs("shared_across_processes")
async def test_pruned_and_removed_subscriptions_leave_no_orphans(kind: str, tmp_path: Path) -> None:
    async with fresh_store(kind, tmp_path) as store:
        url = ENGINES[kind].namespace_url(store)
        reports = {"Daily": "job.*", "Weekly": "job.*", "Monthly": "job.*"}
        worker = await start(url, "reports", tmp_path / "first.calls", *handler_args(reports))
        await eventually(
            lambda: registered(store, {f"reports/{name}" for name in reports}), "registered"
        )
        await stop(worker)
        # a publisher in its own process would keep its routes for route_refresh:
        # one with its own store object and a long refresh keeps the stale copy
        async with open_store(url) as elsewhere:
            shop = EventBus(elsewhere, service="shop", route_refresh=3600)
            for n in range(20):
                await shop.publish(Event("job.run", id=f"a-{n}"))
            # the code of reports no longer has Monthly; a person removes Weekly
            pruner = EventBus(store, service="reports")
            pruner.subscribe("job.*", _noop, name="Daily")
            pruner.subscribe("job.*", _noop, name="Weekly")
            assert (await pruner.register(prune=True, actor="deploy 42")).removed == ("Monthly",)
            removal = await pruner.services.remove("reports", "Weekly", actor="alice", force=True)
            assert (removal.removed, removal.dead_lettered) == (("Weekly",), 20)
            # the stale publisher still routes to all three
            for n in range(20):
                await shop.publish(Event("job.run", id=f"b-{n}"))
        worker = await start(url, "reports", tmp_path / "second.calls", "--handler=Daily=job.*")
        daily = {f"reports/Daily/{p}-{n}" for p in "ab" for n in range(20)}
        await eventually(lambda: finished(read_calls(tmp_path / "second.calls")) >= daily, "daily")
        bus = EventBus(store)
        await eventually(lambda: _empty(store), "the sweep took what waited for removed ones")
        await stop(worker)
        assert finished(read_calls(tmp_path / "second.calls")) == daily
        dead = await bus.dead_letters.list(limit=1000)
        reasons = Counter((d.handler_name, d.reason) for d in dead)
        assert reasons == {
            ("Weekly", "subscription removed: reports/Weekly (by alice)"): 40,
            ("Monthly", "subscription removed: reports/Monthly (by deploy 42)"): 40,
        }
        assert not any("unknown handler" in d.reason for d in dead)


async def _nothing_waits(bus: EventBus, service: str) -> bool:
    return all(s.waiting == 0 for s in await bus.services.overview(service))


async def _empty(store: Store) -> bool:
    return await store.retry_count() == 0


async def _noop(event: Event) -> None:
    pass
