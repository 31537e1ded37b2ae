"""Seed a store with six hours of a failing service, serve the dashboard on it and
save the screenshots the README shows (docs/dashboard-overview.png,
docs/dashboard-detail.png).

    .venv/bin/python docs/make_screenshots.py [--store sqlite:///path.db] [--out docs]

Needs the dashboard and dev extras and Debian's chromium (/usr/bin/chromium);
Playwright drives it, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import linecache
import os
import random
import socket
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from playwright.sync_api import sync_playwright

from retrybus import DepthHistory, Event, EventBus, ManualClock, PermanentError, Store, open_store
from retrybus.dashboard import create_app

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
TOKEN = "alice:dashboard-demo-secret"
HOURS = 6
STEP = timedelta(minutes=5)

# (handler, event type, how it fails); payloads are made per event
FAILURES = [
    (
        "CommentNotificationHandler",
        "comment.created",
        lambda n: ConnectionError("email service unavailable"),
    ),
    (
        "SocialStatisticsHandler",
        "like.added",
        lambda n: TimeoutError(f"connection timeout after 5000 ms (stats-{n % 3}.internal:6379)"),
    ),
    (
        "SearchIndexer",
        "post.published",
        lambda n: KeyError(f"post {4000 + n} not found in index 'posts-v2'"),
    ),
    (
        "PaymentWebhook",
        "order.paid",
        lambda n: PermanentError(f'invalid amount "{n % 7 - 3}.00" for order ord_{n:012x}'),
    ),
]


# the handlers' code as the tracebacks show it (a made-up service module)
SERVICE_FILE = "social/handlers.py"
SERVICE_SOURCE = """\
async def dispatch(handler, error):
    try:
        await HANDLERS[handler](error)
    except BaseException as exc:
        return exc


async def notify_comment_author(error):
    async with mailer.session() as smtp:
        await smtp.send(template="comment-notification", to=author_email(error))


async def count_like(error):
    await stats.increment("likes", fail_with=error)


async def index_post(error):
    document = await posts.load(fail_with=error)
    await search.index(document)


async def handle_payment(error):
    validate_amount(error)


def validate_amount(error):
    raise error


def author_email(error):
    raise error


class _Fails:
    def __getattr__(self, name):
        return self

    def __call__(self, *args, fail_with=None, **kwargs):
        return self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def __await__(self):
        if False:
            yield
        return self


mailer = stats = posts = search = _Fails()


async def send_comment_notification(event):
    await smtp_send(event.data["author"]["email"], template="comment-notification")


async def smtp_send(to, template):
    raise ConnectionError("email service unavailable")


async def _raise(error):
    raise error


async def _count(error):
    await _raise(error)


HANDLERS = {
    "CommentNotificationHandler": notify_comment_author,
    "SocialStatisticsHandler": _count,
    "SearchIndexer": _raise,
    "PaymentWebhook": handle_payment,
}
"""
_service: dict[str, Any] = {}
exec(compile(SERVICE_SOURCE, SERVICE_FILE, "exec"), _service)
linecache.cache[SERVICE_FILE] = (
    len(SERVICE_SOURCE),
    None,
    SERVICE_SOURCE.splitlines(True),
    SERVICE_FILE,
)


async def raised(handler: str, error: BaseException) -> BaseException:
    """``error`` as raised in the handler, so that it carries a traceback."""
    exc: BaseException = await _service["dispatch"](handler, error)
    return exc


def payload(event_type: str, n: int) -> dict[str, object]:
    if event_type == "comment.created":
        return {
            "comment_id": 91000 + n,
            "post_id": 700 + n % 40,
            "author": {"id": 3100 + n % 90, "email": f"user{n % 90}@example.com"},
            "text": "Great write-up, thanks!",
        }
    if event_type == "like.added":
        return {"post_id": 700 + n % 40, "user_id": 3100 + n % 90}
    if event_type == "post.published":
        return {
            "post_id": 4000 + n,
            "title": f"Release notes {n}",
            "tags": ["release", "changelog"],
        }
    return {"order_id": f"ord_{n:012x}", "amount": f"{n % 7 - 3}.00", "currency": "EUR"}


async def seed(store: Store) -> None:
    """Six hours in five-minute steps: failures arrive, some are retried away, some
    end in the dead letter queue, a few get reprocessed; a depth sample each step."""
    rng = random.Random(7)
    clock = ManualClock(datetime.now(UTC) - timedelta(hours=HOURS))
    bus = EventBus(store, clock=clock)
    for handler, event_type, _ in FAILURES:
        bus.subscribe(event_type, lambda event: None, name=handler)
    bus.unsubscribe("CommentNotificationHandler")  # the email service is still down
    bus.subscribe(
        "comment.created",
        _service["send_comment_notification"],
        name="CommentNotificationHandler",
    )
    history = DepthHistory(bus, interval=STEP.total_seconds())
    n = 0
    await store.connect()
    try:
        for step in range(int(timedelta(hours=HOURS) / STEP)):
            surge = 3 if 30 <= step < 44 else 1  # the email service went down for a while
            for _ in range(rng.randint(2, 5) * surge):
                n += 1
                handler, event_type, error = (
                    FAILURES[0] if surge > 1 and rng.random() < 0.7 else rng.choice(FAILURES)
                )
                event = Event(
                    event_type, payload(event_type, n), source="social-service", time=clock.now()
                )
                attempt = 1 if handler == "PaymentWebhook" else rng.randint(2, 3)
                failure = await raised(handler, error(n))
                item = await bus.retry_queue.add(event, handler, failure, attempt=attempt)
                roll = rng.random()
                if handler == "PaymentWebhook":
                    await bus.retry_queue.mark_failed(
                        item.id, reason="non-retryable: PermanentError"
                    )
                elif roll < 0.45:
                    await bus.retry_queue.mark_success(item.id)
                elif roll < 0.8 and step < 68:
                    await bus.retry_queue.mark_failed(
                        item.id, reason=f"failed after {attempt} retries"
                    )
            if step % 9 == 4:
                fixed = await bus.dead_letters.list(
                    3, 0, processed=False, handler_name="SearchIndexer"
                )
                for letter in fixed:
                    await bus.dead_letters.reprocess(letter.id, actor="alice")
            clock.advance(STEP.total_seconds())
            await history.record()
        # someone tried the newest email failure again: it failed again
        (newest,) = await bus.dead_letters.list(1, handler_name="CommentNotificationHandler")
        await bus.dead_letters.reprocess(newest.id, actor="alice")
    finally:
        if not store.url.startswith("memory"):
            await store.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(store: Store | str, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    app = create_app(store, tokens=TOKEN)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.05)
    return server, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store URL to seed (default: a new SQLite file)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    out = args.out.resolve()
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # so that the page's footer shows a short store URL
        store_url = args.store or "sqlite:///retrybus.db"
        store = open_store(store_url)
        asyncio.run(seed(store))
        port = free_port()
        # a memory store lives in this process: the server shares the object
        server, thread = serve(store if store_url.startswith("memory") else store_url, port)
        base = f"http://127.0.0.1:{port}"
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(
                    viewport={"width": 1440, "height": 900}, device_scale_factor=1
                )
                page.goto(f"{base}/login")
                page.fill("#token", TOKEN.split(":", 1)[1])
                page.click("button[type=submit]")
                page.goto(f"{base}/")
                page.screenshot(path=str(out / "dashboard-overview.png"), full_page=True)
                page.goto(f"{base}/dead-letters?handler=CommentNotificationHandler")
                page.click("table.rows tbody tr:first-child td:nth-child(3) a")
                page.wait_for_selector("#payload")
                page.screenshot(path=str(out / "dashboard-detail.png"), full_page=True)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            os.chdir(here)
    print(f"saved {out / 'dashboard-overview.png'} and {out / 'dashboard-detail.png'}")


if __name__ == "__main__":
    main()
