"""What the dashboard's tests share: seeding dead letters, a TestClient wrapper that
logs in and posts forms with their CSRF token, and the list of every POST endpoint."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from html import unescape
from pathlib import Path
from typing import Any, TypeVar

from starlette.testclient import TestClient

import retrybus
from retrybus import DeadLetterItem, Event, EventBus, ManualClock, Store
from retrybus.dashboard import create_app

T = TypeVar("T")

SECRET = "alice-secret-0123456789"
BOB_SECRET = "bob-secret-9876543210"
TOKENS = f"alice:{SECRET},bob:{BOB_SECRET}"
XSS = "<script>alert(1)</script>"
BASE = "http://testserver"

# every data-changing endpoint, as (path, form) with ids filled in by `post_targets`
# ({scheduled}: a scheduled delivery's, which a cancel would remove)
POST_ENDPOINTS = (
    "/login",
    "/logout",
    "/dead-letters/{id}/requeue",
    "/dead-letters/{id}/reprocess",
    "/dead-letters/{id}/delete",
    "/dead-letters/{id}/edit",
    "/dead-letters/selected",
    "/dead-letters/bulk",
    "/redrives/{redrive}/pause",
    "/redrives/{redrive}/resume",
    "/redrives/{redrive}/cancel",
    "/redrives/{redrive}/delete",
    "/retry-queue/{scheduled}/cancel",
    "/services/remove",
    "/breakers/isolate",
    "/breakers/reset",
)


def open_test_store(kind: str, tmp_path: Path) -> Store:
    """A fresh memory or SQLite store (not connected: the app connects it on its loop)."""
    if kind == "memory":
        return retrybus.open_store("memory://")
    return retrybus.open_store(f"sqlite:///{tmp_path / 'dashboard.db'}")


async def dead(
    bus: EventBus,
    n: int = 1,
    *,
    handler: str = "Mailer",
    event_type: str = "like.added",
    error: BaseException | str = "connection timeout",
    data: Any = None,
    metadata: dict[str, Any] | None = None,
) -> DeadLetterItem:
    """A dead letter made as a worker makes one: added to the retry queue, then failed."""
    payload = {"n": n} if data is None else data
    item = await bus.retry_queue.add(Event(event_type, payload, source="svc"), handler, error)
    letter = await bus.retry_queue.mark_failed(item)
    assert letter is not None
    if metadata is not None:
        letter = replace(letter, metadata=metadata)
        assert await bus.store.update_dead(letter)
    return letter


@dataclass
class Dash:
    """A running dashboard (TestClient inside its lifespan) and the bus it shows."""

    client: TestClient
    bus: EventBus
    clock: ManualClock
    prefix: str = ""

    def run(self, function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run a coroutine function on the app's event loop (where the store lives)."""

        async def call() -> T:
            return await function(*args, **kwargs)

        return self.client.portal.call(call)  # type: ignore[union-attr]

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(self.prefix + path, **kwargs)

    def login(self, secret: str = SECRET) -> None:
        page = self.get("/login")
        csrf = form_csrf(page.text)
        response = self.client.post(
            self.prefix + "/login",
            data={"token": secret, "csrf": csrf},
            headers={"origin": BASE},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text

    def csrf(self, path: str = "/") -> str:
        """A CSRF token of this session (the log-out form's, in the top bar)."""
        match = _CSRF.search(self.get(path).text)
        assert match is not None, "no form with a CSRF token on the page"
        return unescape(match.group(1))

    def post(
        self,
        path: str,
        data: dict[str, Any] | list[tuple[str, str]] | None = None,
        *,
        csrf: str | None = "auto",
        headers: dict[str, str] | None = None,
        follow: bool = False,
    ) -> Any:
        """POST a form as the browser would (same Origin, the page's CSRF token)."""
        fields: list[tuple[str, str]] = (
            list(data.items()) if isinstance(data, dict) else list(data or [])
        )
        if csrf == "auto":
            csrf = self.csrf()
        if csrf is not None:
            fields.append(("csrf", csrf))
        form: dict[str, list[str]] = {}
        for key, value in fields:
            form.setdefault(key, []).append(value)
        sent = {"origin": BASE, **(headers or {})}
        return self.client.post(
            self.prefix + path, data=form, headers=sent, follow_redirects=follow
        )

    def count(self, **where: Any) -> int:
        return self.run(self.bus.dead_letters.count, **where)


@contextmanager
def running(
    store: Store,
    *,
    tokens: Any = TOKENS,
    clock: ManualClock | None = None,
    handlers: bool = False,
    bus_metrics: Any = None,
    **options: Any,
) -> Iterator[Dash]:
    """A dashboard over ``store`` (without background work unless asked for);
    ``bus_metrics`` are the bus's ``metrics``."""
    clock = clock or ManualClock()
    bus = EventBus(store, clock=clock, metrics=bus_metrics)
    if handlers:
        bus.subscribe("*", lambda event: _maybe_fail(event), name="Mailer")
    options.setdefault("background", False)
    app = create_app(bus, tokens=tokens, **options)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        dash = Dash(client, bus, clock)
        try:
            yield dash
        finally:
            dash.run(bus.close)


def _maybe_fail(event: Event) -> None:
    if isinstance(event.data, dict) and event.data.get("fail"):
        raise ValueError(f"still failing: {event.data.get('n')}")


_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def form_csrf(html: str) -> str:
    """The CSRF token of the page's main form (on the log-in page: the log-in form's)."""
    start = html.find('<main class="page">')
    match = _CSRF.search(html, start if start >= 0 else 0)
    assert match is not None, "no form with a CSRF token on the page"
    return unescape(match.group(1))


_LINK = re.compile(r'(?:href|action|src)="([^"]*)"')
_HREF = re.compile(r'href="([^"]*)"')


def links(html: str) -> list[str]:
    """Every href, form action and src on a page (unescaped)."""
    return [unescape(link) for link in _LINK.findall(html)]


def hrefs(html: str) -> list[str]:
    """The links a person can follow on a page (unescaped)."""
    return [unescape(link) for link in _HREF.findall(html)]


# the real command: `retrybus dashboard` in a process of its own --------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """A ``retrybus dashboard`` process and what it printed."""

    process: subprocess.Popen[str]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve_cli(
    store_url: str, tmp_path: Path, *, token: str | None = TOKENS, extra: tuple[str, ...] = ()
) -> Iterator[Served]:
    """Run ``python -m retrybus dashboard --store URL`` on a free port until the
    block ends; yields once it answers HTTP."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RETRYBUS_DASHBOARD_TOKEN"}
    if token is not None:
        env["RETRYBUS_DASHBOARD_TOKEN"] = token
    log = tmp_path / f"dashboard-{port}.log"
    command = [sys.executable, "-m", "retrybus", "dashboard", "--store", store_url]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, text=True
        )
    served = Served(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"retrybus dashboard exited: {served.output()}")
            try:
                with urllib.request.urlopen(served.url + "/static/dashboard.css", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    message = f"retrybus dashboard did not answer: {served.output()}"
                    raise AssertionError(message) from None
                time.sleep(0.1)
        yield served
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
