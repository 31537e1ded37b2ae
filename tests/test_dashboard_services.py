"""The dashboard and services (issue 12): the Services page (workers, handlers,
the "no live worker" warning), removing a subscription from it (token, CSRF,
confirmation, refused while live workers run it), ``?service=`` on every other
page and the selector that sets it, and each service's depth history."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from html import unescape
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from dashboard_support import Dash, dead, hrefs, open_test_store, running
from retrybus import (
    DeadLetterFilter,
    DepthHistory,
    Event,
    EventBus,
    RetryItem,
    WorkerBeat,
)
from retrybus.dashboard import create_app


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path)) as opened:
        yield opened


@dataclass
class Seeded:
    """What ``two_services`` made: the buses of billing and shipping (on the
    dashboard's store) and the ids of their dead letters."""

    billing: EventBus
    shipping: EventBus
    billing_dead: list[str]
    shipping_dead: list[str]


def two_services(dash: Dash) -> Seeded:
    """billing (SendInvoice on ``order.*``, Ledger on ``order.paid``) with no live
    worker, only a stale heartbeat, and shipping (Ship on ``order.paid``) with a
    live one; two events published to both, and dead letters of each."""

    async def make() -> Seeded:
        store, clock = dash.bus.store, dash.clock
        billing = EventBus(store, service="billing", clock=clock, route_refresh=0)
        shipping = EventBus(store, service="shipping", clock=clock, route_refresh=0)
        billing.subscribe("order.*", lambda event: None, name="SendInvoice")
        billing.subscribe("order.paid", lambda event: None, name="Ledger")
        shipping.subscribe("order.paid", lambda event: None, name="Ship")
        await billing.register()
        await shipping.register()
        for n in range(2):
            await dash.bus.publish(Event("order.paid", {"order": n}))
        now = clock.now()
        await store.beat(beat("ship-1", "shipping", ("Ship",), now))
        await store.beat(beat("bill-old", "billing", ("SendInvoice",), now - timedelta(hours=1)))
        billing_dead = [
            (await dead(billing, n, handler="Ledger", error="ledger closed")).id for n in range(3)
        ]
        shipping_dead = [(await dead(shipping, 7, handler="Ship", error="no truck")).id]
        clock.advance(5)  # the pending deliveries are 5 s old
        return Seeded(billing, shipping, billing_dead, shipping_dead)

    return dash.run(make)


def beat(name: str, service: str, handlers: tuple[str, ...], seen: object) -> WorkerBeat:
    return WorkerBeat(
        name=name,
        service=service,
        host="box-7",
        pid=4242,
        started_at=seen,  # type: ignore[arg-type]
        last_seen=seen,  # type: ignore[arg-type]
        interval=10.0,
        lanes=8,
        lanes_busy=2,
        handlers=handlers,
        version="9.9.9",
    )


def section(html: str, service: str) -> str:
    """The card of one service on the Services page."""
    match = re.search(rf'<section [^>]*id="service-{service}".*?</section>', html, re.S)
    assert match is not None, f"no card of service {service}"
    return match.group(0)


def row(html: str, handler: str) -> str:
    match = re.search(rf'<tr[^>]*data-handler="{handler}".*?</tr>', html, re.S)
    assert match is not None, f"no row of handler {handler}"
    return match.group(0)


def cells(html: str) -> list[str]:
    return [
        re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", cell)).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)
    ]


def flash_of(dash: Dash, response: object) -> str:
    location = response.headers["location"]  # type: ignore[attr-defined]
    html = dash.client.get(location).text
    match = re.search(r'<div class="flash flash-(\w+)" role="status">(.*?)</div>', html, re.S)
    assert match is not None, html
    return f"{match.group(1)}: {unescape(match.group(2).strip())}"


def subscriptions(dash: Dash, service: str) -> dict[str, str | None]:
    """The stored subscriptions of ``service``: handler -> who removed it (None: live)."""
    stored = dash.run(dash.bus.store.list_subscriptions, service, removed=True)
    return {s.handler_name: s.removed_by for s in stored}


def listed_dead(html: str) -> set[str]:
    return set(re.findall(r'href="/dead-letters/(dlq_[0-9a-f]+)[?"]', html))


def listed_retry(html: str) -> set[str]:
    return set(re.findall(r'href="/retry-queue/(retry_[0-9a-f]+)[?"]', html))


# the Services page ------------------------------------------------------------------


def test_the_services_page_shows_workers_handlers_and_the_warning(dash: Dash) -> None:
    two_services(dash)
    response = dash.get("/services")
    assert response.status_code == 200
    html = response.text
    assert re.search(r'<a href="/services"[^>]* class="active"', html)  # in the nav

    shipping = section(html, "shipping")
    assert "service-warn" not in shipping.split(">", 1)[0]
    assert "no live worker" not in shipping
    worker = cells(re.search(r"<table class=\"table workers\">.*?</table>", shipping, re.S)[0])
    assert worker == ["live ship-1", "box-7", "4242", "5 s ago", "5 s ago", "2 / 8", "9.9.9"]
    ship = cells(row(shipping, "Ship"))
    assert ship[0].startswith("Ship")
    assert "run by 1 live worker" in ship[0]
    assert ship[1] == "order.paid"
    assert ship[3:8] == ["2", "0", "0", "1", "due 5 s ago"]  # pending … dead, oldest pending
    assert 'href="/retry-queue?service=shipping&amp;handler=Ship"' in shipping
    assert 'href="/dead-letters?service=shipping&amp;handler=Ship"' in shipping

    billing = section(html, "billing")
    assert "service-warn" in billing.split(">", 1)[0]  # the warning style
    warning = re.search(r'<div class="[^"]*service-warning"[^>]*>(.*?)</div>', billing, re.S)
    assert warning is not None
    text = re.sub(r"<[^>]+>", "", warning.group(1))
    assert "Warning: no live worker." in text
    assert "4 deliveries wait, the oldest pending for 5 s" in text
    assert "No live worker." in billing
    assert "1 stale heartbeat" in billing
    assert cells(row(billing, "SendInvoice"))[1] == "order.*"
    assert cells(row(billing, "Ledger"))[3:7] == ["2", "0", "0", "3"]
    assert "retries" in cells(row(billing, "Ledger"))[2]  # the policy in words
    assert 'href="/retry-queue?service=billing"' in billing
    assert 'href="/dead-letters?service=billing&amp;processed=false"' in billing


def test_a_service_shown_alone_and_one_the_store_does_not_know(dash: Dash) -> None:
    two_services(dash)
    html = dash.get("/services?service=shipping").text
    assert 'id="service-shipping"' in html
    assert 'id="service-billing"' not in html
    unknown = dash.get("/services?service=nobody").text
    assert "The store knows no service nobody" in unknown
    bad = dash.get("/services?service=no/such")
    assert bad.status_code == 400
    assert "&#39;no/such&#39;" in bad.text


def test_the_services_page_offers_removal_only_to_who_may_act(dash: Dash) -> None:
    two_services(dash)
    html = dash.get("/services").text
    assert 'action="/services/remove"' not in html
    assert "to remove a subscription" in html  # how to log in
    dash.login()
    html = dash.get("/services").text
    assert html.count('action="/services/remove"') == 5  # three handlers, two services


# removing a subscription ---------------------------------------------------------------


def test_remove_asks_first_then_dead_letters_what_waits(dash: Dash) -> None:
    two_services(dash)
    dash.login()
    asked = dash.post("/services/remove", {"service": "billing", "handler": "Ledger"})
    assert asked.status_code == 200
    assert "Remove the subscription of billing/Ledger?" in asked.text
    assert 'name="confirmed" value="yes"' in asked.text
    assert 'name="force"' not in asked.text  # no live worker runs it
    assert subscriptions(dash, "billing") == {"Ledger": None, "SendInvoice": None}

    done = dash.post(
        "/services/remove", {"service": "billing", "handler": "Ledger", "confirmed": "yes"}
    )
    assert done.status_code == 303
    assert done.headers["location"] == "/services"
    assert flash_of(dash, done) == (
        "ok: Removed the subscription of billing/Ledger: 2 waiting deliveries dead-lettered."
    )
    assert subscriptions(dash, "billing") == {"Ledger": "alice", "SendInvoice": None}
    reason = "subscription removed: billing/Ledger (by alice)"
    assert dash.count(service="billing", reason=reason) == 2
    # the removed handler still holds dead letters: shown as removed, by whom
    ledger = row(section(dash.get("/services").text, "billing"), "Ledger")
    assert "removed" in ledger
    assert "by alice" in ledger
    assert "Remove…" not in ledger  # nothing waits for it: nothing more to do

    # a publisher that had not read the routes again records one more delivery for it
    late = RetryItem.pending(
        Event("order.paid", {"order": 9}),
        "Ledger",
        max_retries=3,
        due=dash.clock.now(),
        now=dash.clock.now(),
        service="billing",
    )
    dash.run(dash.bus.store.record_pending, [late])
    ledger = row(section(dash.get("/services").text, "billing"), "Ledger")
    assert "Dead-letter…" in ledger
    asked = dash.post("/services/remove", {"service": "billing", "handler": "Ledger"})
    assert "Dead-letter what waits for billing/Ledger?" in asked.text
    assert "Removed before: Ledger." in asked.text
    again = dash.post(
        "/services/remove", {"service": "billing", "handler": "Ledger", "confirmed": "yes"}
    )
    assert flash_of(dash, again) == (
        "ok: The subscription of billing/Ledger was removed before: "
        "1 waiting delivery dead-lettered."
    )
    assert dash.count(service="billing", reason=reason) == 3


def test_remove_every_subscription_of_a_service(dash: Dash) -> None:
    two_services(dash)
    dash.login()
    asked = dash.post("/services/remove", {"service": "billing"})
    assert "Remove the subscription of every handler of service billing?" in asked.text
    done = dash.post("/services/remove", {"service": "billing", "confirmed": "yes"})
    assert flash_of(dash, done) == (
        "ok: Removed the subscription of billing/Ledger, billing/SendInvoice: "
        "4 waiting deliveries dead-lettered."
    )
    assert subscriptions(dash, "billing") == {"Ledger": "alice", "SendInvoice": "alice"}
    assert subscriptions(dash, "shipping") == {"Ship": None}


def test_remove_without_a_token_or_csrf_is_refused(dash: Dash) -> None:
    two_services(dash)
    form = {"service": "billing", "handler": "Ledger", "confirmed": "yes"}
    refused = dash.post("/services/remove", form, csrf="")
    assert refused.status_code == 403
    assert "Log in" in refused.text or "log in" in refused.text
    dash.login()
    for csrf in (None, "", "0" * 64):
        response = dash.post("/services/remove", form, csrf=csrf)
        assert response.status_code == 403, csrf
        assert "CSRF" in response.text
    foreign = dash.post("/services/remove", form, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert subscriptions(dash, "billing") == {"Ledger": None, "SendInvoice": None}
    assert dash.count(service="billing") == 3


def test_remove_is_refused_while_a_live_worker_runs_the_handler(dash: Dash) -> None:
    two_services(dash)
    dash.login()
    asked = dash.post("/services/remove", {"service": "shipping", "handler": "Ship"})
    assert asked.status_code == 200
    in_use = re.search(r'<div [^>]*id="in-use">(.*?)</div>', asked.text, re.S)
    assert in_use is not None
    assert "ship-1 (pid 4242 on box-7" in in_use.group(1)
    assert 'name="force" value="yes"' in asked.text

    form = {"service": "shipping", "handler": "Ship", "confirmed": "yes"}
    refused = dash.post("/services/remove", form)
    assert refused.status_code == 409
    assert "Cannot remove" in refused.text
    assert "ship-1 (pid 4242 on box-7)" in refused.text
    assert "force" in refused.text
    assert subscriptions(dash, "shipping") == {"Ship": None}

    forced = dash.post("/services/remove", {**form, "force": "yes"})
    assert forced.status_code == 303
    assert "Removed the subscription of shipping/Ship" in flash_of(dash, forced)
    assert subscriptions(dash, "shipping") == {"Ship": "alice"}


def test_remove_of_an_unknown_subscription_or_a_bad_name_is_an_error(dash: Dash) -> None:
    two_services(dash)
    dash.login()
    for confirmed in ("", "yes"):
        form = {"service": "billing", "handler": "Nope", "confirmed": confirmed}
        response = dash.post("/services/remove", form)
        assert response.status_code == 404, confirmed
        assert "no subscription billing/Nope is stored" in response.text
    nobody = dash.post("/services/remove", {"service": "nobody", "confirmed": "yes"})
    assert nobody.status_code == 404
    assert "no subscription of service nobody is stored" in nobody.text
    bad = dash.post("/services/remove", {"service": "no/such"})
    assert bad.status_code == 400
    assert "&#39;no/such&#39;" in bad.text
    assert subscriptions(dash, "billing") == {"Ledger": None, "SendInvoice": None}


# ?service= on the other pages ------------------------------------------------------------


def test_the_dead_letters_page_shows_one_service(dash: Dash) -> None:
    seeded = two_services(dash)
    every = dash.get("/dead-letters").text
    assert listed_dead(every) == {*seeded.billing_dead, *seeded.shipping_dead}
    assert "<th>Service</th>" in every  # two services listed together
    html = dash.get("/dead-letters?service=billing").text
    assert listed_dead(html) == set(seeded.billing_dead)
    assert "<th>Service</th>" not in html
    assert '<input type="hidden" name="service" value="billing">' in html  # the filter form
    # its links go on showing billing: the detail pages, the nav, the bulk actions
    assert f'href="/dead-letters/{seeded.billing_dead[0]}?service=billing"' in html
    assert 'href="/groups?service=billing"' in html
    assert 'href="/retry-queue?service=billing"' in html
    narrowed = dash.get("/dead-letters?service=shipping&handler=Ledger").text
    assert listed_dead(narrowed) == set()


def test_the_groups_page_shows_one_service(dash: Dash) -> None:
    two_services(dash)
    every = dash.get("/groups").text
    assert "ledger closed" in every
    assert "no truck" in every
    html = dash.get("/groups?service=shipping").text
    assert "no truck" in html
    assert "ledger closed" not in html
    groups = re.findall(r'href="/dead-letters\?([^"]*group=grp_[0-9a-f]+)"', html)
    assert groups
    assert all("service=shipping" in unescape(q) for q in groups)


def test_the_retry_queue_page_shows_one_service(dash: Dash) -> None:
    two_services(dash)

    async def queued(service: str) -> set[str]:
        items = await dash.bus.store.list_retry(limit=100, offset=0, service=service)
        return {item.id for item in items}

    billing, shipping = dash.run(queued, "billing"), dash.run(queued, "shipping")
    assert (len(billing), len(shipping)) == (4, 2)
    assert listed_retry(dash.get("/retry-queue").text) == billing | shipping
    html = dash.get("/retry-queue?service=shipping").text
    assert listed_retry(html) == shipping
    assert re.search(r'id="kind-pending"[^>]*>Pending <span class="tab-count">2<', html)
    assert "2 pending · 0 retrying · 0 scheduled" in html
    assert 'href="/retry-queue?handler=Ship&amp;service=shipping"' in html
    one = dash.get("/retry-queue?service=billing&handler=Ledger&kind=pending").text
    assert len(listed_retry(one)) == 2
    assert "1–2 of 2" in one
    assert "Counts are of Ledger." in one
    assert dash.get("/retry-queue?service=billing&handler=Ship").status_code == 200
    assert listed_retry(dash.get("/retry-queue?service=billing&handler=Ship").text) == set()


def test_the_redrives_page_lists_those_of_one_service(dash: Dash) -> None:
    two_services(dash)

    async def start() -> tuple[str, str, str]:
        redrives = dash.bus.redrives
        billing = await redrives.start(DeadLetterFilter(service="billing"), rate=1)
        shipping = await redrives.start(DeadLetterFilter(service="shipping"), rate=1)
        every = await redrives.start(DeadLetterFilter(handler_name="Ledger"), rate=1)
        return billing.id, shipping.id, every.id

    billing, shipping, every = dash.run(start)

    def shown(html: str) -> set[str]:
        return set(re.findall(r'href="/redrives/(redrive_[0-9a-f]+)[?"]', html))

    assert shown(dash.get("/redrives").text) == {billing, shipping, every}
    html = dash.get("/redrives?service=billing").text
    assert shown(html) == {billing}
    assert "<th>Service</th>" in html
    detail = dash.get(f"/redrives/{billing}").text
    assert re.search(r"<dt>Service</dt><dd>billing</dd>", detail)


def test_the_overview_shows_one_service(dash: Dash) -> None:
    two_services(dash)
    every = dash.get("/").text
    assert re.search(r'id="stat-retry">6<', every)
    assert re.search(r'id="stat-unprocessed">4<', every)
    assert 'Queue depth <span class="muted">· all services</span>' in every

    html = dash.get("/?service=billing").text
    assert "· service billing" in html
    assert "the records of service billing only" in html
    assert re.search(r'id="stat-retry">4<', html)
    assert "4 pending · 0 retrying · 0 scheduled" in html
    assert re.search(r'id="stat-unprocessed">3<', html)
    assert re.search(r'id="stat-processed">0<', html)
    assert "dead-lettered · all services" in html  # the retry success figures are the store's
    assert "No samples of service billing yet" in html
    assert 'href="/retry-queue?handler=SendInvoice&amp;service=billing"' in html
    assert "Ship" not in html
    shipping = dash.get("/?service=shipping").text
    assert re.search(r'id="stat-retry">2<', shipping)
    assert re.search(r'id="stat-unprocessed">1<', shipping)


def test_the_selector_lists_the_services_and_keeps_the_page(dash: Dash) -> None:
    two_services(dash)
    html = dash.get("/dead-letters?service=billing&handler=Ledger&offset=50").text
    picker = re.search(r'<form class="service-picker".*?</form>', html, re.S)
    assert picker is not None
    form = picker.group(0)
    assert 'action="/dead-letters"' in form
    options = re.findall(r'<option value="([^"]*)"( selected)?>', form)
    assert options == [("", ""), ("billing", " selected"), ("shipping", "")]
    # the filter stays, the page number and the service do not
    kept = re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', form)
    assert kept == [("handler", "Ledger")]
    # on a detail page it leads to its list
    letter = dash.run(dash.bus.store.list_dead, DeadLetterFilter(), limit=1, offset=0)[0]
    detail = dash.get(f"/dead-letters/{letter.id}?service=billing").text
    assert re.search(r'<form class="service-picker"[^>]*action="/dead-letters"', detail)
    # "all services" drops the service from the links
    every = dash.get("/dead-letters").text
    assert 'href="/groups"' in every
    assert 'href="/services"' in every


def test_mounted_under_a_prefix_the_selector_and_the_links_keep_the_service(
    tmp_path: Path,
) -> None:
    dashboard = create_app(open_test_store("memory", tmp_path), tokens="alice:s3cret-value-123")
    bus = dashboard.state.dashboard.bus

    async def seed() -> None:
        for service in ("billing", "shipping"):
            await dead(EventBus(bus.store, service=service), 1, handler="Ledger")

    with TestClient(Starlette(routes=[Mount("/ops", app=dashboard)])) as client:
        client.portal.call(seed)  # type: ignore[union-attr]
        html = client.get("/ops/dead-letters/bulk?service=billing&action=delete").text
        picker = re.search(r'<form class="service-picker"[^>]*>', html)
        assert picker is not None
        assert 'action="/ops/dead-letters"' in picker.group(0)
        assert re.search(r'<a href="/ops/dead-letters\?service=billing" class="active"', html)
        assert 'href="/ops/services?service=billing"' in html
        assert 'href="/ops/static/dashboard.css"' in html  # files are no pages of a service


def test_one_service_and_no_choice_shows_no_selector(dash: Dash) -> None:
    dash.run(dead, dash.bus, 1)
    html = dash.get("/").text
    assert "service-picker" not in html


def test_a_bad_service_on_any_page_is_a_clear_error(dash: Dash) -> None:
    for path in ("/", "/dead-letters", "/groups", "/retry-queue", "/redrives", "/services"):
        response = dash.get(path, params={"service": "bad name"})
        assert response.status_code == 400, path
        assert "&#39;bad name&#39;" in response.text, path
        # the error page's links do not pass the bad name on
        assert all("service=" not in link for link in hrefs(response.text)), path


def test_actions_go_back_to_the_service_shown(dash: Dash) -> None:
    seeded = two_services(dash)
    dash.login()
    response = dash.post(
        "/dead-letters/selected?service=billing",
        {"action": "requeue", "ids": seeded.billing_dead[0], "back": "service=billing"},
    )
    assert response.headers["location"] == "/dead-letters?service=billing"


# the depth chart of one service (recorded: tests/test_dashboard_service_history.py) ---------


def test_the_overview_charts_the_history_of_the_service_shown(dash: Dash) -> None:
    seeded = two_services(dash)

    async def record() -> None:
        history = DepthHistory(seeded.billing)
        for _ in range(3):
            await history.record()
            dash.clock.advance(60)

    dash.run(record)
    html = dash.get("/?service=billing").text
    assert '<svg class="chart"' in html
    assert "3 samples from" in html
    assert "the workers of service billing add one a minute" in html
    assert "No samples of service shipping yet" in dash.get("/?service=shipping").text
