"""Services on the command line (issue 12): ``queue list --service`` and ``dlq list
--filter service=``, and the tables' service column, on every engine a CLI
process can reach that keeps services (the others skip), a store holding three
services seeded through the library.

The seeded store holds ``social`` (a live worker's heartbeat, a scheduled delivery
and a dead letter), ``notifications`` (deliveries waiting, the oldest due an hour
ago, no live worker but a stale heartbeat; its handler ``Digest`` removed by
alice, its deliveries dead-lettered) and ``default`` (a retry of a handler the
store keeps no subscription of). Commands run in a thread through CliRunner: each
runs its own event loop (MongoDB's test server answers from this process's).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from conftest import ENGINES, fresh_store
from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    RetryItem,
    Store,
    WorkerBeat,
    open_store,
)
from retrybus._cli.app import app
from seeding import dead_letter
from test_conformance_engines import engines_with

runner = CliRunner()

HOST = socket.gethostname()
WORKER = "social-1"


async def invoke(*args: object, input: str | None = None) -> Result:
    """``retrybus ARGS`` through CliRunner, in a thread: the command runs its own loop."""
    return await asyncio.to_thread(runner.invoke, app, [str(arg) for arg in args], input=input)


async def ok(*args: object, input: str | None = None) -> Result:
    result = await invoke(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


async def json_of(*args: object) -> Any:
    return json.loads((await ok(*args, "--json")).stdout)


def one_line_error(result: Result, code: int) -> str:
    """The command exited with ``code`` and said why in one ``Error:`` line on stderr."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# the seeded store ------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    url: str
    #: the URL as the commands show it (password removed)
    shown_url: str
    store: Store
    social: EventBus
    notifications: EventBus
    #: the notification deliveries waiting for Notify (the first due an hour ago)
    waiting: list[str]
    #: social's scheduled delivery and its dead letter
    scheduled: str
    social_dead: str
    #: the dead letters of the removed Digest
    digest_dead: list[str]
    #: the default service's retry (of a handler without a stored subscription)
    legacy: str


async def _seed(url: str, store: Store) -> Seeded:
    social = EventBus(store, service="social", route_refresh=0)
    notifications = EventBus(store, service="notifications", route_refresh=0)
    social.subscribe("comment.*", lambda event: None, name="Stats")
    notifications.subscribe("like.*", lambda event: None, name="Notify")
    notifications.subscribe("like.added", lambda event: None, name="Digest")
    await social.register()
    await notifications.register()

    now = social.clock.now()
    overdue = RetryItem.pending(
        Event("like.added", {"n": 0}),
        "Notify",
        max_retries=3,
        due=now - timedelta(hours=1),
        now=now,
        service="notifications",
    )
    await store.record_pending([overdue])
    for n in (1, 2):  # each routed to Notify and Digest of notifications
        await social.publish(Event("like.added", {"n": n}), defer=True)
    scheduled = await social.publish(Event("comment.added", {"n": 3}), deliver_in=3600)
    assert scheduled.pending == ("Stats",)
    social_dead = await dead_letter(social, handler="Stats", event_type="comment.added")

    await store.beat(
        WorkerBeat(
            name=WORKER,
            service="social",
            host=HOST,
            pid=os.getpid(),
            started_at=now - timedelta(hours=2),
            last_seen=now,
            interval=3600.0,  # live for the whole test, however slow
            lanes=8,
            lanes_busy=2,
            handlers=("Stats",),
            version="9.9.9",
        )
    )
    await store.beat(
        WorkerBeat(
            name="notifications-old",
            service="notifications",
            host="elsewhere",
            pid=7,
            started_at=now - timedelta(hours=3),
            last_seen=now - timedelta(hours=1),  # stale: not seen for 3 intervals
            interval=10.0,
            lanes=4,
            handlers=("Notify", "Digest"),
        )
    )
    removal = await social.services.remove("notifications", "Digest", actor="alice")
    assert (removal.removed, removal.dead_lettered) == (("Digest",), 2)

    legacy = await EventBus(store).retry_queue.add(
        Event("order.placed"), "Legacy", "connection timeout", next_retry=now
    )
    waiting = await store.list_retry(
        limit=10, offset=0, service="notifications", handler_name="Notify"
    )
    digest = await store.list_dead(DeadLetterFilter(handler_name="Digest"), limit=10, offset=0)
    opened = open_store(url)  # not connected: only its URL as shown
    await opened.close()
    return Seeded(
        url=url,
        shown_url=opened.url,
        store=store,
        social=social,
        notifications=notifications,
        waiting=[item.id for item in waiting],
        scheduled=next(
            item.id for item in await store.list_retry(limit=10, offset=0, service="social")
        ),
        social_dead=social_dead.id,
        digest_dead=[item.id for item in digest],
        legacy=legacy.id,
    )


@pytest.fixture(params=engines_with("shared_across_processes"))
async def seeded(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Seeded]:
    """The seeded store on each engine a CLI process reaches (memory skipped)."""
    kind = request.param
    async with fresh_store(kind, tmp_path) as store:
        if not store.keeps_services:
            pytest.skip(f"{type(store).__name__} does not keep services yet")
        yield await _seed(ENGINES[kind].namespace_url(store), store)


@pytest.fixture
async def on_sqlite(tmp_path: Path) -> AsyncIterator[Seeded]:
    """The seeded store on SQLite only, for what does not depend on the engine."""
    async with fresh_store("sqlite", tmp_path) as store:
        yield await _seed(ENGINES["sqlite"].namespace_url(store), store)


def utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text
    return moment


async def live_subscriptions(seeded: Seeded) -> list[tuple[str, str]]:
    return [(s.service, s.handler_name) for s in await seeded.social.services.list()]


# queue list --service, dlq list --filter service= ----------------------------------


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


async def test_queue_list_service_lists_only_that_services_items(seeded: Seeded) -> None:
    notifications = await json_of(
        "queue", "list", "--service", "notifications", "--store", seeded.url
    )
    assert _ids(notifications) == seeded.waiting
    assert {item["service"] for item in notifications} == {"notifications"}
    assert _ids(await json_of("queue", "list", "--service", "social", "--store", seeded.url)) == [
        seeded.scheduled
    ]
    pending = await json_of(
        "queue", "list", "--service", "social", "--kind", "pending", "--store", seeded.url
    )
    assert pending == []
    assert await json_of("queue", "list", "--service", "billing", "--store", seeded.url) == []
    everything = await json_of("queue", "list", "--store", seeded.url)
    assert sorted(_ids(everything)) == sorted([*seeded.waiting, seeded.scheduled, seeded.legacy])

    out = (await ok("queue", "list", "--service", "notifications", "--store", seeded.url)).stdout
    assert "retry queue of service notifications —" in out  # then the URL, maybe wrapped
    assert (
        "showing 1–3 of 3 (service notifications, all its handlers and types): "
        "0 retries, 3 pending, 0 scheduled"
    ) in out
    bad = await invoke("queue", "list", "--service", "a/b", "--store", seeded.url)
    assert "--service 'a/b': a service name is" in one_line_error(bad, 2)


async def test_dlq_list_filter_service_lists_only_that_services_dead_letters(
    seeded: Seeded,
) -> None:
    notifications = await json_of(
        "dlq", "list", "--filter", "service=notifications", "--store", seeded.url
    )
    assert sorted(_ids(notifications)) == sorted(seeded.digest_dead)
    social = await json_of("dlq", "list", "-f", "service=social", "--store", seeded.url)
    assert _ids(social) == [seeded.social_dead]
    assert social[0]["service"] == "social"
    assert await json_of("dlq", "list", "-f", "service=default", "--store", seeded.url) == []


# the tables ------------------------------------------------------------------------


def header_of(out: str, first: str) -> list[str]:
    """The column names of the table whose first column is ``first``."""
    line = next(line for line in out.splitlines() if line.startswith(f"┃ {first} "))
    return [name.strip() for name in line.strip("┃").split("┃")]


async def test_the_queue_tables_show_a_service_column_unless_all_are_default(
    on_sqlite: Seeded,
) -> None:
    url = on_sqlite.url
    mixed = (await ok("queue", "list", "--store", url)).stdout
    assert "service" in header_of(mixed, "id")
    row = next(line for line in mixed.splitlines() if on_sqlite.scheduled in line)
    assert "│ social " in row
    one_other = (await ok("queue", "list", "--service", "social", "--store", url)).stdout
    assert "service" in header_of(one_other, "id")
    default = (await ok("queue", "list", "--service", "default", "--store", url)).stdout
    assert header_of(default, "id") == [
        "id",
        "kind",
        "next retry",
        "event type",
        "handler",
        "retry",
        "last error",
        "leased by",
    ]
    dead = (await ok("dlq", "list", "--store", url)).stdout
    assert header_of(dead, "id")[:5] == ["id", "created", "event type", "service", "handler"]


# an engine that keeps no services -------------------------------------------------


@pytest.mark.parametrize("kind", engines_with("shared_across_processes"))
async def test_on_an_engine_that_keeps_no_services_everything_is_of_the_default_one(
    kind: str, tmp_path: Path
) -> None:
    async with fresh_store(kind, tmp_path) as store:
        if store.keeps_services:
            pytest.skip(f"{type(store).__name__} keeps services")
        url = ENGINES[kind].namespace_url(store)
        bus = EventBus(store)
        items = [
            await bus.retry_queue.add(Event("like.added", {"n": n}), "Feed", "timeout")
            for n in range(2)
        ]
        default = await json_of("queue", "list", "--service", "default", "--store", url)
        assert sorted(_ids(default)) == sorted(item.id for item in items)
        assert await json_of("queue", "list", "--service", "billing", "--store", url) == []
        table = (await ok("queue", "list", "--service", "default", "--store", url)).stdout
        assert "showing 1–2 of 2 (service default, all its handlers and types): 2 retries" in table
        assert "service" not in header_of(table, "id")
        other = (await ok("queue", "list", "--service", "billing", "--store", url)).stdout
        assert "showing none of 0 (service billing, all its handlers and types)" in other
