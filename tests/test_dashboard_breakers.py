"""The dashboard's Breakers page (issue 16): the breakers of every service (or the
one shown) with their state, handlers, trips and time to half-open; Isolate
and Reset, which need a write token, and which a bus of the breaker's service
on the same store follows at its next refresh; none of it offered read-only."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest

from dashboard_support import Dash, open_test_store, running
from retrybus import CircuitBreaker, Event, EventBus, FixedDelay

DB = CircuitBreaker("orders-db", min_calls=4, failure_ratio=0.5, open_for=30, probes=2)


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path)) as opened:
        yield opened


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store("sqlite", tmp_path), tokens=None) as opened:
        yield opened


async def failing(event: Event) -> None:
    raise ConnectionError("database unreachable")


def billing_and_shipping(dash: Dash, *, trip: bool = True) -> EventBus:
    """billing (SaveOrder and SaveRefund behind orders-db, tripped by four
    failures unless ``trip`` is false) and shipping (Ship behind carrier, never
    tripped), both registered on the dashboard's store; returns billing's bus."""

    async def make() -> EventBus:
        store, clock = dash.bus.store, dash.clock
        billing = EventBus(
            store,
            service="billing",
            clock=clock,
            default_policy=FixedDelay(delay=1, max_retries=3),
        )
        billing.subscribe("order.paid", failing, name="SaveOrder", breaker=DB)
        billing.subscribe("order.refunded", failing, name="SaveRefund", breaker="orders-db")
        shipping = EventBus(store, service="shipping", clock=clock)
        shipping.subscribe("order.paid", failing, name="Ship", breaker=CircuitBreaker("carrier"))
        await billing.register()
        await shipping.register()
        if trip:
            for n in range(4):
                await billing.publish(Event("order.paid", {"n": n}))
        return billing

    return dash.run(make)


def rows(html: str) -> dict[str, str]:
    """Each breaker's row (``service/name`` to its HTML)."""
    return dict(re.findall(r'<tr data-breaker="([^"]+)"[^>]*>(.*?)</tr>', html, re.S))


def state_of(html: str, key: str) -> str:
    match = re.search(rf'<tr data-breaker="{re.escape(key)}" data-state="([a-z_]+)"', html)
    assert match is not None, f"no row of {key}"
    return match.group(1)


def test_the_page_lists_every_service_s_breakers(dash: Dash) -> None:
    billing_and_shipping(dash)
    dash.clock.advance(10)
    html = dash.get("/breakers").text
    assert set(rows(html)) == {"billing/orders-db", "shipping/carrier"}
    assert state_of(html, "billing/orders-db") == "open"
    assert state_of(html, "shipping/carrier") == "closed"  # never tripped: listed too
    row = unescape(rows(html)["billing/orders-db"])
    assert "SaveOrder" in row
    assert "SaveRefund" in row
    assert "4 of 4 calls failed in 30s" in row
    assert "in 20 s" in row  # time to half-open
    assert 'href="/breakers"' in dash.get("/").text  # in the navigation
    dash.clock.advance(20)
    assert state_of(dash.get("/breakers").text, "billing/orders-db") == "half_open"


def test_the_service_shown_keeps_to_its_breakers(dash: Dash) -> None:
    billing_and_shipping(dash)
    html = dash.get("/breakers?service=shipping").text
    assert set(rows(html)) == {"shipping/carrier"}
    assert "No circuit breakers of service nobody" in dash.get("/breakers?service=nobody").text


def test_isolate_and_reset_need_a_token(dash: Dash) -> None:
    billing_and_shipping(dash, trip=False)
    html = dash.get("/breakers").text
    assert 'method="post"' not in html.split('<main class="page">')[1]
    assert "Log in</a> with a token to isolate or reset a breaker" in html
    form = {"service": "billing", "name": "orders-db"}
    response = dash.post("/breakers/isolate", form, csrf="")
    assert response.status_code == 403
    assert state_of(dash.get("/breakers").text, "billing/orders-db") == "closed"


def test_a_bus_of_the_service_follows_isolate_and_reset_at_its_refresh(dash: Dash) -> None:
    billing = billing_and_shipping(dash, trip=False)
    dash.login()
    html = dash.get("/breakers").text
    assert '/breakers/isolate"' in html
    assert '/breakers/reset"' not in html  # all closed: nothing to reset
    response = dash.post("/breakers/isolate", {"service": "billing", "name": "orders-db"})
    assert response.status_code == 303
    page = dash.get("/breakers")
    assert "Breaker billing/orders-db isolated" in unescape(page.text)
    assert state_of(page.text, "billing/orders-db") == "isolated"
    assert "isolated by alice" in rows(page.text)["billing/orders-db"]

    async def published() -> tuple[str, ...]:
        await billing.breakers.refresh()
        return (await billing.publish(Event("order.paid", {"n": 9}))).pending

    assert dash.run(published) == ("SaveOrder",)  # held back, not called
    assert (
        dash.post("/breakers/reset", {"service": "billing", "name": "orders-db"}).status_code == 303
    )
    assert state_of(dash.get("/breakers").text, "billing/orders-db") == "closed"

    async def state_after_refresh() -> str:
        await billing.breakers.refresh()
        return (await billing.breakers.get("orders-db")).state

    assert dash.run(state_after_refresh) == "closed"
    dash.run(billing.close)


def test_an_unknown_breaker_is_a_404_naming_it(dash: Dash) -> None:
    billing_and_shipping(dash, trip=False)
    dash.login()
    response = dash.post("/breakers/reset", {"service": "billing", "name": "nope"})
    assert response.status_code == 404
    assert "nope" in unescape(response.text)
    bad = dash.post("/breakers/reset", {"service": "bad name", "name": "orders-db"})
    assert bad.status_code == 400


def test_read_only_shows_no_buttons_and_refuses(read_only: Dash) -> None:
    billing_and_shipping(read_only)
    html = read_only.get("/breakers").text
    assert state_of(html, "billing/orders-db") == "open"
    assert 'method="post"' not in html
    assert "Read-only dashboard: isolate or reset a breaker is not possible" in html
    response = read_only.post(
        "/breakers/reset", {"service": "billing", "name": "orders-db"}, csrf=""
    )
    assert response.status_code == 403
    assert state_of(read_only.get("/breakers").text, "billing/orders-db") == "open"
