"""Shared fixtures: a manual clock, and the stores every conformance test runs against."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest

import retrybus
from retrybus import ManualClock, Store

# Engines plug in as tests/engines/<kind>.py, each with its FEATURES and an async
# context manager `open_test_store()` that yields a connected store in a namespace of
# its own (a file, a schema, a key prefix, a database) and removes it afterwards
# (tests/engines/_common.py tells the rest). The local engines (memory, SQLite) come
# first, then those on a server.
ENGINES_DIR = Path(__file__).parent / "engines"
ENGINES: dict[str, ModuleType] = {
    path.stem: importlib.import_module(f"engines.{path.stem}")
    for path in sorted(ENGINES_DIR.glob("*.py"))
    if not path.stem.startswith("_")
}
SERVER_KINDS = [kind for kind, engine in ENGINES.items() if engine.FEATURES.on_a_server]
STORE_KINDS = [kind for kind in ENGINES if kind not in SERVER_KINDS] + SERVER_KINDS


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@asynccontextmanager
async def fresh_store(kind: str, directory: Path) -> AsyncIterator[Store]:
    """A connected store of engine ``kind`` in a namespace of its own (a SQLite
    file in ``directory``), removed afterwards."""
    engine = ENGINES[kind]
    opening = engine.open_test_store(directory) if kind == "sqlite" else engine.open_test_store()
    async with opening as opened:
        yield opened


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every store engine, fresh for each test."""
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture
async def bus(store: Store, clock: ManualClock) -> retrybus.EventBus:
    return retrybus.EventBus(store, clock=clock)


# The shared servers must come out of the session as they went in ---------------------

SHARED_POSTGRES_URL = os.environ.get(
    "RETRYBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
SHARED_REDIS_URL = os.environ.get("RETRYBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SHARED_NATS_URL = os.environ.get("RETRYBUS_TEST_NATS_URL", "nats://127.0.0.1:4222")
SHARED_RABBITMQ_URL = os.environ.get(
    "RETRYBUS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"
)
GUARD_TIMEOUT = 3.0  # seconds; a shared server that takes longer counts as not answering


def _postgres_start_time() -> str | None:
    """The shared PostgreSQL's ``pg_postmaster_start_time()``; None if it does not answer."""
    try:
        import asyncpg  # type: ignore[import-untyped]

        from retrybus._stores.postgresql import PostgresStore
    except ImportError:
        return None

    async def query() -> str:
        dsn = PostgresStore.from_url(SHARED_POSTGRES_URL)._dsn
        conn = await asyncpg.connect(dsn, timeout=GUARD_TIMEOUT)
        try:
            return str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
        finally:
            await conn.close(timeout=GUARD_TIMEOUT)

    try:
        return asyncio.run(asyncio.wait_for(query(), GUARD_TIMEOUT * 2))
    except Exception:
        return None


def _redis_run_id() -> str | None:
    """The shared Redis's ``run_id`` (INFO server); None if it does not answer."""
    try:
        import redis
    except ImportError:
        return None
    client = redis.Redis.from_url(
        SHARED_REDIS_URL, socket_timeout=GUARD_TIMEOUT, socket_connect_timeout=GUARD_TIMEOUT
    )
    try:
        return str(client.info("server")["run_id"])
    except Exception:
        return None
    finally:
        client.close()


def _nats_server_id() -> str | None:
    """The shared NATS server's ``server_id`` (new at every start, sent in its
    INFO line); None if it does not answer."""
    parts = urlsplit(SHARED_NATS_URL)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 4222), timeout=GUARD_TIMEOUT
        ) as sock:
            line = sock.recv(65536).decode()
        return str(json.loads(line.split(" ", 1)[1])["server_id"])
    except Exception:
        return None


def _rabbitmq_pid() -> str | None:
    """The OS pid of the shared RabbitMQ node (a local one only: ``rabbitmqctl``);
    None if it does not answer."""
    if urlsplit(SHARED_RABBITMQ_URL).hostname not in ("127.0.0.1", "localhost"):
        return None
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "eval", "os:getpid()."],
            capture_output=True,
            text=True,
            timeout=GUARD_TIMEOUT * 5,
            check=True,
        )
    except Exception:
        return None
    return done.stdout.strip() or None


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return f"{parts.scheme}://{host}{parts.path}"


@pytest.fixture(scope="session", autouse=True)
def _shared_servers_are_not_restarted() -> Iterator[None]:
    """Fail the session when a test restarted (or stopped) the machine's shared
    PostgreSQL, Redis, NATS or RabbitMQ: a test that restarts a server must start a private one
    (tests/private_servers.py). A server unreachable at the start is not checked."""
    checks = [
        ("PostgreSQL", SHARED_POSTGRES_URL, "start time", _postgres_start_time),
        ("Redis", SHARED_REDIS_URL, "run_id", _redis_run_id),
        ("NATS", SHARED_NATS_URL, "server_id", _nats_server_id),
        ("RabbitMQ", SHARED_RABBITMQ_URL, "node pid", _rabbitmq_pid),
    ]
    before = {name: read() for name, _url, _what, read in checks}
    yield
    problems = []
    for name, url, what, read in checks:
        if before[name] is None:
            continue
        now = read()
        if now is None:
            problems.append(
                f"the suite stopped the shared {name} at {_redacted(url)}: it answered before "
                f"the session and does not now ({what} was {before[name]})"
            )
        elif now != before[name]:
            problems.append(
                f"the suite restarted the shared {name} at {_redacted(url)}: its {what} was "
                f"{before[name]} before the session and is {now} after it"
            )
    if problems:
        pytest.fail(
            "; ".join(problems) + ": tests must use private servers (tests/private_servers.py)",
            pytrace=False,
        )
