"""The ``retrybus worker`` process as a service manager runs it: started while
its store is down it waits (``--fail-fast`` exits instead), and a handler that
raises ``CancelledError`` neither stops it nor goes unrecorded."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import retrybus
from engines._common import unique_name
from private_servers import PrivateRedis
from retrybus import Event, EventBus, FixedDelay, RetryWorker, StoreUnavailable

APPS = Path(__file__).parent / "apps"
RETRYBUS = Path(sys.executable).parent / "retrybus"
OUTAGE = "store unavailable, retrying in"


def spawn_worker(url: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(RETRYBUS),
            "worker",
            "cli_app:bus",
            "--store",
            url,
            "--check-interval",
            "0.1",
            "--app-dir",
            str(APPS),
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def stop_worker(worker: subprocess.Popen[str]) -> str:
    """SIGTERM, then the worker's stderr once it has exited."""
    worker.send_signal(signal.SIGTERM)
    try:
        _, stderr = await asyncio.to_thread(worker.communicate, timeout=20)
    finally:
        worker.kill()
    return stderr


async def wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def redis_url(server: PrivateRedis) -> str:
    return f"{server.url}?prefix={unique_name()}&socket_connect_timeout=1"


async def test_a_worker_started_while_its_store_is_down_waits_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = PrivateRedis()  # not started yet: nothing listens on its port
    try:
        url = redis_url(server)
        bus = EventBus(retrybus.open_store(url), default_policy=FixedDelay(delay=0))
        calls: list[str] = []

        async def handle(event: Event) -> None:
            calls.append(event.id)

        bus.subscribe("x", handle, name="handle")
        worker = RetryWorker(bus, check_interval=0.1)
        with caplog.at_level(logging.DEBUG, logger="retrybus.worker"):
            await worker.start()
            await asyncio.sleep(1.5)  # several attempts to reach it
            assert worker.running
            await asyncio.to_thread(server.start)
            async with retrybus.open_store(url) as other:
                item = await EventBus(other).retry_queue.add(
                    Event("x"), "handle", "first", next_retry=datetime.now(UTC)
                )

                async def handled() -> bool:
                    return calls == [item.event_id]

                await wait_for(handled)
            await worker.stop()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in warnings if OUTAGE in r.getMessage()] != []
        assert len([r for r in warnings if OUTAGE in r.getMessage()]) == 1  # logged once
        assert "is back after" in caplog.text
        await bus.close()
    finally:
        server.close()


async def test_with_fail_fast_a_worker_refuses_to_start_without_its_store() -> None:
    server = PrivateRedis()
    try:
        bus = EventBus(retrybus.open_store(redis_url(server)))
        bus.subscribe("x", lambda event: None, name="handle")
        with pytest.raises(StoreUnavailable):
            await RetryWorker(bus, fail_fast=True).start()
        await bus.close()
    finally:
        server.close()


async def test_the_worker_process_waits_for_its_store_and_fail_fast_exits_1() -> None:
    server = PrivateRedis()
    try:
        url = redis_url(server)
        failing = await asyncio.to_thread(
            subprocess.run,
            [
                str(RETRYBUS),
                "worker",
                "cli_app:bus",
                "--store",
                url,
                "--app-dir",
                str(APPS),
                "--fail-fast",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert failing.returncode == 1
        assert "Error:" in failing.stderr
        assert "Traceback" not in failing.stderr

        worker = spawn_worker(url)
        try:
            await asyncio.sleep(2.0)
            assert worker.poll() is None, "the worker exited instead of waiting"
            await asyncio.to_thread(server.start)
            async with retrybus.open_store(url) as store:
                bus = EventBus(store)
                await bus.retry_queue.add(
                    Event("like.added", {"post_id": 1}),
                    "SocialStatisticsHandler",
                    "first",
                    next_retry=datetime.now(UTC),
                )

                async def emptied() -> bool:
                    return await bus.retry_queue.count() == 0

                await wait_for(emptied)
                assert (await bus.stats()).retries_succeeded == 1
        finally:
            stderr = await stop_worker(worker)
        assert worker.returncode == 0, stderr
        assert stderr.count(OUTAGE) == 1, stderr
        assert "is back after" in stderr
    finally:
        server.close()


async def test_a_handlers_cancelled_error_does_not_stop_the_worker_process(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'retrybus.db'}"
    calls = tmp_path / "calls.jsonl"
    async with retrybus.open_store(url) as store:
        bus = EventBus(store)
        now = datetime.now(UTC)
        cancelled = Event("like.added", {"cancel": True, "out": str(calls)})
        await bus.retry_queue.add(cancelled, "SocialStatisticsHandler", "first", next_retry=now)
        for n in range(3):
            failing = Event("comment.created", {"fail": True, "n": n, "out": str(calls)})
            await bus.retry_queue.add(
                failing, "CommentNotificationHandler", "first", next_retry=now
            )
        worker = spawn_worker(url)
        try:

            async def all_dead_lettered() -> bool:
                assert worker.poll() is None, worker.communicate()[1]
                return await bus.dead_letters.count() == 4

            await wait_for(all_dead_lettered, 30)
        finally:
            stderr = await stop_worker(worker)
        assert worker.returncode == 0, stderr
        [dead] = await bus.dead_letters.list(handler_name="SocialStatisticsHandler")
        assert dead.reason == "failed after 2 retries"
        assert dead.error == "a timeout inside the handler leaked"
        cancelled_calls = [
            line
            for line in calls.read_text().splitlines()
            if json.loads(line)["what"] == "cancelled"
        ]
        assert len(cancelled_calls) == 2  # both retries ran, each recorded as a failure
        assert "claim loop" not in stderr


def test_the_worker_command_line_leaves_the_heavy_modules_unloaded() -> None:
    """Its memory is a target: no Typer, pydantic or Rich (the other commands'),
    and no shutil with bz2 and lzma (argparse's own terminal width lookup)."""
    heavy = ("typer", "click", "pydantic", "rich", "shutil", "bz2", "lzma")
    code = (
        "import sys\n"
        "from retrybus._cli.worker import build_parser\n"
        "build_parser().parse_args(['app:bus', '--concurrency', '4'])\n"
        f"print(sorted(name for name in {heavy!r} if name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
