"""Opening the bus a command works on, and the errors a user can cause.

Nothing here imports Typer or Rich: ``retrybus worker`` uses it too, and the
worker must stay small.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .._bus import EventBus
from .._errors import AppNotFound, StoreUnavailable
from .._stores import Store, open_store

if TYPE_CHECKING:
    from .._transports.base import Transport

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "CliError",
    "build_bus",
    "connected_bus",
    "error_line",
    "open_store_url",
    "open_transport_url",
    "use_transport_url",
]

#: exit status for a failure at run time (unknown id, store unavailable, ...)
EXIT_FAILURE = 1
#: exit status for a bad argument (a malformed URL or APP), as for usage errors
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one line on stderr, ending the command with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def error_line(message: str) -> str:
    """``Error: message`` on one line."""
    return "Error: " + " ".join(message.split())


def open_store_url(url: str) -> Store:
    """``open_store(url)``, with a malformed or unknown URL reported as a usage error."""
    try:
        return open_store(url)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _require_existing_file(store: Store) -> None:
    # ``sqlite:///typo.db`` would otherwise create an empty database and show
    # nothing; commands that inspect or act on queues need one that exists.
    path: str | None = getattr(store, "path", None)
    if path and path != ":memory:" and not Path(path).exists():
        raise StoreUnavailable(f"cannot open SQLite store {store.url}: no database file at {path}")


def build_bus(store_url: str | None, app: str | None, app_dir: str = ".") -> EventBus:
    """The bus a command works on: the ``--app`` bus (its store replaced by
    ``--store`` when given), or a bare bus on the ``--store`` store."""
    if app is None and store_url is None:
        raise CliError("give --store URL (or --app MODULE:ATTR, or set RETRYBUS_STORE)", EXIT_USAGE)
    store = open_store_url(store_url) if store_url is not None else None
    if app is None:
        assert store is not None
        return EventBus(store)
    from .._loading import load_bus

    try:
        bus = load_bus(app, app_dir)
    except AppNotFound as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if store is not None:
        bus.use_store(store)
    return bus


@asynccontextmanager
async def connected_bus(
    store_url: str | None, app: str | None = None, app_dir: str = "."
) -> AsyncIterator[EventBus]:
    """A bus whose store is connected (and must already exist), closed afterwards."""
    bus = build_bus(store_url, app, app_dir)
    _require_existing_file(bus.store)
    try:
        await bus.store.connect()
        yield bus
    finally:
        await bus.close()


def open_transport_url(url: str, source: str = "--transport") -> Transport:
    """``open_transport(url)``, with a malformed URL, an unknown kind or a client
    library not installed reported as a usage error naming ``source`` (the
    option, argument or variable that gave it) and the URL, its password hidden."""
    from .._stores._url import redact
    from .._transports import open_transport

    try:
        return open_transport(url)
    except (ValueError, ImportError) as exc:
        message = str(exc)
        shown = redact(url)
        named = source if shown in message else f"{source} {shown!r}"
        raise CliError(f"{named}: {message}", EXIT_USAGE) from None


def use_transport_url(bus: EventBus, url: str, source: str = "--transport") -> None:
    """Carry ``bus``'s first deliveries on the broker ``url`` names
    (``bus.use_transport(open_transport_url(url, source))``); a usage error as
    there, and when the bus cannot take a transport (``durable=False``)."""
    transport = open_transport_url(url, source)
    try:
        bus.use_transport(transport)
    except ValueError as exc:
        raise CliError(f"{source} {transport.url!r}: {exc}", EXIT_USAGE) from None
