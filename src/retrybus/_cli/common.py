"""The options data commands share, and how a command fails.

Errors a user can cause (a bad URL, an unknown id, a store that cannot be
reached, a bad APP) end the command with one line on stderr and a non-zero
exit status, never a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from .._errors import RetrybusError
from .session import EXIT_FAILURE, CliError, error_line

T = TypeVar("T")

EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="RETRYBUS_STORE",
        metavar="URL",
        help="Store URL: sqlite:///path/to.db, postgresql://…, redis://…, mongodb://…/db or "
        "memory:// (default: the --app bus's store).",
        show_default=False,
    ),
]
AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar="RETRYBUS_APP",
        metavar="MODULE:ATTR",
        help="Your EventBus, as module:attribute (needed to call handlers).",
        show_default=False,
    ),
]
AppDirOption = Annotated[
    str,
    typer.Option(
        "--app-dir",
        metavar="DIR",
        help="Directory put first on sys.path to import the app from.",
    ),
]
OutboxOption = Annotated[
    str | None,
    typer.Option(
        "--outbox",
        envvar="RETRYBUS_OUTBOX",
        metavar="URL",
        help="Your application's database holding the retrybus_outbox table: "
        "postgresql://…[?schema=NAME] or sqlite:///path/to/app.db.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``Error: message`` as one line on stderr and exit with ``code``."""
    typer.echo(error_line(message), err=True)
    raise typer.Exit(code)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning the errors a user can cause into ``fail``."""
    try:
        return asyncio.run(main)
    except CliError as exc:
        fail(str(exc), exc.code)
    except RetrybusError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
