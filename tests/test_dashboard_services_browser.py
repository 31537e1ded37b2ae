"""The Services page and the service selector in a real browser: Playwright drives
Debian's chromium against ``retrybus dashboard`` over a SQLite store shared by two
services, as tests/test_dashboard_browser.py does (the same skip and fail rules:
with CI=true these tests must run)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import retrybus
from dashboard_support import SECRET, Served, dead, serve_cli
from retrybus import Event, EventBus, WorkerBeat
from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, EXTENT, PHONE, unavailable

# the live worker's heartbeat interval: it stays live (three intervals) through the tests
BEAT_INTERVAL = 3600.0


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright", "pip install -e '.[dev]'")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(CHROMIUM, "apt-get install -y chromium (make test does it as root)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The dashboard over a store shared by billing (work waiting, no live worker)
    and shipping (a live worker), with dead letters of each."""
    tmp_path = tmp_path_factory.mktemp("services-browser")
    url = f"sqlite:///{tmp_path / 'services.db'}"

    async def seed() -> None:
        async with EventBus(retrybus.open_store(url)) as publisher:
            store = publisher.store
            billing = EventBus(store, service="billing", route_refresh=0)
            shipping = EventBus(store, service="shipping", route_refresh=0)
            billing.subscribe("order.*", lambda event: None, name="SendInvoice")
            shipping.subscribe("order.paid", lambda event: None, name="Ship")
            await billing.register()
            await shipping.register()
            await publisher.publish(Event("order.paid", {"order": 1}))
            now = publisher.clock.now()
            await store.beat(
                WorkerBeat(
                    name="ship-worker-1",
                    service="shipping",
                    host="box-7",
                    pid=4242,
                    started_at=now,
                    last_seen=now,
                    interval=BEAT_INTERVAL,
                    lanes=8,
                    lanes_busy=1,
                    handlers=("Ship",),
                    version="9.9.9",
                )
            )
            for n in range(3):
                await dead(billing, n, handler="SendInvoice", error="ledger closed")
            for n in range(2):
                await dead(shipping, n, handler="Ship", error="no truck")

    # in a thread of its own: Playwright's sync API keeps an event loop in this one
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, seed()).result()
    with serve_cli(url, tmp_path) as served:
        yield served


@pytest.fixture
def page(browser: Any, server: Served) -> Iterator[Any]:
    context = browser.new_context(base_url=server.url)
    context.set_default_timeout(10_000)
    opened = context.new_page()
    yield opened
    context.close()


def test_the_services_page_shows_live_workers_and_the_warning(page: Any) -> None:
    from playwright.sync_api import expect

    page.goto("/")
    page.locator("nav.nav a", has_text="Services").click()
    expect(page).to_have_url(re.compile(r"/services$"))
    shipping = page.locator("#service-shipping")
    expect(shipping.locator("table.workers tbody tr")).to_have_count(1)
    expect(shipping.locator("table.workers")).to_contain_text("ship-worker-1")
    expect(shipping.locator("table.workers")).to_contain_text("box-7")
    expect(shipping.locator("table.workers")).to_contain_text("1 / 8")
    expect(shipping.locator(".service-warning")).to_have_count(0)
    billing = page.locator("#service-billing")
    expect(billing).to_have_class(re.compile(r"\bservice-warn\b"))
    warning = billing.locator(".service-warning")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("Warning: no live worker.")
    expect(billing).to_contain_text("No live worker.")
    # its handler's dead letters are a click away, filtered to it
    billing.locator("tr[data-handler=SendInvoice]").get_by_role("link", name="Dead letters").click()
    expect(page).to_have_url(re.compile(r"/dead-letters\?service=billing&handler=SendInvoice$"))
    expect(page.locator("table.rows tbody tr")).to_have_count(3)


def test_the_service_selector_filters_the_dead_letters(page: Any) -> None:
    from playwright.sync_api import expect

    page.goto("/dead-letters")
    rows = page.locator("table.rows tbody tr")
    expect(rows).to_have_count(5)
    page.select_option("#service-picker", "shipping")
    expect(page).to_have_url(re.compile(r"/dead-letters\?service=shipping$"))
    expect(rows).to_have_count(2)
    for text in rows.all_inner_texts():
        assert "Ship" in text
    expect(page.locator("h1")).to_contain_text("service shipping")
    # the other pages go on showing shipping
    page.locator("nav.nav a", has_text="Failure groups").click()
    expect(page).to_have_url(re.compile(r"/groups\?service=shipping$"))
    expect(page.locator("table.rows")).to_contain_text("no truck")
    expect(page.locator("table.rows")).not_to_contain_text("ledger closed")
    expect(page.locator("#service-picker")).to_have_value("shipping")
    page.select_option("#service-picker", "")
    expect(page).to_have_url(re.compile(r"/groups$"))
    expect(page.locator("table.rows")).to_contain_text("ledger closed")


def test_removing_asks_first_and_needs_force_while_a_worker_runs_it(page: Any) -> None:
    from playwright.sync_api import expect

    page.goto("/login")
    page.fill("#token", SECRET)
    page.click("form.stack button[type=submit]")
    page.wait_for_selector(".who-name")
    page.goto("/services")
    row = page.locator("#service-shipping tr[data-handler=Ship]")
    row.get_by_role("button", name="Remove…").click()
    expect(page.locator("h1")).to_contain_text("Remove the subscription of shipping/Ship?")
    expect(page.locator("#in-use")).to_contain_text("ship-worker-1")
    page.get_by_role("button", name="Remove").click()
    expect(page.locator(".error-card h1")).to_have_text("Cannot remove")
    expect(page.locator(".error-detail")).to_contain_text("ship-worker-1 (pid 4242 on box-7)")
    # asked again (a confirmation page is the answer to a POST: no going back to it)
    page.goto("/services")
    row.get_by_role("button", name="Remove…").click()
    page.check("input[name=force]")
    page.get_by_role("button", name="Remove").click()
    expect(page).to_have_url(re.compile(r"/services$"))
    expect(page.locator(".flash-ok")).to_contain_text(
        "Removed the subscription of shipping/Ship: 1 waiting delivery dead-lettered."
    )
    expect(page.locator("#service-shipping tr[data-handler=Ship]")).to_contain_text("removed")


def test_on_a_phone_the_selector_stays_within_the_screen(browser: Any, server: Served) -> None:
    context = browser.new_context(base_url=server.url, viewport=PHONE)
    context.set_default_timeout(10_000)
    phone = context.new_page()
    try:
        for path in ("/services", "/dead-letters?service=billing", "/?service=shipping"):
            phone.goto(path)
            extent = phone.evaluate(EXTENT)
            where = (path, extent)
            assert extent["page"] <= PHONE["width"], where
            assert extent["bar"]["left"] >= 0, where
            assert extent["bar"]["right"] <= PHONE["width"], where
            assert phone.locator("#service-picker").is_visible(), path
    finally:
        context.close()
