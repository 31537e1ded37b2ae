"""The ``retrybus`` command line on the server engines (PostgreSQL, Redis, MongoDB):
every command on a store seeded through the library, a worker process that
stops on SIGTERM, and one-line errors for unreachable servers and malformed URLs.

Each test gets a namespace of its own from ``tests/engines/<kind>.py`` (a schema,
a key prefix, a database); an unreachable server skips the test (fails with CI=true).
Commands run in a thread through CliRunner (each runs its own event loop, away
from the test's), and at least once per engine as a real ``retrybus`` process.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import retrybus
from cli_runner import invoke, json_of, ok
from engines import mongodb, postgresql, redis
from retrybus import (
    Event,
    EventBus,
    FixedDelay,
    PermanentError,
    Store,
    StoreUnavailable,
)
from retrybus._cli.output import record_to_dict

APPS = Path(__file__).parent / "apps"
WITH_APP = ("--app", "cli_app:bus", "--app-dir", str(APPS))
RETRYBUS = Path(sys.executable).parent / "retrybus"
ENGINES = ["postgresql", "redis", "mongodb"]
PASSWORD = "s3cretPa55"


def store_url(kind: str, store: Store) -> str:
    """The full URL (with any password) of the namespace a fixture store opened."""
    if kind == "postgresql":
        return postgresql.url_with_schema(store.schema)  # type: ignore[attr-defined]
    if kind == "redis":
        return redis.store_url(store.prefix)  # type: ignore[attr-defined]
    return mongodb.database_url(store.database_name, timeout="10")  # type: ignore[attr-defined]


# running the command line --------------------------------------------------------------


def run_retrybus(*args: object, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RETRYBUS), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def run_process(*args: object, seconds: float = 30) -> subprocess.CompletedProcess[str]:
    """The installed ``retrybus`` as a process (waited for in a thread: MongoDB's
    test server runs in this process and must keep answering)."""
    return await asyncio.to_thread(run_retrybus, *args, timeout=seconds)


def one_line_error(output: str, code: int, expected: int | None = None) -> str:
    """The command exited non-zero (``expected`` when given) with exactly one
    ``Error: …`` line on stderr, no traceback."""
    assert code != 0, output
    if expected is not None:
        assert code == expected, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    return lines[0]


# a seeded store --------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    kind: str
    url: str
    store: Store
    bus: EventBus
    calls: Path
    comments: list[str]  # dead letters of CommentNotificationHandler (comment.created)
    likes: list[str]  # dead letters of FeedUpdateHandler (like.added)
    healthy: str  # one of ``comments`` whose event the test app's handler takes
    retry_items: list[str]  # SocialStatisticsHandler, by next retry, earliest first


async def _seed(kind: str, store: Store, calls: Path) -> Seeded:
    """3 comments whose handler fails for good (dead letters), 2 likes of which one
    handler fails for good (dead letters) and one fails for now (retry items due
    in an hour), and one retry that succeeded (so the stats have a success rate)."""
    bus = EventBus(store, default_policy=FixedDelay(3, 3600.0))

    @bus.handler("comment.created", name="CommentNotificationHandler")
    async def notify(event: Event) -> None:
        raise PermanentError("mailbox does not exist")

    @bus.handler("like.added", name="FeedUpdateHandler")
    async def update_feed(event: Event) -> None:
        raise PermanentError("post was deleted")

    @bus.handler("like.added", name="SocialStatisticsHandler")
    async def count_like(event: Event) -> None:
        raise TimeoutError("connection timeout")

    for n in range(3):
        data = {"comment_id": n, "out": str(calls), "fail": n == 2}
        await bus.publish(Event("comment.created", data, source="SocialService"))
    for n in range(2):
        await bus.publish(Event("like.added", {"post_id": n}, source="SocialService"))
    done = await bus.retry_queue.add(Event("like.added", {}), "SocialStatisticsHandler", "slow")
    assert await bus.retry_queue.mark_success(done)
    comments = await bus.dead_letters.list(handler_name="CommentNotificationHandler")
    likes = await bus.dead_letters.list(handler_name="FeedUpdateHandler")
    retry_items = await bus.retry_queue.list()
    assert (len(comments), len(likes), len(retry_items)) == (3, 2, 2)
    return Seeded(
        kind=kind,
        url=store_url(kind, store),
        store=store,
        bus=bus,
        calls=calls,
        comments=[item.id for item in comments],
        likes=[item.id for item in likes],
        healthy=next(item.id for item in comments if not item.event_data["fail"]),
        retry_items=[item.id for item in retry_items],
    )


@pytest.fixture(params=ENGINES)
async def fresh(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Store]]:
    """A connected store in a namespace of its own on each server engine."""
    engine = importlib.import_module(f"engines.{request.param}")
    async with engine.open_test_store() as store:
        yield request.param, store


@pytest.fixture
async def seeded(fresh: tuple[str, Store], tmp_path: Path) -> Seeded:
    kind, store = fresh
    return await _seed(kind, store, tmp_path / "calls.jsonl")


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


# every command on every engine ------------------------------------------------------------


async def test_stats_json_is_the_bus_stats(seeded: Seeded) -> None:
    expected = (await seeded.bus.stats()).to_dict()
    assert expected["dead_letter_queue_size"] == 5
    assert expected["unprocessed_dead_letters"] == 5
    assert expected["retry_queue_size"] == 2
    assert expected["retries_scheduled"] == 3
    assert expected["retries_succeeded"] == 1
    assert expected["retry_success_rate"] == 1.0
    assert await json_of("stats", "--store", seeded.url) == expected
    table = (await ok("stats", "--store", seeded.url)).stdout
    assert "dead letters" in table


async def test_the_installed_executable_prints_stats_and_dead_letters(seeded: Seeded) -> None:
    done = await run_process("stats", "--store", seeded.url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == (await seeded.bus.stats()).to_dict()
    done = await run_process("dlq", "show", seeded.likes[0], "--store", seeded.url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["handler_name"] == "FeedUpdateHandler"
    done = await run_process("dlq", "show", "dlq_nope", "--store", seeded.url)
    assert (done.returncode, done.stderr) == (1, "Error: no item with id 'dlq_nope'\n")


async def test_dlq_list_json_gives_every_dead_letter_and_filters(seeded: Seeded) -> None:
    everything = await json_of("dlq", "list", "--store", seeded.url)
    assert set(_ids(everything)) == {*seeded.comments, *seeded.likes}
    created = [datetime.fromisoformat(item["created_at"]) for item in everything]
    assert created == sorted(created, reverse=True)
    by_handler = await json_of(
        "dlq", "list", "--store", seeded.url, "--handler", "FeedUpdateHandler"
    )
    assert set(_ids(by_handler)) == set(seeded.likes)
    by_type = await json_of(
        "dlq", "list", "--store", seeded.url, "--event-type", "comment.created", "--limit", "2"
    )
    assert len(by_type) == 2
    assert set(_ids(by_type)) < set(seeded.comments)
    assert {item["reason"] for item in by_type} == {"non-retryable: PermanentError"}
    assert await json_of("dlq", "list", "--store", seeded.url, "--processed") == []


async def test_dlq_show_json_has_the_event_and_the_error(seeded: Seeded) -> None:
    target = seeded.comments[0]
    item = await json_of("dlq", "show", target, "--store", seeded.url)
    stored = await seeded.bus.dead_letters.get(target)
    assert item == json.loads(json.dumps(record_to_dict(stored)))
    assert item["id"] == target
    assert item["event_type"] == "comment.created"
    assert item["event_source"] == "SocialService"
    assert item["handler_name"] == "CommentNotificationHandler"
    assert item["error"] == "mailbox does not exist"
    assert item["error_type"].endswith("PermanentError")
    assert item["processed_at"] is None
    assert datetime.fromisoformat(item["event_timestamp"]).tzinfo is not None


async def test_a_dead_letter_id_may_be_a_unique_start_of_one(seeded: Seeded) -> None:
    target = seeded.comments[0]
    start = target[:-4]  # the last hex digits of an id are random
    assert (await json_of("dlq", "show", start, "--store", seeded.url))["id"] == target
    result = await invoke("dlq", "delete", start, "dlq_", "--store", seeded.url)
    message = one_line_error(result.stderr, result.exit_code, 1)
    assert "'dlq_' starts more than one id" in message
    assert all(item_id in message for item_id in seeded.comments + seeded.likes)
    assert target in {d.id for d in await seeded.bus.dead_letters.list(1000)}
    assert (await json_of("dlq", "delete", start, "--store", seeded.url)) == {"deleted": target}


async def test_dlq_requeue_moves_the_dead_letter_to_the_retry_queue(seeded: Seeded) -> None:
    target = seeded.likes[0]
    requeued = await json_of("dlq", "requeue", target, "--store", seeded.url)
    assert requeued["id"].startswith("retry_")
    assert requeued["metadata"]["requeued_from"] == target
    assert target not in _ids(await json_of("dlq", "list", "--store", seeded.url))
    queued = await json_of("queue", "list", "--store", seeded.url)
    assert requeued["id"] in _ids(queued)
    item = await seeded.bus.retry_queue.get(requeued["id"])
    assert item.handler_name == "FeedUpdateHandler"
    assert item.next_retry <= datetime.now(UTC)
    assert target not in {d.id for d in await seeded.bus.dead_letters.list(1000)}


async def test_dlq_reprocess_with_the_app_calls_the_handler(seeded: Seeded) -> None:
    target = seeded.healthy
    item = await json_of("dlq", "reprocess", target, "--store", seeded.url, *WITH_APP)
    assert item["reprocess_succeeded"] is True
    assert item["processed"] is True
    calls = [json.loads(line) for line in seeded.calls.read_text().splitlines()]
    assert [(c["handler"], c["what"]) for c in calls] == [("CommentNotificationHandler", "done")]
    stored = await seeded.bus.dead_letters.get(target)
    assert stored.processed
    assert stored.metadata["reprocess_count"] == 1
    processed = await json_of("dlq", "list", "--store", seeded.url, "--processed")
    assert _ids(processed) == [target]


async def test_dlq_delete_removes_the_dead_letter_once(seeded: Seeded) -> None:
    target = seeded.likes[1]
    out = (await ok("dlq", "delete", target, "--store", seeded.url)).stdout
    assert out.strip() == f"deleted {target}"
    assert target not in {d.id for d in await seeded.bus.dead_letters.list(1000)}
    again = await invoke("dlq", "delete", target, "--store", seeded.url)
    assert one_line_error(again.stderr, again.exit_code, 1) == f"Error: no item with id '{target}'"


async def test_dlq_purge_all_deletes_every_dead_letter(seeded: Seeded) -> None:
    purged = await json_of("dlq", "purge", "--store", seeded.url, "--all", "--yes")
    assert purged == {"deleted": 5}
    assert await seeded.bus.dead_letters.count() == 0
    assert await seeded.bus.retry_queue.count() == 2  # the retry queue is left alone


async def test_queue_list_json_orders_by_next_retry_and_filters(seeded: Seeded) -> None:
    items = await json_of("queue", "list", "--store", seeded.url)
    assert _ids(items) == seeded.retry_items
    due = [datetime.fromisoformat(item["next_retry"]) for item in items]
    assert due == sorted(due)
    assert {item["handler_name"] for item in items} == {"SocialStatisticsHandler"}
    assert {item["error"] for item in items} == {"connection timeout"}
    only = await json_of("queue", "list", "--store", seeded.url, "--event-type", "comment.created")
    assert only == []
    first = await json_of("queue", "list", "--store", seeded.url, "--limit", "1", "--offset", "1")
    assert _ids(first) == seeded.retry_items[1:]


async def test_migrate_reports_the_store_and_its_schema_version(
    fresh: tuple[str, Store],
) -> None:
    kind, store = fresh
    url = store_url(kind, store)
    reported = await json_of("migrate", "--store", url)
    assert reported["store"] == store.url
    if kind == "postgresql":
        from retrybus._stores.postgresql import SCHEMA_VERSION

        assert reported["schema_version"] == SCHEMA_VERSION
    else:
        assert reported["schema_version"] is None
    again = await json_of("migrate", "--store", url)  # idempotent
    assert again == reported
    assert await store.retry_count() == 0


# the worker process ------------------------------------------------------------------


def start_worker(url: str) -> subprocess.Popen[str]:
    command = ["worker", "cli_app:bus", "--store", url, "--check-interval", "0.1"]
    return subprocess.Popen(
        [str(RETRYBUS), *command, "--app-dir", str(APPS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_worker_process_retries_due_items_and_exits_0_on_sigterm(
    fresh: tuple[str, Store], tmp_path: Path
) -> None:
    kind, store = fresh
    url = store_url(kind, store)
    bus = EventBus(store)
    calls = tmp_path / "calls.jsonl"
    events = [Event("like.added", {"post_id": n, "out": str(calls)}) for n in range(5)]
    for event in events:
        await bus.retry_queue.add(
            event, "SocialStatisticsHandler", TimeoutError("slow"), next_retry=datetime.now(UTC)
        )
    worker = start_worker(url)
    try:
        deadline = time.monotonic() + 20
        while await bus.retry_queue.count():
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline, "timed out waiting for the retries"
            await asyncio.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(worker.communicate, timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    assert "SIGTERM received" in stderr
    assert "Traceback" not in stderr
    calls_made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sorted(c["event_id"] for c in calls_made) == sorted(e.id for e in events)
    assert {c["pid"] for c in calls_made} == {worker.pid}
    stats = await bus.stats()
    assert stats.retries_succeeded == 5
    assert stats.dead_letter_queue_size == 0


# unreachable servers and malformed URLs ----------------------------------------------

UNREACHABLE = {
    "postgresql": (
        f"postgresql://me:{PASSWORD}@127.0.0.1:1/test?connect_timeout=2",
        "postgresql://me:***@127.0.0.1:1/test",
    ),
    "redis": (
        f"redis://me:{PASSWORD}@127.0.0.1:1/0?socket_connect_timeout=1",
        "redis://me:***@127.0.0.1:1/0",
    ),
    "mongodb": (
        f"mongodb://me:{PASSWORD}@127.0.0.1:1/retrybus?timeout=0.5",
        "mongodb://me:***@127.0.0.1:1/retrybus",
    ),
}


@pytest.mark.parametrize("kind", ENGINES)
async def test_open_store_on_an_unreachable_server_raises_store_unavailable(kind: str) -> None:
    url, shown = UNREACHABLE[kind]
    store = retrybus.open_store(url)
    assert PASSWORD not in store.url
    with pytest.raises(StoreUnavailable) as caught:
        await store.connect()
    await store.close()
    message = str(caught.value)
    assert shown in message
    assert PASSWORD not in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("kind", ENGINES)
async def test_the_cli_and_the_worker_report_an_unreachable_server_in_one_line(
    kind: str,
) -> None:
    url, shown = UNREACHABLE[kind]
    stats, worker = await asyncio.gather(
        run_process("stats", "--store", url),
        run_process("worker", "cli_app:bus", "--store", url, "--app-dir", APPS, "--fail-fast"),
    )
    for done in (stats, worker):
        line = one_line_error(done.stderr, done.returncode)
        assert shown in line
        assert PASSWORD not in done.stderr + done.stdout


MALFORMED = {
    "postgresql": [
        (f"postgresql://me:{PASSWORD}@127.0.0.1:5432/test?nosuch=1", "unknown option"),
        (f"postgresql://me:{PASSWORD}@127.0.0.1:5432/test/extra", "one database name"),
        (f"postgresql://me:{PASSWORD}@127.0.0.1:notaport/test", "malformed store URL"),
        (f"postgresql://me:{PASSWORD}@127.0.0.1/test?connect_timeout=soon", "must be numbers"),
    ],
    "redis": [
        (f"redis://me:{PASSWORD}@127.0.0.1:6379/zero", "must be a database number"),
        (f"redis://me:{PASSWORD}@127.0.0.1:6379/0?nosuch=1", "unknown option 'nosuch'"),
        (f"redis://me:{PASSWORD}@127.0.0.1:6379/0?prefix=a b", "key prefix"),
        (f"redis://me:{PASSWORD}@:6379/0", "no host"),
    ],
    "mongodb": [
        (f"mongodb://me:{PASSWORD}@127.0.0.1:27017", "no database name"),
        (f"mongodb://me:{PASSWORD}@127.0.0.1:27017/db?timeout=-1", "timeout"),
        (f"mongodb://me:{PASSWORD}@127.0.0.1:27017/a.b c", "invalid database name"),
        (f"mongodb://me:{PASSWORD}@127.0.0.1:27017/db?w=banana&journal=maybe", "malformed"),
    ],
}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        pytest.param(url, says, id=f"{kind}-{n}")
        for kind in ENGINES
        for n, (url, says) in enumerate(MALFORMED[kind])
    ],
)
async def test_a_malformed_url_is_a_one_line_error_everywhere(url: str, says: str) -> None:
    shown = url.replace(PASSWORD, "***")
    with pytest.raises(ValueError, match=re.escape(says)) as caught:
        retrybus.open_store(url)
    assert PASSWORD not in str(caught.value)
    stats = await invoke("stats", "--store", url)
    line = one_line_error(stats.stderr, stats.exit_code, 2)
    assert says in line
    assert PASSWORD not in stats.output
    worker = await invoke("worker", "cli_app:bus", "--store", url, "--app-dir", APPS)
    assert one_line_error(worker.stderr, worker.exit_code, 2) == line
    assert shown.split("?")[0].split("/")[2] in line  # names the URL's host, without the password


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://me:{PASSWORD}@[::1/test",
        f"redis://me:{PASSWORD}@[::1:6379/0",
        f"mongodb://me:{PASSWORD}@[::1/db",
    ],
    ids=ENGINES,
)
async def test_a_url_urlsplit_rejects_is_reported_without_its_password(url: str) -> None:
    stats = await invoke("stats", "--store", url)
    one_line_error(stats.stderr, stats.exit_code, 2)
    assert PASSWORD not in stats.output
