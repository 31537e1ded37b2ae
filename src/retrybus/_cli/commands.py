"""The ``retrybus`` Typer app: its root, ``demo`` and ``worker``; ``breakers``, ``dlq``,
``events``, ``queue``, ``services``, ``stats`` and ``transport`` come from their own modules.

The demo (and Rich with it) is imported only when ``retrybus demo`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from .breakers import breakers_app
from .common import fail, run
from .dashboard import dashboard
from .dlq import dlq_app
from .events import events_app
from .migrate import migrate
from .queue import queue_app, stats
from .relay import relay
from .services import services_app
from .session import EXIT_USAGE
from .transport import transport_app
from .typer_help import RetrybusTyper

__all__ = ["app"]

app = RetrybusTyper(
    name="retrybus",
    help="Retry failed event handlers from a durable queue; inspect and act on dead letters.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(breakers_app)
app.add_typer(dlq_app)
app.add_typer(events_app)
app.add_typer(queue_app)
app.add_typer(services_app)
app.add_typer(transport_app)
app.command("stats")(stats)
app.command("migrate")(migrate)
app.command("relay")(relay)
app.command("dashboard")(dashboard)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"retrybus {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Retry failed event handlers from a durable queue; inspect and act on dead letters."""


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def worker(ctx: typer.Context) -> None:
    """Run a retry worker for APP until SIGINT or SIGTERM (see `retrybus worker --help`)."""
    # ``retrybus worker`` reaches the worker's parser from ``app.main`` without
    # Typer (see there); this command lists it in the help and serves CliRunner.
    from .worker import main as worker_main

    raise typer.Exit(worker_main(ctx.args))


@app.command()
def demo(
    db: Annotated[
        Path,
        typer.Option(metavar="PATH", help="SQLite file to (re)create and leave for inspection."),
    ] = Path("retrybus-demo.db"),
    events: Annotated[
        int,
        typer.Option(
            min=1, metavar="N", help="How many likes and comments the social service publishes."
        ),
    ] = 3000,
    rate: Annotated[
        float,
        typer.Option(
            min=0, metavar="N", help="Events published per second (0: as fast as possible)."
        ),
    ] = 1000.0,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the simulated failures.")] = 7,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Live progress display (default: when stdout is a terminal).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1, metavar="S", help="Give up waiting for retries after S seconds.")
    ] = 120.0,
) -> None:
    """Run two simulated services exchanging events, whose handlers fail now and then.

    The social service publishes likes and comments to its handlers, of which some
    time out (and succeed on a retry); the comments also reach the notifications
    service, whose emails fail for good now and then (and end in the dead letter
    queue), and each email sent comes back to social as `notification.sent`. Each
    service has its own worker on the one SQLite file, left for `retrybus services`,
    `retrybus stats` and `retrybus dlq list`.
    """
    from .demo import DemoSettings, run_demo

    if "?" in str(db) or "#" in str(db):
        fail(f"--db {str(db)!r}: the path may not contain '?' or '#'", EXIT_USAGE)
    settings = DemoSettings(
        db=db, events=events, rate=rate, seed=seed, progress=progress, timeout=timeout
    )
    if not run(run_demo(settings)):
        raise typer.Exit(1)
