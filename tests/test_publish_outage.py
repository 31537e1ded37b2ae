"""``publish`` rides out a short store outage (a server restart) by retrying its
write for up to ``store_timeout`` seconds, without calling a handler again; past
that it raises ``StoreUnavailable``. Each test restarts a private server of its
own (tests/private_servers.py), never the machine's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

import retrybus
from engines._common import unique_name
from private_servers import PrivatePostgres, PrivateRedis, PrivateServer
from retrybus import Event, EventBus, StoreUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(params=["postgresql", "redis"])
def server(request: pytest.FixtureRequest) -> Iterator[PrivateServer]:
    made: PrivateServer = (
        PrivatePostgres() if request.param == "postgresql" else PrivateRedis(persistent=True)
    )
    with made:
        yield made


def store_url(server: PrivateServer) -> str:
    if isinstance(server, PrivatePostgres):
        return f"{server.url}?schema={unique_name()}&connect_timeout=1"
    return f"{server.url}?prefix={unique_name()}&socket_connect_timeout=1&socket_timeout=2"


def counting_bus(url: str, store_timeout: float) -> tuple[EventBus, list[str]]:
    bus = EventBus(retrybus.open_store(url), store_timeout=store_timeout)
    calls: list[str] = []

    async def fails(event: Event) -> None:
        calls.append(event.id)
        raise TimeoutError("the mail server is slow")

    bus.subscribe("order.placed", fails, name="mailer")
    return bus, calls


async def test_publish_retries_its_write_through_a_server_restart(
    server: PrivateServer, caplog: pytest.LogCaptureFixture
) -> None:
    bus, calls = counting_bus(store_url(server), store_timeout=30)
    await bus.store.connect()
    await asyncio.to_thread(server.stop)
    publishing = asyncio.create_task(bus.publish(Event("order.placed", {"order": 1})))
    await asyncio.sleep(1.0)  # publish has called the handler and waits for the store
    assert not publishing.done()
    await asyncio.to_thread(server.start)
    result = await asyncio.wait_for(publishing, 30)
    assert result.retrying == ("mailer",)
    assert calls == [result.event.id]  # the handler ran once: only the write was retried
    [item] = await bus.retry_queue.list()
    assert item.event_id == result.event.id
    assert (await bus.stats()).retry_queue_size == 1
    assert sum("retrying for up to 30s" in r.getMessage() for r in caplog.records) == 1
    # asyncpg's pool warns with a traceback on every failed reconnect, to stderr even
    # in an app without logging set up: retrybus says it once, through its own logger
    assert [r for r in caplog.records if r.name.startswith("asyncpg")] == []
    reconnects = [r for r in caplog.records if "pool cannot reconnect" in r.getMessage()]
    assert len(reconnects) <= 1
    assert all(r.name == "retrybus.store.postgresql" for r in reconnects)
    await bus.close()


@pytest.mark.parametrize("durable", [True, False])
async def test_publish_raises_store_unavailable_once_store_timeout_has_passed(
    server: PrivateServer, durable: bool
) -> None:
    """Durable, the delivery's record comes first: the handler never runs on an
    event the store could not take. Not durable, the handler ran and its
    failure could not be recorded."""
    bus, calls = counting_bus(store_url(server), store_timeout=1.5)
    await bus.store.connect()
    await bus.publish(Event("warm.up"))  # it has read the other services' subscriptions
    await asyncio.to_thread(server.stop)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await bus.publish(Event("order.placed", {"order": 2}), durable=durable)
    waited = time.monotonic() - started
    assert 1.0 <= waited < 15, waited
    assert len(calls) == (0 if durable else 1)
    await bus.close()


async def test_a_first_publish_that_cannot_read_the_routes_runs_no_handler(
    server: PrivateServer,
) -> None:
    """Which other services an event reaches is in the store: a publish that
    cannot read it, even one not durable, raises before any handler runs, so no
    service's delivery is left unrecorded."""
    bus, calls = counting_bus(store_url(server), store_timeout=1.0)
    await bus.store.connect()
    await asyncio.to_thread(server.stop)
    with pytest.raises(StoreUnavailable):
        await bus.publish(Event("order.placed", {"order": 3}), durable=False)
    assert calls == []
    await bus.close()


def test_store_timeout_must_be_a_number_of_seconds() -> None:
    for bad in (-1, float("inf"), "5", True, None):
        with pytest.raises(ValueError, match="store_timeout"):
            EventBus(store_timeout=bad)  # type: ignore[arg-type]
