"""The ``retrybus`` command line against real SQLite files: inspect and act on
both queues, JSON for scripts, one-line errors, and a worker process that stops
gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import retrybus
from retrybus import Event, EventBus, FixedDelay, ManualClock, PermanentError, RetryWorker
from retrybus._cli.app import app

APPS = Path(__file__).parent / "apps"
WITH_APP = ("--app", "cli_app:bus", "--app-dir", APPS)
RETRYBUS = Path(sys.executable).parent / "retrybus"

runner = CliRunner()


def invoke(*args: object, input: str | None = None) -> Result:
    return runner.invoke(app, [str(arg) for arg in args], input=input)


def ok(*args: object, input: str | None = None) -> Result:
    result = invoke(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


def json_of(*args: object) -> Any:
    return json.loads(ok(*args, "--json").stdout)


def one_line_error(result: Result, code: int = 1) -> str:
    """The command failed with ``code`` and said why in one line, without a traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[0]


def with_bus(url: str, action: Callable[[EventBus], Any]) -> Any:
    """Run ``await action(bus)`` on a plain bus over the store at ``url``."""

    async def main() -> Any:
        async with EventBus(retrybus.open_store(url)) as bus:
            return await action(bus)

    return asyncio.run(main())


@dataclass(frozen=True)
class Seeded:
    """A store holding dead letters and retry items made through the real bus."""

    url: str
    calls: Path
    old: list[str]  # CommentNotificationHandler, failed after 3 retries, created in 2025
    recent: list[str]  # FeedUpdateHandler, non-retryable, created now
    processed: str  # one of ``recent``, reprocessed successfully
    failing: str  # one of ``old`` whose event makes the test app's handler fail
    healthy: str  # one of ``old`` whose event the test app's handler takes
    retry_items: list[str]  # by next retry, earliest first


async def _seed(url: str, calls: Path) -> Seeded:
    clock = ManualClock()  # 2025-01-07: old
    async with EventBus(
        retrybus.open_store(url), clock=clock, default_policy=FixedDelay(3, 1.0)
    ) as bus:

        @bus.handler("comment.created", name="CommentNotificationHandler")
        async def notify(event: Event) -> None:
            raise ConnectionError("email service unavailable")

        @bus.handler("like.added", name="FeedUpdateHandler")
        async def update_feed(event: Event) -> None:
            raise PermanentError("post was deleted")

        for n in range(3):
            data = {"comment_id": n, "out": str(calls), "fail": n == 2}
            await bus.publish(Event("comment.created", data, source="SocialService"))
        worker = RetryWorker(bus)
        for _ in range(3):
            clock.advance(1.5)
            await worker.run_once()
        old = await bus.dead_letters.list(handler_name="CommentNotificationHandler")
        assert [item.reason for item in old] == ["failed after 3 retries"] * 3

        clock.set(datetime.now(UTC))
        for n in range(2):
            await bus.publish(Event("like.added", {"post_id": n}, source="SocialService"))
        recent = await bus.dead_letters.list(handler_name="FeedUpdateHandler")
        bus.unsubscribe("FeedUpdateHandler")
        bus.subscribe("like.added", lambda event: None, name="FeedUpdateHandler")
        processed = await bus.dead_letters.reprocess(recent[0].id)
        assert processed.processed

        later = await bus.retry_queue.add(
            Event("like.added", {"post_id": 9}),
            "SocialStatisticsHandler",
            TimeoutError("connection timeout"),
            next_retry=clock.now() + timedelta(hours=1),
        )
        sooner = await bus.retry_queue.add(
            Event("comment.created", {"comment_id": 9}),
            "CommentNotificationHandler",
            "email service unavailable",
            next_retry=clock.now() + timedelta(minutes=1),
        )
    return Seeded(
        url=url,
        calls=calls,
        old=[item.id for item in old],
        recent=[item.id for item in recent],
        processed=processed.id,
        failing=next(item.id for item in old if item.event_data["fail"]),
        healthy=next(item.id for item in old if not item.event_data["fail"]),
        retry_items=[sooner.id, later.id],
    )


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    return asyncio.run(_seed(f"sqlite:///{tmp_path / 'queues.db'}", tmp_path / "calls.jsonl"))


def dead_letter_ids(url: str) -> set[str]:
    return {item.id for item in with_bus(url, lambda bus: bus.dead_letters.list(1000))}


# dlq list / show --------------------------------------------------------------


def test_dlq_list_json_gives_every_dead_letter_newest_first(seeded: Seeded) -> None:
    items = json_of("dlq", "list", "--store", seeded.url)
    assert {item["id"] for item in items} == {*seeded.old, *seeded.recent}
    created = [datetime.fromisoformat(item["created_at"]) for item in items]
    assert created == sorted(created, reverse=True)
    assert all(moment.tzinfo is not None for moment in created)


def test_dlq_list_json_filters_by_handler_event_type_and_processed(seeded: Seeded) -> None:
    by_handler = json_of("dlq", "list", "--store", seeded.url, "--handler", "FeedUpdateHandler")
    assert {item["id"] for item in by_handler} == set(seeded.recent)
    by_type = json_of("dlq", "list", "--store", seeded.url, "--event-type", "comment.created")
    assert {item["id"] for item in by_type} == set(seeded.old)
    assert {item["reason"] for item in by_type} == {"failed after 3 retries"}
    processed = json_of("dlq", "list", "--store", seeded.url, "--processed")
    assert [item["id"] for item in processed] == [seeded.processed]
    unprocessed = json_of("dlq", "list", "--store", seeded.url, "--unprocessed")
    assert seeded.processed not in {item["id"] for item in unprocessed}
    assert len(unprocessed) == 4


def test_dlq_list_pages_with_limit_and_offset(seeded: Seeded) -> None:
    everything = [item["id"] for item in json_of("dlq", "list", "--store", seeded.url)]
    first = json_of("dlq", "list", "--store", seeded.url, "--limit", "2")
    rest = json_of("dlq", "list", "--store", seeded.url, "--limit", "10", "--offset", "2")
    assert [item["id"] for item in first + rest] == everything


def test_dlq_list_table_shows_ids_reasons_and_how_to_page(seeded: Seeded) -> None:
    out = ok("dlq", "list", "--store", seeded.url, "--limit", "3").stdout
    assert seeded.recent[0] in out
    assert "non-retryable:" in out  # the reason, wrapped between its words when narrow
    assert "PermanentError" in out
    assert "showing 1–3 of 5; --offset 3 for more" in out


def test_dlq_show_json_has_the_event_error_and_iso_timestamps(seeded: Seeded) -> None:
    item = json_of("dlq", "show", seeded.old[0], "--store", seeded.url)
    assert item["id"] == seeded.old[0]
    assert item["event_type"] == "comment.created"
    assert item["event_source"] == "SocialService"
    assert item["error"] == "email service unavailable"
    assert item["error_type"] == "ConnectionError"
    assert item["attempt"] == 3
    assert datetime.fromisoformat(item["event_timestamp"]).tzinfo is not None
    assert item["processed_at"] is None
    assert "Traceback" in item["traceback"]


def test_dlq_show_prints_the_event_data_and_traceback(seeded: Seeded) -> None:
    out = ok("dlq", "show", seeded.old[0], "--store", seeded.url).stdout
    assert "failed after 3 retries" in out
    assert '"comment_id"' in out
    assert "ConnectionError: email service unavailable" in out


# dlq requeue / delete / reprocess / purge ------------------------------------------


def test_dlq_requeue_moves_the_dead_letter_to_the_retry_queue(seeded: Seeded) -> None:
    target = seeded.old[0]
    requeued = json_of("dlq", "requeue", target, "--store", seeded.url)
    assert requeued["id"].startswith("retry_")
    assert requeued["metadata"]["requeued_from"] == target
    assert target not in dead_letter_ids(seeded.url)
    queued = json_of("queue", "list", "--store", seeded.url)
    assert requeued["id"] in {item["id"] for item in queued}
    item = with_bus(seeded.url, lambda bus: bus.retry_queue.get(requeued["id"]))
    assert item.handler_name == "CommentNotificationHandler"
    assert item.attempt == 1
    assert item.next_retry <= datetime.now(UTC)


def test_dlq_requeue_says_what_it_did(seeded: Seeded) -> None:
    out = ok("dlq", "requeue", seeded.old[1], "--store", seeded.url).stdout
    assert out.startswith(f"requeued {seeded.old[1]} as retry_")


def test_dlq_delete_removes_the_dead_letter_once(seeded: Seeded) -> None:
    ok("dlq", "delete", seeded.recent[1], "--store", seeded.url)
    assert seeded.recent[1] not in dead_letter_ids(seeded.url)
    again = invoke("dlq", "delete", seeded.recent[1], "--store", seeded.url)
    assert seeded.recent[1] in one_line_error(again)


def test_dlq_reprocess_with_the_app_calls_the_handler_and_marks_it_processed(
    seeded: Seeded,
) -> None:
    target = seeded.healthy
    item = json_of("dlq", "reprocess", target, "--store", seeded.url, *WITH_APP)
    assert item["reprocess_succeeded"] is True
    assert item["processed"] is True
    calls = [json.loads(line) for line in seeded.calls.read_text().splitlines()]
    assert [(c["handler"], c["what"]) for c in calls] == [("CommentNotificationHandler", "done")]
    stored = with_bus(seeded.url, lambda bus: bus.dead_letters.get(target))
    assert stored.processed
    assert stored.metadata["reprocess_count"] == 1


def test_dlq_reprocess_that_fails_again_keeps_the_item_and_exits_1(seeded: Seeded) -> None:
    result = invoke("dlq", "reprocess", seeded.failing, "--store", seeded.url, *WITH_APP)
    assert result.exit_code == 1
    assert "failed again: TimeoutError: connection timeout" in result.stdout
    stored = with_bus(seeded.url, lambda bus: bus.dead_letters.get(seeded.failing))
    assert not stored.processed
    assert stored.error == "connection timeout"


def test_dlq_reprocess_of_a_handler_the_app_lacks_is_a_clear_error(seeded: Seeded) -> None:
    result = invoke("dlq", "reprocess", seeded.recent[1], "--store", seeded.url, *WITH_APP)
    assert "no handler named 'FeedUpdateHandler'" in one_line_error(result)


def test_dlq_reprocess_without_an_app_suggests_requeue(seeded: Seeded) -> None:
    result = invoke("dlq", "reprocess", seeded.old[0], "--store", seeded.url)
    message = one_line_error(result, code=2)
    assert "--app" in message
    assert "retrybus dlq requeue" in message


def test_dlq_purge_before_days_deletes_only_older_dead_letters(seeded: Seeded) -> None:
    out = ok("dlq", "purge", "--store", seeded.url, "--before-days", "7", "--yes").stdout
    assert out.strip() == "deleted 3 dead letter(s)"
    assert dead_letter_ids(seeded.url) == set(seeded.recent)


def test_dlq_purge_asks_first_and_keeps_everything_when_refused(seeded: Seeded) -> None:
    refused = invoke("dlq", "purge", "--store", seeded.url, "--all", input="n\n")
    assert refused.exit_code == 1
    assert len(dead_letter_ids(seeded.url)) == 5
    accepted = ok("dlq", "purge", "--store", seeded.url, "--all", input="y\n")
    assert "Delete ALL dead letters" in accepted.stderr
    assert accepted.stdout.strip().endswith("deleted 5 dead letter(s)")
    assert dead_letter_ids(seeded.url) == set()


def test_dlq_purge_processed_deletes_only_processed_dead_letters(seeded: Seeded) -> None:
    purged = json_of("dlq", "purge", "--store", seeded.url, "--all", "--processed", "--yes")
    assert purged == {"deleted": 1}
    assert dead_letter_ids(seeded.url) == {*seeded.old, *seeded.recent} - {seeded.processed}


def test_dlq_purge_takes_before_days_or_all_not_both(seeded: Seeded) -> None:
    result = invoke("dlq", "purge", "--store", seeded.url, "--all", "--before-days", "1")
    one_line_error(result, code=2)
    assert len(dead_letter_ids(seeded.url)) == 5


# stats / queue ---------------------------------------------------------------------


def test_stats_json_is_the_bus_stats(seeded: Seeded) -> None:
    expected = with_bus(seeded.url, lambda bus: bus.stats()).to_dict()
    assert json_of("stats", "--store", seeded.url) == expected
    assert expected["dead_letter_queue_size"] == 5
    assert expected["unprocessed_dead_letters"] == 4
    assert expected["retry_queue_size"] == 2


def test_stats_table_names_the_store_and_the_counts(seeded: Seeded) -> None:
    out = ok("stats", "--store", seeded.url).stdout
    assert seeded.url in out
    assert "dead letters" in out
    assert "retries dead-lettered" in out


def test_queue_list_json_orders_by_next_retry_and_filters(seeded: Seeded) -> None:
    items = json_of("queue", "list", "--store", seeded.url)
    assert [item["id"] for item in items] == seeded.retry_items
    assert datetime.fromisoformat(items[0]["next_retry"]) < datetime.fromisoformat(
        items[1]["next_retry"]
    )
    only = json_of("queue", "list", "--store", seeded.url, "--handler", "SocialStatisticsHandler")
    assert [item["id"] for item in only] == seeded.retry_items[1:]
    assert only[0]["error"] == "connection timeout"


def test_queue_list_table_shows_when_each_item_is_due(seeded: Seeded) -> None:
    out = ok("queue", "list", "--store", seeded.url).stdout
    assert seeded.retry_items[0] in out
    assert "in 59s" in out or "in 1m00s" in out
    assert "showing 1–2 of 2" in out


def test_the_store_can_come_from_the_environment(seeded: Seeded) -> None:
    result = runner.invoke(app, ["stats", "--json"], env={"RETRYBUS_STORE": seeded.url})
    assert json.loads(result.stdout)["dead_letter_queue_size"] == 5


# errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nosuch://localhost/db", "unknown store URL scheme 'nosuch'"),
        ("sqlite://host/x.db", "a SQLite URL has no host"),
        ("retrybus.db", "malformed store URL"),
    ],
)
def test_a_bad_store_url_is_a_one_line_usage_error(url: str, says: str) -> None:
    assert says in one_line_error(invoke("stats", "--store", url), code=2)


@pytest.mark.parametrize("command", [["dlq", "show"], ["dlq", "requeue"], ["dlq", "delete"]])
def test_an_unknown_id_is_a_one_line_error(seeded: Seeded, command: list[str]) -> None:
    result = invoke(*command, "dlq_nope", "--store", seeded.url)
    assert one_line_error(result) == "Error: no item with id 'dlq_nope'"


def test_a_store_in_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'queues.db'}"
    assert "cannot open SQLite store" in one_line_error(invoke("dlq", "list", "--store", url))


def test_inspecting_a_missing_sqlite_file_does_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    assert "no database file" in one_line_error(invoke("stats", "--store", f"sqlite:///{path}"))
    assert not path.exists()


def test_a_command_without_a_store_says_how_to_give_one() -> None:
    result = runner.invoke(app, ["stats"], env={"RETRYBUS_STORE": None})
    assert "--store" in one_line_error(result, code=2)


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("cli_app", "APP must look like 'module:attribute'"),
        ("no_such_module_here:bus", "no module named 'no_such_module_here'"),
        ("cli_app:missing", "has no attribute 'missing'"),
        ("cli_app:not_a_bus", "is a str, not a retrybus.EventBus"),
    ],
)
def test_a_bad_app_is_a_one_line_error(seeded: Seeded, target: str, says: str) -> None:
    app_options = ("--app", target, "--app-dir", APPS)
    result = invoke("dlq", "reprocess", seeded.old[0], "--store", seeded.url, *app_options)
    assert says in one_line_error(result, code=2)


def test_worker_with_a_bad_app_is_a_one_line_error(tmp_path: Path) -> None:
    result = invoke("worker", "nowhere_to_be_found:bus", "--store", f"sqlite:///{tmp_path}/w.db")
    assert "no module named 'nowhere_to_be_found'" in one_line_error(result, code=2)


# the installed executable --------------------------------------------------------------


def run_retrybus(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RETRYBUS), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_the_installed_executable_prints_stats_as_json(seeded: Seeded) -> None:
    done = run_retrybus("stats", "--store", seeded.url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dead_letter_queue_size"] == 5


def test_the_installed_executable_reports_an_unknown_id_in_one_line(seeded: Seeded) -> None:
    done = run_retrybus("dlq", "show", "dlq_nope", "--store", seeded.url)
    assert done.returncode == 1
    assert done.stderr == "Error: no item with id 'dlq_nope'\n"


def test_python_dash_m_retrybus_runs_the_same_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "retrybus", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == f"retrybus {retrybus.__version__}"


# the worker process -------------------------------------------------------------------


def _queue_due_items(url: str, events: Sequence[Event]) -> None:
    async def add(bus: EventBus) -> None:
        for event in events:
            await bus.retry_queue.add(
                event,
                "SocialStatisticsHandler",
                TimeoutError("connection timeout"),
                next_retry=datetime.now(UTC),
            )

    with_bus(url, add)


def _start_worker(
    url: str,
    cwd: Path,
    *options: str,
    app: str = "cli_app:bus",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    command = f"worker {app} --store {url} --check-interval 0.1 --app-dir {APPS}"
    return subprocess.Popen(
        [str(RETRYBUS), *command.split(), *options],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _peak_rss_kib(pid: int) -> int | None:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def test_worker_process_retries_due_items_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    calls = tmp_path / "calls.jsonl"
    events = [Event("like.added", {"post_id": n, "out": str(calls)}) for n in range(5)]
    _queue_due_items(url, events)
    worker = _start_worker(url, tmp_path)
    try:
        _wait_for(lambda: with_bus(url, lambda bus: bus.retry_queue.count()) == 0, "the retries")
        peak = _peak_rss_kib(worker.pid)
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    assert "SIGTERM received" in stderr
    assert "Traceback" not in stderr
    assert sorted(c["event_id"] for c in _calls(calls)) == sorted(e.id for e in events)
    assert {c["pid"] for c in _calls(calls)} == {worker.pid}
    stats = with_bus(url, lambda bus: bus.stats())
    assert stats.retries_succeeded == 5
    assert stats.dead_letter_queue_size == 0
    if peak is not None:
        assert peak < 30 * 1024, f"worker peak RSS {peak} KiB"


def test_worker_on_sigterm_finishes_the_running_handler_and_releases_the_rest(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    calls = tmp_path / "calls.jsonl"
    events = [Event("like.added", {"n": n, "out": str(calls), "sleep": 1.0}) for n in range(3)]
    _queue_due_items(url, events)
    worker = _start_worker(url, tmp_path, "--concurrency", "1")  # claims 3, runs 1 at a time
    try:
        _wait_for(lambda: len(_calls(calls)) == 1, "the first handler to start")
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    assert [c["what"] for c in _calls(calls)] == ["started", "done"]
    left = with_bus(url, lambda bus: bus.retry_queue.list())
    assert len(left) == 2
    assert {item.event_id for item in left} < {event.id for event in events}
    assert all(item.lease_owner is None and item.attempt == 1 for item in left)
    assert with_bus(url, lambda bus: bus.stats()).retries_succeeded == 1


def test_worker_handler_timeout_fails_a_call_that_runs_too_long(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    calls = tmp_path / "calls.jsonl"
    _queue_due_items(url, [Event("like.added", {"out": str(calls), "sleep": 30})])
    worker = _start_worker(url, tmp_path, "--handler-timeout", "0.3")
    try:
        _wait_for(
            lambda: with_bus(url, lambda bus: bus.dead_letters.count()) == 1,
            "the hanging delivery to be dead-lettered after its retries",
        )
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    [dead] = with_bus(url, lambda bus: bus.dead_letters.list())
    assert dead.error_type == "TimeoutError"
    assert dead.error == "handler 'SocialStatisticsHandler' did not finish within 0.3s"
    assert dead.reason == "failed after 2 retries"
    assert [c["what"] for c in _calls(calls)] == ["started"] * 2  # retries 1 and 2


def test_worker_handler_timeout_must_be_seconds(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(RETRYBUS), "worker", "cli_app:bus", "--app-dir", APPS, "--handler-timeout", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--handler-timeout: must be > 0, got '0'" in done.stderr


def test_worker_refuses_a_bus_without_handlers(tmp_path: Path) -> None:
    (tmp_path / "empty_app.py").write_text("import retrybus\nbus = retrybus.EventBus()\n")
    env = {**os.environ, "RETRYBUS_STORE": f"sqlite:///{tmp_path / 'w.db'}"}
    done = subprocess.run(
        [str(RETRYBUS), "worker", "empty_app:bus"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "Error: the APP's bus has no handlers subscribed: a worker claims only the records "
        "of its handlers, so it would have nothing to do"
    )
