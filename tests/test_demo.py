"""``retrybus demo``: two simulated services (social and notifications) exchanging
events on the real buses, workers and SQLite store, leaving a database the other
commands can inspect."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import retrybus
from retrybus import DeadLetterItem, EventBus, RetryItem, Stats
from retrybus._cli.app import app
from retrybus._cli.demo import social_events

RETRYBUS = Path(sys.executable).parent / "retrybus"
EVENTS = 300
SEED = 7
SOCIAL = {"SocialStatisticsHandler", "FeedUpdateHandler", "NotificationCounter"}
NOTIFICATIONS = {"CommentNotificationHandler"}
#: a row of the report's outcome table: a service (and its mark) or a handler, its
#: deliveries, handled first time, on a retry, dead-lettered, still queued
ROW = re.compile(
    r"^\s*(\S+)(?: [✓✗] [a-z ]+?)?\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s*$"
)

runner = CliRunner()


@dataclass(frozen=True)
class Stored:
    """What the demo's store holds."""

    stats: Stats
    dead_letters: list[DeadLetterItem]
    retry_items: list[RetryItem]

    def dead_of(self, service: str, handler: str | None = None) -> int:
        return sum(
            1
            for item in self.dead_letters
            if item.service == service and handler in (None, item.handler_name)
        )


def inspect(url: str) -> Stored:
    async def main() -> Stored:
        async with EventBus(retrybus.open_store(url)) as bus:
            return Stored(
                await bus.stats(),
                await bus.dead_letters.list(10_000),
                await bus.store.list_retry(limit=10_000, offset=0),
            )

    return asyncio.run(main())


def run_demo(db: Path, *options: str) -> Result:
    return runner.invoke(
        app, ["demo", "--db", str(db), "--events", str(EVENTS), "--rate", "0", *options]
    )


def outcome_rows(output: str) -> dict[str, tuple[int, ...]]:
    """The report's outcome table: per service and per handler, its deliveries,
    handled first time, on a retry, dead-lettered and still queued."""
    rows = {}
    for line in output.splitlines():
        if match := ROW.match(line):
            rows[match[1]] = tuple(int(n.replace(",", "")) for n in match.groups()[1:])
    return rows


def comments() -> int:
    return sum(1 for e in social_events(EVENTS, SEED) if e.type == "comment.created")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Result, Stored]:
    """One run of the demo (--no-progress), its output and what its store holds."""
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    result = run_demo(db, "--no-progress")
    assert result.exit_code == 0, result.output
    url = f"sqlite:///{db}"
    return url, result, inspect(url)


def test_demo_leaves_a_database_that_stats_and_dlq_list_read(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    done = subprocess.run(
        [str(RETRYBUS), "demo", "--db", str(db), "--events", "300", "--rate", "0", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    url = f"sqlite:///{db}"
    assert f"retrybus services --store {url}" in done.stdout
    assert f"retrybus stats --store {url}" in done.stdout
    assert f"retrybus dlq list --store {url} --filter service=notifications" in done.stdout
    assert re.search(r"^ social ✓ nothing lost ", done.stdout, re.M)
    assert re.search(r"^ notifications ✓ nothing lost ", done.stdout, re.M)

    stored = inspect(url)
    stats = stored.stats
    assert stats.retry_queue_size == 0
    assert stats.retries_succeeded > 0
    assert stats.dead_letter_queue_size == len(stored.dead_letters) > 0
    assert any(item.reason.startswith("failed after") for item in stored.dead_letters)
    assert {
        item.error for item in stored.dead_letters if item.reason == "failed after 3 retries"
    } == {"email service unavailable"}

    cli_stats = subprocess.run(
        [str(RETRYBUS), "stats", "--store", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(cli_stats.stdout) == stats.to_dict()


def test_every_number_of_each_service_matches_the_store(
    demo_run: tuple[str, Result, Stored],
) -> None:
    _, result, stored = demo_run
    rows = outcome_rows(result.stdout)
    assert set(rows) == {"social", "notifications"} | SOCIAL | NOTIFICATIONS
    assert stored.retry_items == []
    for service, handlers in (("social", SOCIAL), ("notifications", NOTIFICATIONS)):
        for handler in handlers:
            deliveries, first, on_retry, dead, queued = rows[handler]
            assert dead == stored.dead_of(service, handler), handler
            assert queued == 0
            assert deliveries == first + on_retry + dead, handler
        totals = rows[service]
        assert totals == tuple(sum(rows[h][i] for h in handlers) for i in range(5))
        assert totals[3] == stored.dead_of(service)
    # the deliveries are those of the events published ...
    assert rows["SocialStatisticsHandler"][0] == rows["FeedUpdateHandler"][0] == EVENTS
    assert rows["CommentNotificationHandler"][0] == comments()
    # ... and the retries that succeeded are those the store counted
    assert sum(rows[h][2] for h in SOCIAL | NOTIFICATIONS) == stored.stats.retries_succeeded > 0
    assert rows["social"][2] > 0  # social's worker retried its handlers' timeouts

    # the last progress line: each service's numbers as the report's
    progress = [line for line in result.stdout.splitlines() if line.startswith("published ")][-1]
    assert progress.startswith(f"published {EVENTS}/{EVENTS} | ")
    for service in ("social", "notifications"):
        _, first, on_retry, dead, _ = rows[service]
        assert (
            f"{service}: workers 1  succeeded {first + on_retry}  queued 0  dead-lettered {dead}"
            in progress
        )


def test_the_notifications_dead_letters_carry_their_service(
    demo_run: tuple[str, Result, Stored],
) -> None:
    _, result, stored = demo_run
    assert stored.dead_letters
    assert {item.service for item in stored.dead_letters} == {"notifications"}
    assert {item.handler_name for item in stored.dead_letters} == NOTIFICATIONS
    assert Counter(item.reason for item in stored.dead_letters).keys() == {
        "failed after 3 retries",
        "non-retryable: PermanentError",
    }
    reasons = [line for line in result.stdout.splitlines() if "CommentNotificationHandler" in line]
    assert any(line.startswith("│ notifications │ failed after 3 retries") for line in reasons)


def test_each_notification_sent_reached_social_and_was_counted_once(
    demo_run: tuple[str, Result, Stored],
) -> None:
    _, result, stored = demo_run
    sent = comments() - stored.dead_of("notifications")
    assert sent > 0
    assert (
        f"✓ {sent:,} notification.sent from notifications, each counted once by "
        "social/NotificationCounter"
    ) in result.stdout
    assert re.search(
        rf"^\s*notifications\s+{sent:,} events\s+{sent:,} notification.sent", result.stdout, re.M
    )
    deliveries, first, on_retry, dead, queued = outcome_rows(result.stdout)["NotificationCounter"]
    assert (deliveries, first + on_retry, dead, queued) == (sent, sent, 0, 0)
    assert on_retry > 0  # some were counted by social's worker on a retry


def test_the_suggested_services_command_shows_both_services(
    demo_run: tuple[str, Result, Stored],
) -> None:
    url, result, stored = demo_run
    (suggested,) = re.findall(r"^\s*retrybus (services --store \S+)$", result.stdout, re.M)
    assert suggested == f"services --store {url}"

    shown = runner.invoke(app, shlex.split(suggested))
    assert shown.exit_code == 0, shown.output
    assert "service notifications" in shown.stdout
    assert "service social" in shown.stdout
    assert "WARNING" not in shown.stdout  # nothing waits: the workers finished everything

    listed = runner.invoke(app, [*shlex.split(suggested), "--json"])
    assert listed.exit_code == 0, listed.output
    services: list[dict[str, Any]] = json.loads(listed.stdout)
    by_name = {service["service"]: service for service in services}
    assert by_name.keys() == {"social", "notifications"}
    rows = outcome_rows(result.stdout)
    for name, handlers in (("social", SOCIAL), ("notifications", NOTIFICATIONS)):
        service = by_name[name]
        assert {h["handler_name"] for h in service["handlers"]} == handlers
        assert service["dead"] == rows[name][3] == stored.dead_of(name)
        assert service["waiting"] == 0
        assert service["workers"] == []  # the demo's workers stopped and said so
    (notify,) = by_name["notifications"]["handlers"]
    assert notify["patterns"] == ["comment.created"]


def test_demo_recreates_its_database_on_each_run(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first_run = run_demo(db)
    assert first_run.exit_code == 0, first_run.output
    first = inspect(f"sqlite:///{db}")
    second_run = run_demo(db)
    assert second_run.exit_code == 0, second_run.output
    second = inspect(f"sqlite:///{db}")
    # the same seed, on a fresh database: nothing added to the old one
    assert second.stats == first.stats
    assert outcome_rows(second_run.stdout) == outcome_rows(first_run.stdout)


def test_demo_refuses_to_replace_a_file_that_is_not_its_database(tmp_path: Path) -> None:
    db = tmp_path / "notes.db"
    db.write_text("my notes\n")
    result = run_demo(db)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: refusing to replace {db}: it is not a retrybus database (choose --db)"
    )
    assert db.read_text() == "my notes\n"


def test_demo_in_a_missing_directory_fails_in_one_line(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "missing" / "demo.db")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: cannot open SQLite store")
