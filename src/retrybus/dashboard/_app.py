"""Building the dashboard's Starlette app: routes, background work, error pages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._bus import EventBus
from .._errors import AppNotFound, ItemBusy, RetrybusError, StoreUnavailable
from .._history import DEFAULT_INTERVAL, DepthHistory
from .._stores import Store, open_store
from . import _actions, _breakers_page, _metrics, _pages, _services_page
from ._auth import DEFAULT_SESSION_MAX_AGE, SESSION_COOKIE, Auth, TokenSpec
from ._login_limit import LoginLimiter
from ._metrics import attach_metrics
from ._pages import ACTIONS
from ._sessions import Revocations
from ._web import Dashboard, HTTPError, error_page

__all__ = ["build_app"]

log = logging.getLogger("retrybus.dashboard")

STATIC = Path(__file__).parent / "static"
# no inline scripts or styles, nothing from elsewhere, never framed (clickjacking)
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
# how long background work waits after a failure (the store was unreachable) before trying again
RETRY_PAUSE = 5.0


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response of the dashboard."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class FreshSessions:
    """Before a request with a session cookie, asks the store whether the session
    was logged out elsewhere, unless it asked a moment ago (``_sessions.FRESH_FOR``),
    so that pages stop offering forms to a revoked session without a store read
    per page view. Data-changing requests ask again, uncached."""

    def __init__(self, app: ASGIApp, auth: Auth, revocations: Revocations) -> None:
        self.app = app
        self.auth = auth
        self.revocations = revocations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            cookie = Request(scope).cookies.get(SESSION_COOKIE, "")
            session = self.auth.session(cookie) if cookie else None
            if session is not None:
                try:
                    await self.revocations.refresh(session.id)
                except RetrybusError as exc:  # the page itself shows the outage
                    log.warning("could not check whether a session was logged out: %s", exc)
        await self.app(scope, receive, send)


def _resolve_bus(
    bus_or_store_url: EventBus | Store | str | None, app: EventBus | str | None, app_dir: str
) -> tuple[EventBus, bool]:
    """The bus to show, and whether the dashboard owns it (and closes its store)."""
    if isinstance(app, str):
        from .._loading import load_bus

        try:
            loaded = load_bus(app, app_dir)
        except AppNotFound as exc:
            raise ValueError(str(exc)) from None
        if isinstance(bus_or_store_url, str):
            loaded.use_store(open_store(bus_or_store_url))
        elif isinstance(bus_or_store_url, Store):
            loaded.use_store(bus_or_store_url)
        elif bus_or_store_url is not None:
            raise TypeError("give either a bus or app=, not both")
        return loaded, True
    if isinstance(bus_or_store_url, EventBus):
        if app is not None:
            raise TypeError("give either a bus or app=, not both")
        return bus_or_store_url, False
    base = app if isinstance(app, EventBus) else None
    if isinstance(bus_or_store_url, str):
        store = open_store(bus_or_store_url)
    elif isinstance(bus_or_store_url, Store):
        store = bus_or_store_url
    elif bus_or_store_url is None and base is not None:
        return base, False
    else:
        raise TypeError(
            "create_app needs an EventBus, a Store or a store URL, "
            f"got {type(bus_or_store_url).__name__}"
        )
    if base is None:
        return EventBus(store), True
    base.use_store(store)
    return base, True


async def _keep_running(
    name: str, work: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Run ``work`` until ``stop``; when it fails (a store outage), log it and start again."""
    while not stop.is_set():
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dashboard %s failed; trying again in %.0f s", name, RETRY_PAUSE)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RETRY_PAUSE)


def build_app(
    bus_or_store_url: EventBus | Store | str | None,
    *,
    tokens: TokenSpec = None,
    app: EventBus | str | None = None,
    app_dir: str = ".",
    background: bool = True,
    history_interval: float = DEFAULT_INTERVAL,
    redrive_interval: float = 0.5,
    session_max_age: int = DEFAULT_SESSION_MAX_AGE,
    trusted_origins: Iterable[str] = (),
    allowed_hosts: Iterable[str] | None = None,
    title: str = "retrybus",
    metrics: bool = True,
    owns_bus: bool | None = None,
) -> Starlette:
    """``create_app``; ``owns_bus`` says whether to close the bus's store at shutdown
    (default: when the dashboard opened it)."""
    bus, opened = _resolve_bus(bus_or_store_url, app, app_dir)
    owns_bus = opened if owns_bus is None else owns_bus
    revocations = Revocations(bus.store)
    auth = Auth(
        tokens,
        session_max_age=session_max_age,
        trusted_origins=trusted_origins,
        revocations=revocations,
    )
    history = DepthHistory(bus, interval=history_interval)
    dashboard = Dashboard(
        bus=bus,
        auth=auth,
        owns_bus=owns_bus,
        title=title,
        history_interval=history.interval,
        revocations=revocations,
        login_limiter=LoginLimiter(lambda: bus.clock.now().timestamp()),
    )
    if metrics:
        dashboard.metrics = attach_metrics(bus)

    async def record_depth() -> None:
        while True:
            await history.record()
            await asyncio.sleep(history.interval)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        if background:
            tasks = [
                asyncio.create_task(_keep_running("depth sampling", record_depth, stop)),
                asyncio.create_task(
                    _keep_running(
                        "redrive runner",
                        lambda: bus.redrives.run_all(interval=redrive_interval, stop=stop),
                        stop,
                    )
                ),
            ]
            dashboard.runner_active = True
        try:
            yield
        finally:
            dashboard.runner_active = False
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if owns_bus:
                await bus.close()

    routes = [
        Route("/", _pages.overview, name="overview"),
        Route("/dead-letters", _pages.dead_letters, name="dead_letters"),
        Route("/dead-letters/bulk", _pages.bulk_confirm, name="bulk_confirm"),
        Route("/dead-letters/bulk", _actions.bulk, methods=["POST"], name="bulk"),
        Route("/dead-letters/selected", _actions.selected, methods=["POST"], name="selected"),
        Route("/dead-letters/{item_id}", _pages.dead_letter, name="dead_letter"),
        Route(
            "/dead-letters/{item_id}/payload.json",
            _pages.dead_letter_payload,
            name="dead_letter_payload",
        ),
        Route("/dead-letters/{item_id}/edit", _actions.edit, methods=["POST"], name="edit"),
        # one route per action, none taking any word after an id: an id holding a "/"
        # finds no route (404) instead of a POST-only one (405)
        *(
            Route(
                f"/dead-letters/{{item_id}}/{action}",
                _actions.item_action(action),
                methods=["POST"],
                name=f"dead_letter_{action}",
            )
            for action in ACTIONS
        ),
        Route("/groups", _pages.groups, name="groups"),
        Route("/retry-queue", _pages.retry_queue, name="retry_queue"),
        Route("/retry-queue/{item_id}", _pages.retry_item, name="retry_item"),
        Route(
            "/retry-queue/{item_id}/cancel",
            _actions.cancel_delivery,
            methods=["POST"],
            name="cancel_delivery",
        ),
        Route("/retry-queue/{item_id}/payload.json", _pages.retry_payload, name="retry_payload"),
        Route("/services", _services_page.services, name="services"),
        Route(
            "/services/remove",
            _services_page.remove_subscription,
            methods=["POST"],
            name="remove_subscription",
        ),
        Route("/breakers", _breakers_page.breakers, name="breakers"),
        Route(
            "/breakers/isolate", _breakers_page.isolate, methods=["POST"], name="breaker_isolate"
        ),
        Route("/breakers/reset", _breakers_page.reset, methods=["POST"], name="breaker_reset"),
        Route("/redrives", _pages.redrives, name="redrives"),
        Route("/redrives/{redrive_id}", _pages.redrive, name="redrive"),
        *(
            Route(
                f"/redrives/{{redrive_id}}/{action}",
                _actions.redrive_action(action),
                methods=["POST"],
                name=f"redrive_{action}",
            )
            for action in _actions.REDRIVE_ACTIONS
        ),
        Route("/metrics", _metrics.metrics, name="metrics"),
        Route("/favicon.ico", _pages.favicon, name="favicon"),
        Route("/login", _actions.login_form, name="login_form"),
        Route("/login", _actions.login, methods=["POST"], name="login"),
        Route("/logout", _actions.logout, methods=["POST"], name="logout"),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error_page(request, exc)

    async def starlette_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        titles = {404: "Not found", 405: "Method not allowed"}
        title = titles.get(exc.status_code, "Error")
        detail = (
            f"nothing here at {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        )
        return error_page(request, HTTPError(exc.status_code, title, detail))

    async def store_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ItemBusy):  # being reprocessed elsewhere right now
            return error_page(request, HTTPError(409, "Busy", str(exc)))
        status = 503 if isinstance(exc, StoreUnavailable) else 500
        title = "The store is unavailable" if status == 503 else "Something went wrong"
        return error_page(request, HTTPError(status, title, str(exc)))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("dashboard error on %s %s", request.method, request.url.path)
        return error_page(
            request,
            HTTPError(500, "Something went wrong", "the error is in the dashboard's log"),
        )

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPError: http_error,
        HTTPException: starlette_error,
        RetrybusError: store_error,
        Exception: unexpected,
    }
    starlette = Starlette(
        routes=routes,
        middleware=[
            # first: a request for another Host (DNS rebinding) is refused at once
            *(
                [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
                if allowed_hosts is not None
                else []
            ),
            Middleware(SecurityHeaders),
            *([] if auth.read_only else [Middleware(FreshSessions, auth, revocations)]),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    starlette.state.dashboard = dashboard
    return starlette
