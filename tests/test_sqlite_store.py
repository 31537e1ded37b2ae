"""What only the SQLite store has to show: WAL, durability, damaged rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from retrybus import Event, EventBus, ManualClock, RetryWorker, open_store


async def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_everything_survives_closing_and_reopening_the_file(
    tmp_path: Path, clock: ManualClock
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    async with open_store(url) as store:
        bus = EventBus(store, clock=clock)
        item = await bus.retry_queue.add(Event("like.added", {"n": 1}), "h", "e")
        other = await bus.retry_queue.add(Event("like.added", {"n": 2}), "h", "e")
        dead = await bus.retry_queue.mark_failed(other)
        stats = await bus.stats()
    async with open_store(url) as store:
        bus = EventBus(store, clock=clock)
        assert await bus.retry_queue.get(item.id) == item
        assert dead is not None
        assert await bus.dead_letters.get(dead.id) == dead
        assert await bus.stats() == stats


async def test_the_tables_and_indexes_follow_the_seed(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.health()
    conn = sqlite3.connect(path)
    indexes = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
    }
    assert {
        "retry_queue_next_retry",
        "retry_queue_handler_name",
        "retry_queue_next_retry_attempt",
        "retry_queue_created_at",
        "dead_letter_queue_created_at",
        "dead_letter_queue_processed",
        "dead_letter_queue_event_type",
    } <= indexes


async def test_a_record_that_cannot_be_decoded_goes_to_the_dlq_and_the_worker_goes_on(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "r.db"
    async with open_store(f"sqlite:///{path}") as store:
        bus = EventBus(store, clock=clock)
        calls: list[str] = []
        bus.subscribe("x", lambda e: calls.append(e.id), name="h")
        good = await bus.retry_queue.add(
            Event("x", {"ok": True}), "h", "boom", next_retry=clock.now()
        )
        broken = await bus.retry_queue.add(
            Event("x", {"ok": False}), "h", "boom", next_retry=clock.now()
        )
        written_by_hand = sqlite3.connect(path)
        written_by_hand.execute(
            "UPDATE retry_queue SET event_data = '{not json' WHERE id = ?", (broken.id,)
        )
        written_by_hand.execute(
            "INSERT INTO retry_queue (id, event_id, event_type, event_data, event_source, event_timestamp,"
            " handler_name, attempt, max_retries, next_retry, created_at, updated_at)"
            " VALUES ('retry_hand', 'e1', 'x', '{}', '', 'yesterday', 'h', 1, 3, '2000-01-01', '2000-01-01', '2000-01-01')"
        )
        written_by_hand.commit()
        written_by_hand.close()

        assert await RetryWorker(bus).run_once() == 1
        assert calls == [good.event_id]
        dead = {d.id: d for d in await bus.dead_letters.list()}
        assert len(dead) == 2
        for item in dead.values():
            assert item.reason.startswith("undecodable record")
            assert item.metadata["raw_record"]
        assert dead["dlq_hand"].event_id == "e1"
        assert "yesterday" in dead["dlq_hand"].reason
        assert await bus.retry_queue.count() == 0


async def test_two_stores_on_one_file_share_the_queues(tmp_path: Path, clock: ManualClock) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    async with open_store(url) as first, open_store(url) as second:
        a = EventBus(first, clock=clock)
        b = EventBus(second, clock=clock)
        await a.retry_queue.add(Event("x"), "h", "e", next_retry=clock.now())
        assert len(await b.retry_queue.claim_due(10)) == 1
        assert await a.retry_queue.claim_due(10) == []
