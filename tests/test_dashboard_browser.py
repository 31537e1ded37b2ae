"""The dashboard in a real browser: Playwright drives Debian's chromium
(/usr/bin/chromium, never a downloaded one) against ``retrybus dashboard`` served
by uvicorn on 127.0.0.1 over a seeded SQLite store.

Without chromium or Playwright these tests are skipped on a laptop and fail in CI
(CI=true), which must run them; ``make test`` installs chromium."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import retrybus
from dashboard_support import SECRET, XSS, Served, dead, serve_cli
from retrybus import EventBus

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def unavailable(what: str, how: str) -> None:
    """Skip on a laptop; fail in CI, which must run the browser tests."""
    message = f"{what} is missing: {how}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the dashboard's browser tests must run)")
    pytest.skip(message)


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
    """The dashboard over a store with three failure groups, one of them hostile, and
    a scheduled delivery."""
    tmp_path = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{tmp_path / 'browser.db'}"

    async def seed() -> None:
        async with EventBus(retrybus.open_store(url)) as bus:
            for n in range(6):
                await dead(bus, n, handler="Mailer", error=ConnectionError("smtp down"))
            for n in range(4):
                await dead(
                    bus,
                    n,
                    handler="Indexer",
                    event_type="post.published",
                    error=KeyError(f"post {n} missing"),
                )
            await dead(
                bus,
                99,
                handler="Renderer",
                event_type="page.rendered",
                data={"html": XSS, "n": 99},
                error=ValueError(XSS),
                metadata={"note": XSS},
            )
            bus.subscribe("reminder.due", lambda event: None, name="Reminder")
            await bus.publish(retrybus.Event("reminder.due", {"n": 1}), deliver_in=3600)

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
    dialogs: list[str] = []
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    opened.dialogs = dialogs
    yield opened
    context.close()
    assert dialogs == [], f"a dialog fired: {dialogs}"


def log_in(page: Any) -> None:
    page.goto("/login")
    page.fill("#token", SECRET)
    page.click("form.stack button[type=submit]")
    page.wait_for_selector(".who-name")
    assert page.inner_text(".who-name") == "alice"


def stat(page: Any, name: str) -> int:
    page.goto("/")
    return int(page.inner_text(f"#stat-{name}").replace(",", ""))


def test_log_in_filter_and_open_a_detail_page(page: Any) -> None:
    from playwright.sync_api import expect

    log_in(page)
    page.goto("/dead-letters")
    page.fill("#f-handler", "Indexer")
    page.click("form.filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"/dead-letters\?handler=Indexer$"))
    rows = page.locator("table.rows tbody tr")
    expect(rows).to_have_count(4)
    for text in rows.all_inner_texts():
        assert "Indexer" in text
    rows.first.locator("td:nth-child(3) a").click()
    expect(page.locator("h1")).to_contain_text("Indexer")
    expect(page.locator("#payload")).to_contain_text('"n":')
    expect(page.locator(".error-banner")).to_contain_text("KeyError")
    # the edit form is there, folded
    page.click("#edit summary")
    expect(page.locator("#data")).to_be_visible()


def test_requeue_a_failure_group_and_watch_the_redrive(page: Any) -> None:
    from playwright.sync_api import expect

    log_in(page)
    unprocessed, queued = stat(page, "unprocessed"), stat(page, "retry")
    page.goto("/groups")
    row = page.locator("table.rows tbody tr", has_text="Indexer")
    row.get_by_role("link", name="Requeue…").click()
    expect(page.locator("#confirm-count")).to_have_text("4")
    page.fill("#rate", "100")
    page.get_by_role("button", name="Requeue 4 dead letters").click()
    expect(page).to_have_url(re.compile(r"/redrives/redrive_[0-9a-f]+$"))
    # the page refreshes itself until the background runner has finished
    expect(page.locator(".page-head .badge")).to_have_text("completed", timeout=20_000)
    expect(page.locator("#redrive-done")).to_have_text("4")
    assert stat(page, "unprocessed") == unprocessed - 4
    assert stat(page, "retry") == queued + 4


def test_cancel_a_scheduled_delivery_after_confirming(page: Any) -> None:
    from playwright.sync_api import expect

    log_in(page)
    page.goto("/retry-queue")
    page.click("#kind-scheduled")
    expect(page).to_have_url(re.compile(r"/retry-queue\?kind=scheduled$"))
    rows = page.locator("table.rows tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".badge-kind-scheduled")).to_have_text("scheduled")
    rows.first.get_by_role("button", name="Cancel").click()
    expect(page.locator("h1")).to_contain_text("Cancel the scheduled delivery of reminder.due")
    page.get_by_role("button", name="Cancel the delivery").click()
    expect(page).to_have_url(re.compile(r"/retry-queue\?kind=scheduled$"))
    expect(page.locator(".flash")).to_contain_text("will not be delivered")
    expect(page.locator("table.rows")).to_have_count(0)
    expect(page.locator("#kind-scheduled .tab-count")).to_have_text("0")


def test_a_post_without_a_token_is_refused(page: Any) -> None:
    page.goto("/dead-letters?handler=Mailer")
    assert page.locator("form[method=post]").count() == 0  # no action forms logged out
    href = page.locator("table.rows tbody tr td:nth-child(2) a").first.get_attribute("href")
    assert href is not None
    before = stat(page, "unprocessed")
    page.goto("/")
    # a form posted from the dashboard's own page, but without a session or CSRF token
    with page.expect_navigation() as navigation:
        page.evaluate(
            """(action) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = action;
                document.body.appendChild(form);
                form.submit();
            }""",
            href + "/delete",
        )
    response = navigation.value
    assert response is not None
    assert response.status == 403
    assert "log in with a token" in page.inner_text(".error-detail")
    assert stat(page, "unprocessed") == before


def test_an_xss_payload_renders_as_text(page: Any) -> None:
    from playwright.sync_api import expect

    log_in(page)
    page.goto("/dead-letters?handler=Renderer")
    expect(page.locator("table.rows tbody tr")).to_have_count(1)
    expect(page.locator("table.rows")).to_contain_text(XSS)
    page.locator("table.rows tbody tr td:nth-child(3) a").click()
    expect(page.locator("#payload")).to_contain_text(XSS)
    expect(page.locator(".error-banner")).to_contain_text(XSS)
    expect(page.locator("#metadata")).to_contain_text(XSS)
    assert page.locator("script:not([src])").count() == 0  # nothing became a script
    assert page.evaluate("() => document.querySelectorAll('script').length") == 1
    page.goto("/groups")
    expect(page.locator("table.rows")).to_contain_text(XSS)
    assert page.dialogs == []


# on a phone -------------------------------------------------------------------------------

PHONE = {"width": 390, "height": 844}
# the page's own width, and the edges of the top bar and the navigation with all they hold
EXTENT = """() => {
    const edges = (selector) => {
        const boxes = Array.from(document.querySelectorAll(selector), (e) => e.getBoundingClientRect());
        return {left: Math.min(...boxes.map((b) => b.left)), right: Math.max(...boxes.map((b) => b.right))};
    };
    return {
        page: document.documentElement.scrollWidth,
        bar: edges("header.topbar, header.topbar *"),
        nav: edges("nav.nav, nav.nav *"),
    };
}"""
# the icon the page links to, loaded as an image (as the Content-Security-Policy allows)
ICON_WIDTH = """async () => {
    const image = new Image();
    image.src = document.querySelector("link[rel=icon]").href;
    try { await image.decode(); } catch (error) { return 0; }
    return image.naturalWidth;
}"""


@pytest.fixture
def phone(browser: Any, server: Served) -> Iterator[Any]:
    """A page 390 px wide (a phone's), recording what the Content-Security-Policy refused."""
    context = browser.new_context(base_url=server.url, viewport=PHONE)
    context.set_default_timeout(10_000)
    opened = context.new_page()
    refused: list[str] = []

    def note(message: Any) -> None:
        if "Content Security Policy" in message.text:
            refused.append(message.text)

    opened.on("console", note)
    yield opened
    context.close()
    assert refused == [], f"the Content-Security-Policy refused: {refused}"


def test_on_a_phone_the_navigation_stays_within_the_screen(phone: Any) -> None:
    width = PHONE["width"]
    phone.goto("/dead-letters?handler=Mailer")
    detail = phone.locator("table.rows tbody a[href*='/dead-letters/dlq_']").first
    pages = ["/", "/dead-letters", detail.get_attribute("href"), "/groups", "/retry-queue"]
    pages += ["/redrives", "/login"]
    for logged_in in (False, True):  # logged in, the top bar holds a name and a button more
        if logged_in:
            log_in(phone)
        for path in pages:
            phone.goto(path)
            extent = phone.evaluate(EXTENT)
            where = (path, logged_in, extent)
            assert extent["page"] <= width, where
            for part in ("bar", "nav"):
                assert extent[part]["left"] >= 0, where
                assert extent[part]["right"] <= width, where
            nav = phone.locator("nav.nav").bounding_box()
            assert nav is not None
            assert nav["x"] >= 0
            assert nav["x"] + nav["width"] <= width, where
    # every section is a tap away
    phone.locator("nav.nav a", has_text="Redrives").click()
    phone.wait_for_url("**/redrives")
    assert phone.evaluate(ICON_WIDTH) > 0
