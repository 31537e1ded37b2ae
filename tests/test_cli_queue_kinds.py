"""``retrybus queue list --kind`` and ``retrybus queue cancel`` against a real SQLite
file: retries, pending and scheduled deliveries told apart in tables, JSON and the
stats, and a scheduled (or deferred) delivery cancelled after a confirmation."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest

import retrybus
from retrybus import Event, EventBus
from retrybus._records import ErrorInfo, RetryItem, delivery_id
from test_cli import invoke, json_of, ok, one_line_error, with_bus


@dataclass(frozen=True)
class Kinds:
    url: str
    retry: str
    deferred: str
    running: str
    scheduled: str


async def _seed(url: str) -> Kinds:
    async with EventBus(retrybus.open_store(url)) as bus:
        bus.subscribe("reminder.due", lambda event: None, name="Reminder")
        now = bus.clock.now()
        retry = await bus.retry_queue.add(
            Event("like.added", {"post_id": 1}),
            "FeedUpdateHandler",
            "connection timeout",
            next_retry=now + timedelta(minutes=5),
        )
        await bus.publish(Event("reminder.due", {"n": 1}, id="deferred"), defer=True)
        await bus.publish(Event("reminder.due", {"n": 2}, id="scheduled"), deliver_in=3600)
        # a durable publish whose handler is running (its lease far ahead)
        event = Event("reminder.due", {"n": 3}, id="running")
        running = replace(
            RetryItem.for_failure(
                event,
                "Reminder",
                ErrorInfo("", ""),
                attempt=0,
                max_retries=3,
                next_retry=now,
                now=now,
            ),
            id=delivery_id(event.source, event.id, "Reminder"),
            lease_owner="publisher-1",
            lease_until=now + timedelta(hours=2),
            claims=1,
        )
        await bus.store.record_pending([running])
    return Kinds(
        url=url,
        retry=retry.id,
        deferred=delivery_id("", "deferred", "Reminder"),
        running=running.id,
        scheduled=delivery_id("", "scheduled", "Reminder"),
    )


@pytest.fixture
def kinds(tmp_path: Path) -> Kinds:
    return asyncio.run(_seed(f"sqlite:///{tmp_path / 'kinds.db'}"))


def queued_ids(url: str) -> set[str]:
    return {item.id for item in with_bus(url, lambda bus: bus.retry_queue.list(1000))}


def test_queue_list_json_gives_the_kind_of_each_item(kinds: Kinds) -> None:
    items = json_of("queue", "list", "--store", kinds.url)
    assert {item["id"]: item["kind"] for item in items} == {
        kinds.retry: "retry",
        kinds.deferred: "pending",
        kinds.running: "pending",
        kinds.scheduled: "scheduled",
    }


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("retry", ["retry"]), ("pending", ["deferred", "running"]), ("scheduled", ["scheduled"])],
)
def test_queue_list_kind_lists_only_that_kind(kinds: Kinds, kind: str, expected: list[str]) -> None:
    items = json_of("queue", "list", "--store", kinds.url, "--kind", kind)
    assert sorted(item["id"] for item in items) == sorted(getattr(kinds, e) for e in expected)
    assert {item["kind"] for item in items} == {kind}


def test_queue_list_table_shows_the_kind_column_and_the_counts(kinds: Kinds) -> None:
    out = ok("queue", "list", "--store", kinds.url).stdout
    assert "kind" in out
    row = next(line for line in out.splitlines() if kinds.scheduled in line)
    assert "scheduled" in row
    assert "showing 1–4 of 4 (all handlers and types): 1 retry, 2 pending, 1 scheduled" in out
    only = ok("queue", "list", "--store", kinds.url, "--kind", "scheduled").stdout
    assert kinds.scheduled in only
    assert kinds.retry not in only
    assert "scheduled only" in only


def test_queue_list_refuses_an_unknown_kind(kinds: Kinds) -> None:
    line = one_line_error(invoke("queue", "list", "--store", kinds.url, "--kind", "failed"), 2)
    assert "--kind 'failed': use retry, pending, scheduled" in line


def test_stats_count_each_kind(kinds: Kinds) -> None:
    stats = json_of("stats", "--store", kinds.url)
    assert stats["retry_queue_size"] == 4
    assert stats["retry_queue_retries"] == 1
    assert stats["retry_queue_pending"] == 2
    assert stats["retry_queue_scheduled"] == 1
    out = ok("stats", "--store", kinds.url).stdout
    for row, count in (("retries", 1), ("pending deliveries", 2), ("scheduled deliveries", 1)):
        assert re.search(rf"│\s+{row}\s+│\s+{count}\s+│", out), out


# cancel ------------------------------------------------------------------------------


def test_queue_cancel_asks_first_and_cancels_on_yes(kinds: Kinds) -> None:
    result = ok("queue", "cancel", kinds.scheduled, "--store", kinds.url, input="y\n")
    assert f"Cancel the scheduled delivery {kinds.scheduled}" in result.stderr
    assert f"cancelled {kinds.scheduled}" in result.stdout
    assert queued_ids(kinds.url) == {kinds.retry, kinds.deferred, kinds.running}


def test_queue_cancel_answered_no_changes_nothing(kinds: Kinds) -> None:
    result = invoke("queue", "cancel", kinds.scheduled, "--store", kinds.url, input="n\n")
    assert result.exit_code == 1
    assert kinds.scheduled in queued_ids(kinds.url)


def test_queue_cancel_takes_a_unique_start_and_yes(kinds: Kinds) -> None:
    start = kinds.scheduled[:-6]
    out = json_of("queue", "cancel", start, "--store", kinds.url, "--yes")
    assert out["cancelled"]["id"] == kinds.scheduled
    assert out["cancelled"]["kind"] == "scheduled"
    assert out["cancelled"]["event_data"] == {"n": 2}
    assert kinds.scheduled not in queued_ids(kinds.url)


def test_queue_cancel_of_a_deferred_delivery(kinds: Kinds) -> None:
    ok("queue", "cancel", kinds.deferred, "--store", kinds.url, "--yes")
    assert queued_ids(kinds.url) == {kinds.retry, kinds.running, kinds.scheduled}


def test_queue_cancel_refuses_a_retry_and_a_running_delivery(kinds: Kinds) -> None:
    retry = one_line_error(invoke("queue", "cancel", kinds.retry, "--store", kinds.url, "--yes"))
    assert f"{kinds.retry} cannot be cancelled: it is a retry" in retry
    running = one_line_error(
        invoke("queue", "cancel", kinds.running, "--store", kinds.url, "--yes")
    )
    assert f"{kinds.running} cannot be cancelled: its handler is running" in running
    # refused without a question
    asked = one_line_error(invoke("queue", "cancel", kinds.retry, "--store", kinds.url))
    assert "it is a retry" in asked
    assert len(queued_ids(kinds.url)) == 4


def test_queue_cancel_of_an_unknown_or_ambiguous_id_says_so(kinds: Kinds) -> None:
    unknown = one_line_error(invoke("queue", "cancel", "retry_nope", "--store", kinds.url))
    assert "no item with id 'retry_nope'" in unknown
    ambiguous = one_line_error(invoke("queue", "cancel", "retry_", "--store", kinds.url, "--yes"))
    assert "'retry_' starts more than one id" in ambiguous
    empty = one_line_error(invoke("queue", "cancel", "", "--store", kinds.url, "--yes"), 2)
    assert "an id may not be empty" in empty
    assert len(queued_ids(kinds.url)) == 4
