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
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from retrybus import StoreUnavailable
from retrybus._stores.mongodb import MongoStore

from ._common import unavailable, unique_name

WHAT = "MongoDB (SecantusDB)"

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
