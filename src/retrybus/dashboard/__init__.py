"""The retrybus web dashboard: an ASGI app (Starlette) to watch the queues and act
on dead letters. Install it with ``pip install "retrybus[dashboard]"``.

Run it on its own with ``retrybus dashboard --store URL``, or build it with
``create_app`` and serve or mount it yourself.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"the retrybus dashboard needs {exc.name}: pip install 'retrybus[dashboard]'"
    ) from exc

from starlette.applications import Starlette

from .._bus import EventBus
from .._history import DEFAULT_INTERVAL
from .._stores import Store
from ._app import build_app
from ._auth import DEFAULT_SESSION_MAX_AGE, TokenSpec, parse_tokens

__all__ = ["TOKEN_ENV", "background", "create_app", "parse_tokens"]

#: the environment variable ``retrybus dashboard`` reads its tokens from
TOKEN_ENV = "RETRYBUS_DASHBOARD_TOKEN"


def create_app(
    bus_or_store_url: EventBus | Store | str | None = None,
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
) -> Starlette:
    """The dashboard as a Starlette (ASGI) app.

    ``bus_or_store_url``: your ``EventBus`` (its handlers make *reprocess*
    possible), a ``Store``, or a store URL such as ``"sqlite:///retrybus.db"``.
    ``app``: your bus as ``"module:attribute"`` (or an ``EventBus``) when
    the first argument is only the store to use with it.

    ``tokens``: who may change data, as ``"alice:s3cret,bob:t0ken"`` (a bare
    secret is named ``admin``), a list of such entries or a ``{name: secret}``
    mapping. Without any token the dashboard is read-only: it shows no action
    forms and refuses every data-changing request (403).

    While the app runs (its lifespan), it records a queue depth sample every
    ``history_interval`` seconds and drives the redrives started from its pages
    (``background=False`` turns both off). ``trusted_origins`` lists other
    origins, scheme included (``"https://ops.example.com"``), whose forms may
    post to it, for a proxy that changes the Host header or serves HTTPS to a
    dashboard that sees plain HTTP (``http://`` and ``https://`` are different
    origins). Logging out ends the session everywhere (revoked in the store,
    for every dashboard on it); ``/login`` allows 10 failed attempts a minute per
    client address. ``allowed_hosts`` (e.g. ``["ops.example.com",
    "127.0.0.1"]``) refuses requests naming any other Host, against DNS rebinding;
    None answers to every Host, as suits a dashboard mounted in an app that checks
    Host itself (``retrybus dashboard`` sets it).

    ``/metrics`` serves the bus's Prometheus metrics (with ``retrybus[prometheus]``
    installed; a bus without metrics gets ``PrometheusMetrics()`` on the default
    registry, so the DLQ actions taken here are counted too); ``metrics=False``
    leaves the bus alone and answers 404 there.

    Served on its own::

        import uvicorn
        from retrybus.dashboard import create_app

        uvicorn.run(create_app("sqlite:///retrybus.db", tokens="alice:s3cret"), port=8000)

    Mounted in a Starlette app (links and forms work under the prefix); a
    mounted app's lifespan does not run by itself, so enter it from yours::

        from contextlib import asynccontextmanager
        from starlette.applications import Starlette
        from starlette.routing import Mount
        from retrybus.dashboard import background, create_app

        dashboard = create_app(bus, tokens=os.environ["RETRYBUS_DASHBOARD_TOKEN"])

        @asynccontextmanager
        async def lifespan(app):
            async with background(dashboard):
                yield

        app = Starlette(routes=[Mount("/ops/retrybus", app=dashboard)], lifespan=lifespan)

    In FastAPI the same: ``api = FastAPI(lifespan=lifespan)`` and
    ``api.mount("/ops/retrybus", dashboard)``.
    """
    return build_app(
        bus_or_store_url,
        tokens=tokens,
        app=app,
        app_dir=app_dir,
        background=background,
        history_interval=history_interval,
        redrive_interval=redrive_interval,
        session_max_age=session_max_age,
        trusted_origins=trusted_origins,
        allowed_hosts=allowed_hosts,
        title=title,
        metrics=metrics,
    )


@contextlib.asynccontextmanager
async def background(dashboard: Starlette) -> AsyncIterator[None]:
    """Run a mounted dashboard's lifespan (depth samples, redrives; closing the
    store it opened) inside the lifespan of the app it is mounted in."""
    async with dashboard.router.lifespan_context(dashboard):
        yield
