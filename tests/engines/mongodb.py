"""The MongoDB test engine: one SecantusDB server for the whole test session.

SecantusDB is a MongoDB wire-protocol server in pure Python (a pinned, test-only
dependency). It is started in this process, lazily, on first use, on 127.0.0.1
and a free port, with its data in a temporary directory, and stopped when the
session ends. ``MONGODB_URI`` (``mongodb://host:27017``), when set, points the
tests at a real server instead. Every test gets a database of its own, dropped
afterwards. ``RETRYBUS_MONGODB_TRANSACTIONS=0`` runs every test on the code path
of a standalone server (no transactions).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from retrybus import RetryItem, Store, StoreUnavailable
from retrybus._stores.mongodb import MongoStore

from ._common import Features, Undecodable, WorkerLoad, unavailable, unique_name

WHAT = "MongoDB (SecantusDB)"

FEATURES = Features(
    on_a_server=True,
    survives_reopen=True,
    can_corrupt_records=True,
    has_url_with_password=True,
    can_be_unreachable=True,
    shared_across_processes=True,
)

_lock = threading.Lock()
_server_uri: str | None = None
_server_error: str | None = None


def _stop(server: Any, directory: str) -> None:
    with contextlib.suppress(Exception):
        server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def server_uri() -> str:
    """``mongodb://host:port`` of the server the tests use (started on first call);
    skips (or, with CI=true, fails) the test when there is none."""
    global _server_uri, _server_error
    configured = os.environ.get("MONGODB_URI")
    if configured:
        return configured
    with _lock:
        if _server_uri is None and _server_error is None:
            directory = tempfile.mkdtemp(prefix="retrybus-secantus-")
            try:
                from secantus import SecantusDBServer

                # No TTL sweep during the session: tests date their records in 2025
                # (a manual clock), which a sweep would treat as long expired.
                server = SecantusDBServer(
                    host="127.0.0.1", port=0, storage_path=directory, ttl_sweep_seconds=10**9
                )
                server.start()
            except Exception as exc:
                shutil.rmtree(directory, ignore_errors=True)
                _server_error = f"SecantusDB did not start: {type(exc).__name__}: {exc}"
            else:
                host, port = server.address
                _server_uri = f"mongodb://{host}:{port}"
                atexit.register(_stop, server, directory)
    if _server_uri is None:
        unavailable(WHAT, _server_error or "no server")
    return _server_uri


def database_url(name: str, **options: str) -> str:
    """The store URL of database ``name`` on the test server."""
    parts = urlsplit(server_uri())
    query = "&".join(
        [*([parts.query] if parts.query else []), *(f"{k}={v}" for k, v in options.items())]
    )
    return urlunsplit(parts._replace(path=f"/{name}", query=query))


@contextlib.asynccontextmanager
async def open_test_store(**kwargs: Any) -> AsyncIterator[MongoStore]:
    """A connected store on a fresh database, dropped afterwards."""
    if os.environ.get("RETRYBUS_MONGODB_TRANSACTIONS") == "0":
        kwargs.setdefault("transactions", False)  # the standalone server's code path
    name = unique_name()
    url = database_url(name, timeout="10")
    store = MongoStore.from_url(url)
    if kwargs:  # options of the store object (transactions=False, say)
        store = MongoStore(url, database=name, timeout=10, client_url=database_url(name), **kwargs)
    try:
        await store.connect()
    except StoreUnavailable as exc:
        unavailable(WHAT, str(exc))
    try:
        yield store
    finally:
        await drop_database(url, name)
        await store.close()


async def drop_database(url: str, name: str) -> None:
    """Drop database ``name`` (through a client of its own: the test may have closed its store)."""
    cleaner = MongoStore.from_url(url)
    with contextlib.suppress(Exception):
        await cleaner.connect()
        assert cleaner._client is not None
        await cleaner._client.drop_database(name)
    await cleaner.close()


def namespace_url(store: Store) -> str:
    """The URL of ``store``'s database (with a long timeout: SecantusDB is slow under
    several worker processes)."""
    assert isinstance(store, MongoStore)
    return database_url(store.database_name, timeout="30")


SEED_DOCUMENT = {  # the seed's own example, which lacks the event id retrybus needs
    "_id": "retry_seed_example",
    "event_type": "like.added",
    "event_data": {"post_id": 1},
    "event_source": "SocialService",
    "event_timestamp": datetime(2025, 1, 7, 10, 0, tzinfo=UTC),
    "handler_name": "SocialStatisticsHandler",
    "error": "connection timeout",
    "attempt": 1,
    "max_retries": 3,
    "next_retry": datetime(2025, 1, 7, 10, 0, 2, tzinfo=UTC),
    "created_at": datetime(2025, 1, 7, 10, 0, tzinfo=UTC),
    "updated_at": datetime(2025, 1, 7, 10, 0, 1, tzinfo=UTC),
}


async def write_undecodable_records(store: Store, victim: RetryItem) -> list[Undecodable]:
    """A text where ``victim``'s event time should be a date, the seed's example
    document (no event id), and a document with nothing but an id and a due time."""
    assert isinstance(store, MongoStore)
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    db = await store._database()
    await db.retry_queue.update_one({"_id": victim.id}, {"$set": {"event_timestamp": "yesterday"}})
    # for the victim's handler: a worker claims only records of handlers it has
    seed = {**SEED_DOCUMENT, "handler_name": victim.handler_name, "next_retry": long_ago}
    await db.retry_queue.insert_one(seed)
    await db.retry_queue.insert_one({"_id": "retry_hand_typed", "next_retry": long_ago})
    return [
        Undecodable(
            victim.id,
            reason_has=("event_timestamp", "yesterday"),
            fields={"event_id": victim.event_id},
        ),
        Undecodable(
            "retry_seed_example",
            reason_has=("undecodable record: KeyError", "event_id"),
            fields={"event_type": "like.added", "handler_name": victim.handler_name},
            raw_record={"event_source": "SocialService"},
        ),
        Undecodable("retry_hand_typed"),
    ]


MALFORMED_URLS = [
    ("mongodb://user:s3cret@localhost:27017", "no database name"),
    ("mongodb://user:s3cret@localhost:27017/", "no database name"),
    ("mongodb://user:s3cret@localhost/bad.name", "invalid database name"),
    ("mongodb://user:s3cret@localhost/db?timeout=soon", "timeout"),
    ("mongodb://user:s3cret@localhost/db?w=banana&journal=maybe", "malformed"),
]

UNREACHABLE = (
    "mongodb://user:s3cret@127.0.0.1:1/retrybus?timeout=0.3",
    "cannot reach MongoDB store",
)

# SecantusDB is slow: a few hundred items, and leases that outlast the check
WORKER_LOAD = WorkerLoad(items=200, batch_size=10, lease=120, sleep_min=0.001, sleep_max=0.004)
