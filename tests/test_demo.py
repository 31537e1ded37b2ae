"""``retrybus demo``: the simulated social service on the real bus, worker and
SQLite store, leaving a database the other commands can inspect."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

import retrybus
from retrybus import DeadLetterItem, EventBus, Stats
from retrybus._cli.app import app

RETRYBUS = Path(sys.executable).parent / "retrybus"
HANDLERS = {"SocialStatisticsHandler", "FeedUpdateHandler", "CommentNotificationHandler"}

runner = CliRunner()


def inspect(url: str) -> tuple[Stats, list[DeadLetterItem]]:
    async def main() -> tuple[Stats, list[DeadLetterItem]]:
        async with EventBus(retrybus.open_store(url)) as bus:
            return await bus.stats(), await bus.dead_letters.list(10_000)

    return asyncio.run(main())


def run_demo(db: Path, *options: str) -> Any:
    return runner.invoke(app, ["demo", "--db", str(db), "--events", "300", "--rate", "0", *options])


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
    assert f"retrybus stats --store {url}" in done.stdout
    assert f"retrybus dlq list --store {url}" in done.stdout
    assert "nothing lost" in done.stdout

    stats, dead_letters = inspect(url)
    assert stats.retry_queue_size == 0
    assert stats.retries_succeeded > 0
    assert stats.dead_letter_queue_size == len(dead_letters) > 0
    assert any(item.reason.startswith("failed after") for item in dead_letters)
    assert {item.handler_name for item in dead_letters} <= HANDLERS
    assert {item.error for item in dead_letters if item.reason == "failed after 3 retries"} == {
        "email service unavailable"
    }

    cli_stats = subprocess.run(
        [str(RETRYBUS), "stats", "--store", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(cli_stats.stdout) == stats.to_dict()


def test_demo_shows_the_counts_the_store_holds(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    result = run_demo(db, "--no-progress")
    assert result.exit_code == 0, result.output
    last = re.findall(
        r"published (\d+)/300  succeeded (\d+)  retrying (\d+)  dead-lettered (\d+)", result.stdout
    )[-1]
    stats, _ = inspect(f"sqlite:///{db}")
    assert int(last[0]) == 300
    assert int(last[2]) == stats.retry_queue_size == 0
    assert int(last[3]) == stats.dead_letter_queue_size
    assert re.search(rf"succeeded on a retry\s+{stats.retries_succeeded:,}\s", result.stdout)
    assert "dead letters by reason" in result.stdout
    assert "CommentNotificationHandler" in result.stdout


def test_demo_recreates_its_database_on_each_run(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    assert run_demo(db).exit_code == 0
    first, _ = inspect(f"sqlite:///{db}")
    assert run_demo(db).exit_code == 0
    second, _ = inspect(f"sqlite:///{db}")
    assert second == first  # the same seed, on a fresh database: nothing added to the old one


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
