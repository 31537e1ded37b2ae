"""Producers and consumers of each event type (issue 15): the pure comparison
(``type_versions``) and ``Services.versions()`` over what two services' buses
store when they register, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import fresh_store
from retrybus import (
    EventBus,
    ManualClock,
    Store,
    StoredSubscription,
    TypeVersions,
    open_store,
)
from retrybus._cli import views
from retrybus._cli.app import app
from retrybus._versions_view import type_versions

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def stored(
    service: str,
    handler: str,
    *patterns: str,
    versions: dict[str, Any] | None = None,
    removed: bool = False,
) -> StoredSubscription:
    return StoredSubscription(
        service=service,
        handler_name=handler,
        patterns=patterns,
        policy="default",
        max_retries=3,
        registered_at=NOW,
        updated_at=NOW,
        removed_at=NOW if removed else None,
        details={} if versions is None else {"versions": versions},
    )


def described(name: str, version: int, *aliases: str) -> dict[str, Any]:
    return {"type": name, "version": version, "aliases": list(aliases)}


def test_consumers_behind_the_newest_producer_are_flagged() -> None:
    found = type_versions(
        {
            "social": [described("like.added", 3), described("like.removed", 1)],
            "legacy": [described("like.added", 2)],
        },
        [
            stored("feed", "Count", "like.added", versions={"like.added": 3}),
            stored("stats", "Tally", "like.*", versions={"like.added": 2, "like.removed": 1}),
            stored("audit", "Log", "*"),
            stored("mail", "Notify", "like.added"),
            stored("billing", "Invoice", "order.paid"),
            stored("old", "Gone", "like.added", versions={"like.added": 1}, removed=True),
        ],
    )
    assert [t.type for t in found] == ["like.added", "like.removed"]
    added, removed = found
    assert added == TypeVersions(
        "like.added",
        producers={"legacy": 2, "social": 3},
        consumers={"audit/Log": None, "feed/Count": 3, "mail/Notify": None, "stats/Tally": 2},
        # unversioned: by name it reads version 1 (behind); by a glob (an audit log) never
        behind=("mail/Notify", "stats/Tally"),
    )
    assert added.newest == 3
    # version 1 produced: an unversioned consumer reads it as it is, not behind
    assert removed.consumers == {"audit/Log": None, "stats/Tally": 1}
    assert removed.behind == ()
    assert added.to_dict() == {
        "type": "like.added",
        "newest": 3,
        "producers": {"legacy": 2, "social": 3},
        "consumers": {"audit/Log": None, "feed/Count": 3, "mail/Notify": None, "stats/Tally": 2},
        "behind": ["mail/Notify", "stats/Tally"],
    }
    assert added.involves("feed")
    assert added.involves("legacy")
    assert not added.involves("billing")
    assert not added.involves("fee")  # a prefix of a service is not the service


def test_a_consumer_of_an_alias_and_a_type_no_service_produces() -> None:
    found = type_versions(
        {"social": [described("like.added", 2, "social.like")]},
        [
            stored("mobile", "Push", "social.like", versions={"social.like": 2}),
            stored("feed", "Count", "like.added", "post.*", versions={"post.created": 4}),
            stored("feed", "Odd", "post.created", versions={"post.created": True}),
        ],
    )
    assert [t.type for t in found] == ["like.added", "post.created"]
    assert found[0].consumers == {"feed/Count": None, "mobile/Push": 2}
    assert found[0].behind == ("feed/Count",)
    # nobody registers post.created: there is no newest to be behind
    assert found[1] == TypeVersions("post.created", {}, {"feed/Count": 4, "feed/Odd": None}, ())
    assert found[1].newest is None


def test_nothing_registered_gives_nothing() -> None:
    assert type_versions({}, [stored("feed", "Count", "like.added")]) == []
    assert type_versions({"social": [{"type": "x"}, {"version": 2}]}, []) == []


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


async def test_services_versions_of_two_registered_buses(store: Store) -> None:
    clock = ManualClock()
    social = EventBus(store, service="social", clock=clock, route_refresh=0)
    feed = EventBus(store, service="feed", clock=clock, route_refresh=0)
    social.event_type("like.added", version=3, upcasters={1: dict, 2: dict})
    social.subscribe("like.added", lambda event: None, name="Notify")
    feed.event_type("like.added", version=2, upcasters={1: dict})
    feed.subscribe("like.added", lambda event: None, name="Count")
    feed.subscribe("order.*", lambda event: None, name="Audit")
    await social.register()
    await feed.register()

    found = await social.services.versions()
    assert found == [
        TypeVersions(
            "like.added",
            producers={"feed": 2, "social": 3},
            consumers={"feed/Count": 2, "social/Notify": 3},
            behind=("feed/Count",),
        )
    ]
    assert await feed.services.versions("feed") == found
    assert await feed.services.versions("billing") == []

    # the feed deploys v3: registering again is all it takes
    upgraded = EventBus(store, service="feed", clock=clock, route_refresh=0)
    upgraded.event_type("like.added", version=3, upcasters={1: dict, 2: dict})
    upgraded.subscribe("like.added", lambda event: None, name="Count")
    await upgraded.register()
    (after,) = await social.services.versions()
    assert after.producers == {"feed": 3, "social": 3}
    assert after.consumers == {"feed/Count": 3, "social/Notify": 3}
    assert after.behind == ()
    with pytest.raises(ValueError, match="service"):
        await social.services.versions("no such/service")


async def test_the_services_command_shows_the_event_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    async with open_store(url) as store:
        social = EventBus(store, service="social", route_refresh=0)
        social.event_type("like.added", version=3, upcasters={1: dict, 2: dict})
        feed = EventBus(store, service="feed", route_refresh=0)
        feed.event_type("like.added", version=2, upcasters={1: dict})
        feed.subscribe("like.added", lambda event: None, name="Count")
        audit = EventBus(store, service="audit", route_refresh=0)
        audit.subscribe("*", lambda event: None, name="Log")
        for bus in (social, feed, audit):
            await bus.register()
    monkeypatch.setattr(views, "console", lambda stderr=False: Console(width=100))

    shown = await asyncio.to_thread(CliRunner().invoke, app, ["services", "--store", url])
    assert shown.exit_code == 0, shown.output
    table = shown.stdout[shown.stdout.index("event types") :]
    row = " ".join(table[table.index("like.added") :].split())
    assert row.startswith("like.added │ feed v2, social v3 │ audit/Log unversioned, feed/Count")
    assert "feed/Count v2 (BEHIND v3)" in row
    assert "WARNING 1 consumer behind the newest producer" in shown.stdout

    listed = await asyncio.to_thread(
        CliRunner().invoke, app, ["services", "--store", url, "--json"]
    )
    assert listed.exit_code == 0, listed.output
    by_service = {s["service"]: s["event_types"] for s in json.loads(listed.stdout)}
    like = {
        "type": "like.added",
        "newest": 3,
        "producers": {"feed": 2, "social": 3},
        "consumers": {"audit/Log": None, "feed/Count": 2},
        "behind": ["feed/Count"],
    }
    # social has no handler, no worker, no record: no service of the list, a producer all the same
    assert by_service == {"audit": [like], "feed": [like]}
