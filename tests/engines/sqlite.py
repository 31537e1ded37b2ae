"""The SQLite engine: a file of its own per test."""

from __future__ import annotations

import sqlite3
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from retrybus import RetryItem, Store, open_store
from retrybus._stores.sqlite import SQLiteStore

from ._common import Features, Undecodable, WorkerLoad

FEATURES = Features(
    on_a_server=False,
    survives_reopen=True,
    can_corrupt_records=True,
    has_url_with_password=False,  # a file path: no password to hide
    can_be_unreachable=True,  # a file that cannot be opened
    shared_across_processes=True,
)


@asynccontextmanager
async def open_test_store(directory: Path | None = None) -> AsyncIterator[SQLiteStore]:
    """A connected store on a fresh file in ``directory`` (a temporary one, removed
    afterwards, when None)."""
    with tempfile.TemporaryDirectory(prefix="retrybus-sqlite-") as temporary:
        path = (directory or Path(temporary)) / f"{uuid.uuid4().hex}.db"
        async with open_store(f"sqlite:///{path}") as store:
            assert isinstance(store, SQLiteStore)
            yield store


def namespace_url(store: Store) -> str:
    assert isinstance(store, SQLiteStore)
    return f"sqlite:///{Path(store.path).resolve()}"


async def write_undecodable_records(store: Store, victim: RetryItem) -> list[Undecodable]:
    """Bad JSON in ``victim``'s event data, and a row written by hand whose event
    time is not one."""
    assert isinstance(store, SQLiteStore)
    written_by_hand = sqlite3.connect(store.path)
    try:
        written_by_hand.execute(
            "UPDATE retry_queue SET event_data = '{not json' WHERE id = ?", (victim.id,)
        )
        written_by_hand.execute(
            "INSERT INTO retry_queue (id, event_id, event_type, event_data, event_source,"
            " event_timestamp, handler_name, attempt, max_retries, next_retry, created_at,"
            " updated_at) VALUES ('retry_hand', 'e1', 'x', '{}', '', 'yesterday', 'h', 1, 3,"
            " '2000-01-01', '2000-01-01', '2000-01-01')"
        )
        written_by_hand.commit()
    finally:
        written_by_hand.close()
    return [
        Undecodable(victim.id, fields={"event_id": victim.event_id}),
        Undecodable("retry_hand", reason_has=("yesterday",), fields={"event_id": "e1"}),
    ]


MALFORMED_URLS = [
    ("sqlite://", "no file path"),
    ("sqlite://host/x.db", "has no host"),
    ("sqlite:///x.db?colour=blue", "colour"),
    ("sqlite:///x.db?busy_timeout=soon", "busy_timeout"),
    ("sqlite:///x.db?synchronous=maybe", "synchronous"),
]

UNREACHABLE = ("sqlite:////no/such/dir/retrybus.db", "cannot open SQLite store")

WORKER_LOAD = WorkerLoad(items=2_000, batch_size=25, lease=30, sleep_min=0.001, sleep_max=0.004)
