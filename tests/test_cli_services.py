"""``retrybus services`` and ``retrybus services remove`` (issue 12), ``queue list
--service``, ``dlq list --filter service=`` and the tables' service column: on
every engine a CLI process can reach, a store holding three services seeded
through the library.

The seeded store holds ``social`` (a live worker's heartbeat, a scheduled delivery
and a dead letter), ``notifications`` (deliveries waiting, the oldest due an hour
ago, no live worker but a stale heartbeat: warned about; its handler ``Digest``
removed by alice, its deliveries dead-lettered) and ``default`` (a retry of a
handler the store keeps no subscription of). Commands run in a thread through
CliRunner: each runs its own event loop (MongoDB's test server answers from this
process's).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cli_runner import invoke, json_of, ok, one_line_error
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
from retrybus._cli import views
from retrybus._services import HandlerLoad, HandlerSummary, ServiceSummary
from seeding import dead_letter
from test_conformance_engines import engines_with

HOST = socket.gethostname()
WORKER = "social-1"


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


# retrybus services -----------------------------------------------------------------


async def test_services_json_gives_each_service_its_workers_and_handlers(seeded: Seeded) -> None:
    before = datetime.now(UTC)
    services = await json_of("services", "--store", seeded.url)
    assert [s["service"] for s in services] == ["default", "notifications", "social"]
    default, notifications, social = services

    assert utc(social["at"]) >= before
    assert (social["warning"], social["waiting"], social["dead"]) == (None, 0, 1)
    assert (social["oldest_pending_age"], social["stale_workers"]) == (None, 0)
    (worker,) = social["workers"]
    assert {key: worker[key] for key in ("name", "host", "pid", "lanes", "lanes_busy")} == {
        "name": WORKER,
        "host": HOST,
        "pid": os.getpid(),
        "lanes": 8,
        "lanes_busy": 2,
    }
    assert (worker["interval"], worker["handlers"], worker["version"]) == (3600, ["Stats"], "9.9.9")
    assert utc(worker["last_seen"]) - utc(worker["started_at"]) == timedelta(hours=2)
    assert 0 <= worker["last_seen_age"] < 3600
    (stats,) = social["handlers"]
    assert stats["handler_name"] == "Stats"
    assert (stats["patterns"], stats["removed"], stats["removed_by"]) == (
        ["comment.*"],
        False,
        None,
    )
    assert stats["policy"].startswith("ExponentialBackoff(max_retries=3")
    assert (stats["max_retries"], stats["handler_timeout"]) == (3, None)
    assert utc(stats["registered_at"]) <= utc(social["at"])
    assert {k: stats[k] for k in ("pending", "scheduled", "retrying", "dead_unprocessed")} == {
        "pending": 0,
        "scheduled": 1,
        "retrying": 0,
        "dead_unprocessed": 1,
    }

    assert notifications["warning"] == "no live worker"
    assert (notifications["waiting"], notifications["dead"]) == (3, 2)
    assert (notifications["workers"], notifications["stale_workers"]) == ([], 1)
    assert 3600 <= notifications["oldest_pending_age"] < 2 * 3600
    digest, notify = notifications["handlers"]
    assert (notify["handler_name"], notify["patterns"], notify["removed"]) == (
        "Notify",
        ["like.*"],
        False,
    )
    assert (notify["pending"], notify["leased"], notify["dead_unprocessed"]) == (3, 0, 0)
    assert notify["oldest_pending_age"] == notifications["oldest_pending_age"]
    assert utc(notify["oldest_pending_due"]) < utc(notifications["at"]) - timedelta(hours=1)
    assert (digest["handler_name"], digest["removed"], digest["removed_by"]) == (
        "Digest",
        True,
        "alice",
    )
    assert utc(digest["removed_at"]) >= utc(digest["registered_at"])
    assert (digest["pending"], digest["dead_unprocessed"], digest["oldest_pending_age"]) == (
        0,
        2,
        None,
    )

    # a handler the store keeps no subscription of: its records, no terms
    (legacy,) = default["handlers"]
    assert (legacy["handler_name"], legacy["retrying"]) == ("Legacy", 1)
    assert [legacy[k] for k in ("patterns", "policy", "registered_at", "removed")] == [
        None,
        None,
        None,
        False,
    ]
    assert default["warning"] == "no live worker"

    only = await json_of("services", "notifications", "--store", seeded.url)
    assert [s["service"] for s in only] == ["notifications"]
    assert [(h["handler_name"], h["pending"]) for h in only[0]["handlers"]] == [
        ("Digest", 0),
        ("Notify", 3),
    ]


async def test_services_shows_each_service_with_a_warning_where_no_worker_runs(
    seeded: Seeded,
) -> None:
    out = (await ok("services", "--store", seeded.url)).stdout
    lines = out.splitlines()
    assert lines[0] == f"services — {seeded.shown_url}"
    headers = [line for line in lines if line.startswith("service ")]
    assert headers == [
        "service default  WARNING no live worker",
        "service notifications  WARNING no live worker",
        "service social",
    ]
    assert "3 waiting, 2 dead, oldest pending for 1h00m; no live worker, 1 stale beat" in lines
    assert "0 waiting, 1 dead; 1 live worker" in lines
    worker = next(line for line in lines if WORKER in line)
    for shown in (HOST, str(os.getpid()), "2h00m ago", "2/8", "9.9.9"):
        assert shown in worker, worker
    notify = next(line for line in lines if re.search(r"│ Notify\b", line))
    assert re.search(r"│ like\.\* +│ ExponentialBackoff\(", notify), notify
    assert re.search(r"│ +3 │ +0 │ +0 │ +0 │ +1h00m │$", notify), notify
    digest = next(line for line in lines if "│ Digest" in line)
    assert "Digest (removed by alice)" in digest
    assert re.search(r"│ +0 │ +0 │ +0 │ +2 │ +— │$", digest), digest
    assert any("Legacy (no stored subscription)" in line for line in lines)


async def test_services_names_one_service_or_says_it_is_unknown(seeded: Seeded) -> None:
    out = (await ok("services", "social", "--store", seeded.url)).stdout
    assert "service social" in out
    assert "notifications" not in out
    # `show` is the command `services` runs: it takes a service named like a command
    shown = await json_of("services", "show", "social", "--store", seeded.url)
    assert [s["service"] for s in shown] == ["social"]
    named_remove = await invoke("services", "show", "remove", "--store", seeded.url)
    assert "no service 'remove'" in one_line_error(named_remove, 1)
    unknown = await invoke("services", "billing", "--store", seeded.url)
    line = one_line_error(unknown, 1)
    assert f"no service 'billing' in {seeded.shown_url}" in line
    assert "(services: default, notifications, social)" in line
    malformed = one_line_error(await invoke("services", "no/slash", "--store", seeded.url), 2)
    assert "SERVICE 'no/slash': a service name is" in malformed


async def test_remove_asks_first_and_an_answer_no_removes_nothing(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RETRYBUS_ACTOR", "carol")
    declined = await invoke(
        "services", "remove", "notifications", "Notify", "--store", seeded.url, input="n\n"
    )
    assert declined.exit_code == 1, declined.output
    assert (
        f"Remove the subscription of notifications/Notify from {seeded.shown_url}? Publishers "
        "stop routing events to it, and the 3 deliveries waiting for it are dead-lettered."
    ) in declined.stderr
    assert ("notifications", "Notify") in await live_subscriptions(seeded)
    assert len(await seeded.store.list_retry(limit=10, offset=0, service="notifications")) == 3

    accepted = await ok(
        "services", "remove", "notifications", "Notify", "--store", seeded.url, input="y\n"
    )
    assert accepted.stdout.splitlines()[-2:] == [  # after the answer, which CliRunner echoes
        "removed the subscription of notifications/Notify (by carol)",
        "dead-lettered 3 deliveries waiting for it",
    ]
    assert await live_subscriptions(seeded) == [("social", "Stats")]
    assert await seeded.store.list_retry(limit=10, offset=0, service="notifications") == []
    dead = await seeded.store.list_dead(DeadLetterFilter(handler_name="Notify"), limit=10, offset=0)
    assert {d.reason for d in dead} == {"subscription removed: notifications/Notify (by carol)"}
    assert len(dead) == 3


async def test_remove_with_yes_json_and_an_actor_removes_every_handler_of_a_service(
    seeded: Seeded,
) -> None:
    removed = await json_of(
        "services", "remove", "notifications", "--yes", "--actor", "dave", "--store", seeded.url
    )
    assert removed == {
        "service": "notifications",
        "removed": ["Notify"],  # Digest was removed before
        "dead_lettered": 3,
        "leased": 0,
        "actor": "dave",
    }
    assert await live_subscriptions(seeded) == [("social", "Stats")]
    again = await ok("services", "remove", "notifications", "Notify", "--store", seeded.url)
    assert again.stdout.splitlines() == [
        "notifications/Notify was removed already: no subscription to remove",
        "dead-lettered 0 deliveries waiting for it",
    ]
    assert again.stderr == ""  # nothing to do: nothing asked


async def test_remove_is_refused_while_a_live_worker_runs_the_handler_unless_forced(
    seeded: Seeded,
) -> None:
    now = datetime.now(UTC)
    await seeded.store.beat(
        WorkerBeat(
            name="notifications-1",
            service="notifications",
            host="box-7",
            pid=4242,
            started_at=now,
            last_seen=now,
            interval=3600.0,
            lanes=4,
            handlers=("Notify",),
        )
    )
    refused = await invoke("services", "remove", "notifications", "Notify", "--store", seeded.url)
    line = one_line_error(refused, 1)  # refused before any question
    assert line == (
        "Error: cannot remove notifications/Notify: live worker(s) run it: notifications-1 "
        "(pid 4242 on box-7); stop them first (they would register it again when they "
        "restart), or give --force to remove it anyway"
    )
    assert ("notifications", "Notify") in await live_subscriptions(seeded)
    whole = await invoke("services", "remove", "notifications", "--yes", "--store", seeded.url)
    assert "notifications-1 (pid 4242 on box-7)" in one_line_error(whole, 1)

    forced = await invoke(
        "services",
        "remove",
        "notifications",
        "Notify",
        "--force",
        "--store",
        seeded.url,
        input="y\n",
    )
    assert forced.exit_code == 0, forced.output
    assert "Live workers run it (notifications-1 (pid 4242 on box-7))" in forced.stderr
    assert "removed the subscription of notifications/Notify" in forced.stdout
    assert ("notifications", "Notify") not in await live_subscriptions(seeded)


async def test_remove_reports_the_deliveries_a_lease_still_holds(seeded: Seeded) -> None:
    now = datetime.now(UTC)
    running = RetryItem.pending(
        Event("like.added", {"n": 9}),
        "Notify",
        max_retries=3,
        due=now,
        now=now,
        lease_owner="notifications-elsewhere",
        lease_until=now + timedelta(hours=1),
        service="notifications",
    )
    await seeded.store.record_pending([running])
    out = (
        await ok("services", "remove", "notifications", "Notify", "--yes", "--store", seeded.url)
    ).stdout
    assert out.splitlines()[1:] == [
        "dead-lettered 3 deliveries waiting for it",
        "1 more wait(s) for a handler's lease to run out: a worker's sweep dead-letters them "
        "then (or run this again)",
    ]
    left = await seeded.store.list_retry(limit=10, offset=0, service="notifications")
    assert [item.id for item in left] == [running.id]


async def test_remove_of_an_unknown_subscription_is_a_one_line_error(seeded: Seeded) -> None:
    handler = await invoke("services", "remove", "notifications", "Nope", "--store", seeded.url)
    assert one_line_error(handler, 1) == (
        f"Error: no subscription notifications/Nope is stored in {seeded.shown_url} "
        "(service notifications has: Digest, Notify)"
    )
    service = await invoke("services", "remove", "billing", "--yes", "--store", seeded.url)
    assert one_line_error(service, 1) == (
        f"Error: no subscription of service billing is stored in {seeded.shown_url}"
    )
    bad = await invoke("services", "remove", "bill ing", "--store", seeded.url)
    assert "SERVICE 'bill ing': a service name is" in one_line_error(bad, 2)
    empty_actor = await invoke(
        "services", "remove", "notifications", "--actor", " ", "--store", seeded.url
    )
    assert "--actor ' ': may not be empty" in one_line_error(empty_actor, 2)
    assert ("notifications", "Notify") in await live_subscriptions(seeded)


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


@pytest.mark.parametrize("width", [60, 80, 100])
async def test_services_fits_a_narrow_terminal_keeping_names_and_the_warning(
    on_sqlite: Seeded, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    monkeypatch.setattr(views, "console", lambda stderr=False: Console(width=width))
    lines = (await ok("services", "--store", on_sqlite.url)).stdout.splitlines()
    assert [line for line in lines if len(line) > width] == []
    assert "service notifications  WARNING no live worker" in lines
    for name in (WORKER, "Notify", "Stats"):
        assert any(name in line for line in lines), (name, lines)


def test_the_warning_is_styled_as_other_warnings() -> None:
    now = datetime.now(UTC)
    waiting = HandlerLoad(service="billing", handler_name="Invoice", pending=1)
    summary = ServiceSummary("billing", now, (HandlerSummary("Invoice", None, waiting),), ())
    header = views.service_header(summary)
    assert header.plain == "service billing  WARNING no live worker"
    (warning,) = [span for span in header.spans if "WARNING" in header.plain[span.start : span.end]]
    assert header.plain[warning.start : warning.end].strip() == "WARNING no live worker"
    assert "yellow" in str(warning.style)


async def test_the_json_fields_are_documented_in_the_help(on_sqlite: Seeded) -> None:
    services = await json_of("services", "--store", on_sqlite.url)
    fields = set(services[0]) | {
        key for s in services for part in ("workers", "handlers") for d in s[part] for key in d
    }
    help_text = (await ok("services", "show", "--help")).stdout
    assert [field for field in sorted(fields) if field not in help_text] == []
    removal = (await ok("services", "remove", "--help")).stdout
    for field in ("service", "removed", "dead_lettered", "leased", "actor"):
        assert field in removal


# a store holding no services -------------------------------------------------------


async def test_a_store_without_services_at_all_says_so(tmp_path: Path) -> None:
    async with fresh_store("sqlite", tmp_path) as store:
        url = ENGINES["sqlite"].namespace_url(store)
        assert (await ok("services", "--store", url)).stdout == (
            f"no services in {store.url}: no subscription, worker heartbeat or record of any\n"
        )
        assert await json_of("services", "--store", url) == []
