"""What every page and action shares: the dashboard's state, rendering, links
(under any mount prefix), flash messages and error pages."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from .._bus import EventBus
from .._history import DEFAULT_INTERVAL
from .._services import is_service_name

if TYPE_CHECKING:
    from ..prometheus import PrometheusMetrics
from ._auth import Auth, Identity
from ._chart import bar
from ._display import clip, human_size, preview, public_type_name
from ._login_limit import LoginLimiter
from ._sessions import Revocations
from ._versions import item_version

__all__ = [
    "SERVICE_KEY",
    "Dashboard",
    "HTTPError",
    "flash",
    "link",
    "redirect",
    "render",
    "state",
]

TEMPLATES = Path(__file__).parent / "templates"
FLASH_COOKIE = "retrybus_flash"
#: the query key naming the service a page shows (none: all services)
SERVICE_KEY = "service"
#: paths whose links never carry the service shown (files, not pages)
UNSCOPED = ("/static/", "/favicon.ico")


class HTTPError(Exception):
    """A request the dashboard refuses, shown as an error page with this status."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})


@dataclass
class Dashboard:
    """What the app's handlers need, kept on ``app.state.dashboard``."""

    bus: EventBus
    auth: Auth
    owns_bus: bool
    title: str = "retrybus"
    runner_active: bool = False
    #: how often depth samples are recorded (the chart shows longer gaps between them)
    history_interval: float = DEFAULT_INTERVAL
    metrics: PrometheusMetrics | None = None
    metrics_read_at: float = float("-inf")
    #: the /metrics refresh lock, and (weakly) the event loop it serves
    metrics_lock: tuple[weakref.ref[asyncio.AbstractEventLoop], asyncio.Lock] | None = None
    flash_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    #: the sessions revoked by logging out (None: nothing is revocable, as without a store)
    revocations: Revocations | None = None
    #: failed log-ins per client (None: not limited)
    login_limiter: LoginLimiter | None = None
    env: jinja2.Environment = field(init=False)

    def __post_init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            when=when,
            ago=lambda moment: ago(moment, self.bus.clock.now()),
            duration=duration,
            pretty=pretty_json,
            number=lambda n: "—" if n is None else f"{n:,}",
            percent=lambda f: "—" if f is None else f"{f * 100:.1f} %",
            reject_key=lambda pairs, key: {k: v for k, v in pairs.items() if k != key},
            short_type=lambda name: (name or "Error").rsplit(".", 1)[-1],
            type_name=public_type_name,
            preview=preview,
            clip=clip,
            size=human_size,
        )
        self.env.globals["bar"] = lambda fraction: Markup(bar(fraction))
        self.env.globals["version_of"] = lambda item: item_version(self.bus.core.types, item)

    @property
    def reprocess_disabled(self) -> str:
        """Why reprocessing is impossible here ('' when it is possible)."""
        if self.bus.handler_names:
            return ""
        return (
            "Reprocess calls the handlers, and this dashboard has none: "
            "start it with --app MODULE:ATTR (your EventBus)."
        )


def state(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


def root(request: Request) -> str:
    """The mount prefix (``""`` at the top level)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def link(request: Request, path: str, query: Mapping[str, Any] | None = None) -> str:
    """A URL of this dashboard, under whatever prefix it is mounted at. A page
    shown for one service (``?service=``) links to pages of that service too,
    unless ``query`` names a ``service`` itself (``""``: all services)."""
    url = root(request) + path
    query = dict(query or {})
    if SERVICE_KEY not in query and not path.startswith(UNSCOPED):
        shown = request.query_params.get(SERVICE_KEY, "").strip()
        # a bad name is refused by its page: not passed on
        if is_service_name(shown):
            query[SERVICE_KEY] = shown
    if query:
        pairs = {k: str(v) for k, v in query.items() if v is not None and str(v) != ""}
        if pairs:
            url += "?" + urlencode(pairs)
    return url


def redirect(request: Request, path: str, query: Mapping[str, Any] | None = None) -> Response:
    return RedirectResponse(link(request, path, query), status_code=303)


# rendering --------------------------------------------------------------------


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status: int = 200,
    identity: Identity | None = None,
) -> Response:
    """Render a page with what every page shows (navigation, login state, banner)."""
    dashboard = state(request)
    auth = dashboard.auth
    if identity is None:
        identity = auth.identify(request)
    message = read_flash(request)

    def url(path: str, query: Mapping[str, Any] | None = None, **params: Any) -> str:
        return link(request, path, {**(query or {}), **params})

    values = {
        "request": request,
        "title": dashboard.title,
        "store_url": dashboard.bus.store.url,
        "read_only": auth.read_only,
        "identity": identity,
        "can_act": identity is not None,
        "csrf": auth.csrf_token(identity),
        "url": url,
        "root": root(request),
        "here": request.url.path,
        "flash": message,
        "reprocess_disabled": dashboard.reprocess_disabled,
        "runner_active": dashboard.runner_active,
        "now": dashboard.bus.clock.now(),
        **(context or {}),
    }
    html = dashboard.env.get_template(template).render(values)
    response = HTMLResponse(html, status_code=status)
    if message is not None:
        response.delete_cookie(FLASH_COOKIE, path=root(request) or "/")
    return response


def error_page(request: Request, error: HTTPError) -> Response:
    response = render(
        request,
        "error.html",
        {"status": error.status, "heading": error.title, "detail": error.detail},
        status=error.status,
    )
    response.headers.update(error.headers)
    return response


# flash messages: one message carried over a redirect, in a signed cookie ---------


def flash(request: Request, response: Response, kind: str, text: str) -> Response:
    body = base64.urlsafe_b64encode(json.dumps([kind, text]).encode()).decode()
    mac = hmac.new(state(request).flash_key, body.encode(), hashlib.sha256).hexdigest()[:32]
    response.set_cookie(
        FLASH_COOKIE,
        f"{body}.{mac}",
        max_age=60,
        path=root(request) or "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


def read_flash(request: Request) -> tuple[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw or "." not in raw:
        return None
    body, mac = raw.rsplit(".", 1)
    expected = hmac.new(state(request).flash_key, body.encode(), hashlib.sha256).hexdigest()[:32]
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        kind, text = json.loads(base64.urlsafe_b64decode(body.encode()))
    except (ValueError, TypeError):
        return None
    return str(kind), str(text)


# formatting -------------------------------------------------------------------


def when(moment: datetime | None) -> str:
    """A time as ``2026-05-01 10:00:03 UTC``."""
    if moment is None:
        return "—"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(moment: datetime | None, now: datetime) -> str:
    """How long ago (or how soon) ``moment`` is: ``3 min ago``, ``in 20 s``."""
    if moment is None:
        return "—"
    delta = now - moment
    future = delta < timedelta(0)
    seconds = abs(delta.total_seconds())
    if seconds < 1:
        return "now"
    text = duration(seconds)
    return f"in {text}" if future else f"{text} ago"


def duration(seconds: float) -> str:
    """A length of time in its largest whole unit: ``3 min``, ``20 s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return "under a second"


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
