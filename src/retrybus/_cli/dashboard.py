"""``retrybus dashboard``: serve the web dashboard with uvicorn."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

from .._errors import RetrybusError
from .common import AppDirOption, AppOption, OutboxOption, StoreOption, fail
from .session import EXIT_USAGE, CliError, _require_existing_file, build_bus

__all__ = ["dashboard"]

TOKEN_ENV = "RETRYBUS_DASHBOARD_TOKEN"
MIN_SECRET = 16


async def _check_store(url: str) -> None:
    # open and close once here, so that an unreachable store is one line, not a
    # traceback from inside uvicorn's start-up; the app reconnects on its own loop
    from .._stores import open_store

    store = open_store(url)
    try:
        await store.connect()
    finally:
        await store.close()


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_ANY_ADDRESS = ("0.0.0.0", "::", "")


def _allowed_hosts(host: str, given: list[str]) -> list[str]:
    """The Host names to answer to: those given, else the address listened on (with
    its loopback names), else any when listening on every address."""
    if given:
        return given
    if host in _ANY_ADDRESS:
        return ["*"]
    if host in _LOOPBACK:
        return list(_LOOPBACK)
    return [host]


def dashboard(
    store: StoreOption = None,
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=1, max=65535, metavar="PORT", help="Port to listen on.")
    ] = 8000,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
    outbox: OutboxOption = None,
    root_path: Annotated[
        str,
        typer.Option(
            metavar="PREFIX",
            help="The prefix a reverse proxy serves the dashboard under (/ops/retrybus).",
        ),
    ] = "",
    log_level: Annotated[str, typer.Option(metavar="LEVEL", help="uvicorn's log level.")] = "info",
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="A Host name the dashboard answers to (repeatable; default: the address it "
            "listens on, and localhost when that is a loopback address). Others are refused, "
            "against DNS rebinding.",
            show_default=False,
        ),
    ] = None,
    trusted_origins: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-origin",
            metavar="URL",
            help="Another origin whose forms may post, scheme included "
            "(https://ops.example.com), for a proxy that rewrites the Host header or "
            "serves HTTPS without X-Forwarded-Proto (repeatable).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the web dashboard: queue depth, dead letters, failure groups, redrives.

    Changing data needs a token: set RETRYBUS_DASHBOARD_TOKEN to one or more
    comma-separated `name:secret` entries (a bare secret is named admin). Without
    one the dashboard is read-only. `--app` (your EventBus) makes reprocessing possible.
    """
    try:
        import uvicorn

        from ..dashboard._app import build_app
        from ..dashboard._auth import parse_tokens
    except ImportError as exc:
        fail(f"the dashboard needs {exc.name}: pip install 'retrybus[dashboard]'", EXIT_USAGE)
    try:
        tokens = parse_tokens(os.environ.get(TOKEN_ENV))
    except ValueError as exc:
        fail(f"{TOKEN_ENV}: {exc}", EXIT_USAGE)
    try:
        bus = build_bus(store, app, app_dir)
        _require_existing_file(bus.store)
        if outbox is not None:
            try:
                bus.outbox.use(outbox)
            except ValueError as exc:
                raise CliError(f"--outbox: {exc}", EXIT_USAGE) from None
        if store is not None:
            asyncio.run(_check_store(store))
    except CliError as exc:
        fail(str(exc), exc.code)
    except (RetrybusError, OSError) as exc:  # StoreUnavailable and the like: one line
        fail(str(exc))
    hosts = _allowed_hosts(host, allowed_hosts or [])
    if hosts == ["*"]:
        typer.echo(
            f"warning: listening on {host} and answering to any Host name; give --allowed-host "
            "NAME for the names it is reached by",
            err=True,
        )
    try:
        web = build_app(
            bus,
            tokens=tokens,
            owns_bus=True,
            allowed_hosts=hosts,
            trusted_origins=trusted_origins or (),
        )
    except ValueError as exc:  # a --trusted-origin without scheme or host
        fail(f"--trusted-origin: {exc}", EXIT_USAGE)
    shown_host = f"[{host}]" if ":" in host else host
    behind = f" (links under {root_path.rstrip('/')}/, for a proxy)" if root_path.strip("/") else ""
    typer.echo(f"retrybus dashboard on http://{shown_host}:{port}/{behind}")
    typer.echo(f"store: {bus.store.url}")
    if tokens:
        typer.echo(f"tokens: {', '.join(sorted(tokens))} (log in with a token's secret)")
        for name, secret in sorted(tokens.items()):
            if len(secret) < MIN_SECRET:
                typer.echo(
                    f"warning: the secret of token {name!r} is shorter than {MIN_SECRET} "
                    "characters; use a long random one (python -c 'import secrets; "
                    "print(secrets.token_urlsafe(24))')",
                    err=True,
                )
    else:
        typer.echo(f"read-only: {TOKEN_ENV} is not set, nothing can be changed")
    if not bus.handler_names:
        typer.echo("reprocess is off: no --app, so no handlers to call")
    uvicorn.run(web, host=host, port=port, root_path=root_path, log_level=log_level)
