"""Event versions in the dashboard (issue 15): the detail pages of a dead letter
and of a retry item show the stored version and, when the dashboard's bus
registers event types (its app), the current one with the upcast payload or the
reason it would be dead-lettered; the failure groups page names the event type
and stored version of a group of version errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import pytest

from dashboard_support import XSS, Dash, open_test_store, running
from retrybus import DeadLetterItem, Event, EventBus, RetryItem


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path)) as opened:
        yield opened


def post_id(data: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: ``post`` renamed ``post_id`` (a KeyError without it)."""
    return {"post_id": data["post"], "user": data["user"]}


def like_v3(bus: EventBus) -> None:
    """like.added at version 3: v1's ``post`` renamed, v3 adds ``weight``."""
    bus.event_type(
        "like.added", version=3, upcasters={1: post_id, 2: lambda data: {**data, "weight": 1}}
    )


def stored_event(version: int | None, data: Any) -> Event:
    extensions = {} if version is None else {"dataversion": str(version)}
    return Event("like.added", data, source="svc", extensions=extensions)


def dead_letter(dash: Dash, version: int | None, data: Any) -> DeadLetterItem:
    """A dead letter as a bus that knows no versions (or an older one) made it."""

    async def make() -> DeadLetterItem:
        event = stored_event(version, data)
        item = await dash.bus.retry_queue.add(event, "Count", "counter down")
        letter = await dash.bus.retry_queue.mark_failed(item)
        assert letter is not None
        return letter

    return dash.run(make)


def retry_item(dash: Dash, version: int | None, data: Any) -> RetryItem:
    return dash.run(dash.bus.retry_queue.add, stored_event(version, data), "Count", "slow")


def fact(html: str, name: str) -> str:
    """The text of the ``name`` fact (``<dt>name</dt><dd>…</dd>``), tags left out."""
    match = re.search(rf"<dt>{name}</dt><dd[^>]*>(.*?)</dd>", html, re.S)
    assert match is not None, f"no {name} on the page"
    return unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip()


def pre(html: str, pre_id: str) -> str:
    match = re.search(rf'<pre class="code" id="{pre_id}">(.*?)</pre>', html, re.S)
    assert match is not None, f"no {pre_id} on the page"
    return unescape(match.group(1))


def no_version_card(html: str) -> bool:
    return section(html, "upcast") is None and section(html, "reading") is None


def section(html: str, section_id: str) -> str | None:
    match = re.search(rf'<section class="card" id="{section_id}">(.*?)</section>', html, re.S)
    return None if match is None else match.group(1)


def test_without_registered_types_the_stored_version_only(dash: Dash) -> None:
    plain = dead_letter(dash, None, {"post": 7, "user": "ann"})
    second = dead_letter(dash, 2, {"post_id": 7, "user": "ann"})
    page = dash.get(f"/dead-letters/{plain.id}").text
    assert fact(page, "Version") == "1"
    assert "current" not in fact(page, "Version")
    assert no_version_card(page)
    assert fact(dash.get(f"/dead-letters/{second.id}").text, "Version") == "2"
    retry = retry_item(dash, 2, {"post_id": 7, "user": "ann"})
    assert fact(dash.get(f"/retry-queue/{retry.id}").text, "Version") == "2"


def test_an_app_shows_the_upcast_payload_and_keeps_the_stored_one(dash: Dash) -> None:
    like_v3(dash.bus)
    item = dead_letter(dash, None, {"post": 7, "user": "ann"})
    page = dash.get(f"/dead-letters/{item.id}").text
    assert fact(page, "Version") == "stored 1 → current 3"
    upcast = section(page, "upcast")
    assert upcast is not None
    assert "Upcast to v3" in upcast
    shown = pre(upcast, "upcast-payload")
    assert '"post_id": 7' in shown
    assert '"weight": 1' in shown
    assert '"post":' not in shown
    payload = pre(page, "payload")
    assert '"post": 7' in payload
    assert "post_id" not in payload
    assert dash.run(dash.bus.dead_letters.get, item.id).event_data == {"post": 7, "user": "ann"}
    current = dead_letter(dash, 3, {"post_id": 8, "user": "bob", "weight": 2})
    page = dash.get(f"/dead-letters/{current.id}").text
    assert fact(page, "Version") == "3 (the current version)"
    assert no_version_card(page)


def test_an_upcaster_that_fails_or_an_unknown_version_shows_the_reason(dash: Dash) -> None:
    like_v3(dash.bus)
    broken = dead_letter(dash, 1, {"user": "ann"})
    page = dash.get(f"/dead-letters/{broken.id}").text
    assert fact(page, "Version") == "stored 1 → current 3"
    reading = section(page, "reading")
    assert reading is not None
    assert section(page, "upcast") is None
    assert "upcast failed v1→v2: KeyError &#39;post&#39; (like.added)" in reading
    newer = dead_letter(dash, 4, {"post_id": 1})
    page = dash.get(f"/dead-letters/{newer.id}").text
    assert fact(page, "Version") == "stored 4 → current 3"
    assert "unknown version 4 of like.added (this code knows up to 3)" in str(
        section(page, "reading")
    )
    retry = retry_item(dash, 4, {"post_id": 1})
    page = dash.get(f"/retry-queue/{retry.id}").text
    assert fact(page, "Version") == "stored 4 → current 3"
    assert "unknown version 4 of like.added" in str(section(page, "reading"))


def test_a_type_the_app_does_not_register(dash: Dash) -> None:
    dash.bus.event_type("order.paid", version=2, upcasters={1: lambda data: data})
    item = dead_letter(dash, None, {"post": 7, "user": "ann"})
    page = dash.get(f"/dead-letters/{item.id}").text
    assert fact(page, "Version") == "1 (this app does not register like.added)"
    assert no_version_card(page)


def test_the_retry_item_page_shows_the_upcast_payload(dash: Dash) -> None:
    like_v3(dash.bus)
    retry = retry_item(dash, 2, {"post_id": 5, "user": "cy"})
    page = dash.get(f"/retry-queue/{retry.id}").text
    assert fact(page, "Version") == "stored 2 → current 3"
    assert "&#34;weight&#34;: 1" in str(section(page, "upcast"))


def test_what_upcasters_make_and_say_is_escaped(dash: Dash) -> None:
    def hostile(data: dict[str, Any]) -> dict[str, Any]:
        if data.get("fail"):
            raise ValueError(XSS)
        return {XSS: data["post"], "note": XSS}

    dash.bus.event_type("like.added", version=2, upcasters={1: hostile})
    made = dead_letter(dash, None, {"post": 1, "user": "ann"})
    failed = dead_letter(dash, None, {"fail": True})
    for item, where in ((made, "upcast"), (failed, "reading")):
        page = dash.get(f"/dead-letters/{item.id}").text
        assert XSS not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in str(section(page, where))


def test_a_failure_group_of_version_errors_names_the_type_and_stored_version(dash: Dash) -> None:
    like_v3(dash.bus)
    dash.bus.subscribe("like.added", lambda event: None, name="Count")

    async def publish() -> None:
        for version, data in ((1, {"user": "ann"}), (1, {"user": "bob"}), (4, {}), (5, {})):
            await dash.bus.publish(stored_event(version, data))

    dash.run(publish)
    page = dash.get("/groups").text
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    texts = [" ".join(unescape(re.sub(r"<[^>]+>", " ", row)).split()) for row in rows]
    upcast = [(t, row) for t, row in zip(texts, rows, strict=True) if "upcast failed" in t]
    assert len(upcast) == 1
    text, row = upcast[0]
    assert "like.added v1 → UpcastFailed upcast failed v1→v2: KeyError '<str>' (like.added)" in text
    assert re.search(r'<td class="num"><a [^>]*>2</a></td>', row)  # both in one group
    unknown = sorted(t for t in texts if "unknown version" in t)
    assert len(unknown) == 2  # version 4 and version 5 wait for different deploys
    assert "like.added v4 → UnknownVersion unknown version 4 of like.added" in unknown[0]
    assert "like.added v5 → UnknownVersion unknown version 5 of like.added" in unknown[1]


def test_other_failure_groups_show_no_version(dash: Dash) -> None:
    like_v3(dash.bus)
    dead_letter(dash, None, {"post": 7, "user": "ann"})
    page = dash.get("/groups").text
    assert "counter down" in page
    assert "group-version" not in page.split("<tbody>")[1]


# the services page ------------------------------------------------------------------


def register_services(dash: Dash) -> None:
    """social registers like.added v3 (and a hostile type name at v2); feed reads
    like.added at v2; audit reads everything unversioned; billing only orders."""

    async def make() -> None:
        store, clock = dash.bus.store, dash.clock
        social = EventBus(store, service="social", clock=clock, route_refresh=0)
        like_v3(social)
        social.event_type(XSS, version=2, upcasters={1: dict})
        social.subscribe("like.added", lambda event: None, name="Notify")
        feed = EventBus(store, service="feed", clock=clock, route_refresh=0)
        feed.event_type("like.added", version=2, upcasters={1: post_id})
        feed.subscribe("like.added", lambda event: None, name="Count")
        audit = EventBus(store, service="audit", clock=clock, route_refresh=0)
        audit.subscribe("*", lambda event: None, name="Log")
        billing = EventBus(store, service="billing", clock=clock, route_refresh=0)
        billing.subscribe("order.paid", lambda event: None, name="Invoice")
        for bus in (social, feed, audit, billing):
            await bus.register()

    dash.run(make)


def type_rows(html: str) -> dict[str, str]:
    """The Event types table: each row's text (tags left out) by type."""
    rows = re.findall(r'<tr data-type="([^"]*)"[^>]*>(.*?)</tr>', html, re.S)
    return {
        unescape(name): " ".join(unescape(re.sub(r"<[^>]+>", " ", row)).split())
        for name, row in rows
    }


def test_the_services_page_shows_producers_and_consumers_of_each_type(dash: Dash) -> None:
    register_services(dash)
    page = dash.get("/services").text
    assert XSS not in page
    rows = type_rows(page)
    assert set(rows) == {"like.added", XSS}
    assert rows["like.added"] == (
        "like.added feed v2 social v3 audit/Log unversioned "
        "feed/Count v2 behind v3 social/Notify v3"
    )
    assert rows[XSS] == f"{XSS} social v2 audit/Log unversioned"
    consumers = re.findall(r'<div class="consumer" data-consumer="([^"]*)">(.*?)</div>', page)
    flagged = sorted((unescape(key), "badge-behind" in cell) for key, cell in consumers)
    assert flagged == [
        ("audit/Log", False),  # a glob ("*"): never counted behind
        ("audit/Log", False),
        ("feed/Count", True),
        ("social/Notify", False),
    ]


def test_the_services_page_of_one_service_shows_its_types_only(dash: Dash) -> None:
    register_services(dash)
    assert set(type_rows(dash.get("/services?service=feed").text)) == {"like.added"}
    billing = dash.get("/services?service=billing").text
    assert type_rows(billing) == {}
    assert 'id="event-types"' not in billing


def test_the_services_page_without_registered_types_has_no_event_types(dash: Dash) -> None:
    dash.run(dash.bus.register)
    assert 'id="event-types"' not in dash.get("/services").text
