"""``retrybus worker APP``: run a ``RetryWorker`` until SIGINT or SIGTERM.

The first signal stops it gracefully (in-flight handlers finish, claimed items
not yet started are released); a second one cancels the in-flight handlers,
whose items another worker takes once their lease runs out.

The worker parses its own options with ``argparse`` and imports neither Typer
nor Rich: Typer converts every option through pydantic, which alone would
take more memory than the whole worker otherwise needs. ``retrybus worker``
hands its arguments straight to ``main`` here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .._bus import EventBus
from .._errors import RetrybusError
from .._worker import RetryWorker
from .session import EXIT_USAGE, CliError, build_bus, error_line

__all__ = ["WorkerSettings", "configure_logging", "main", "serve"]

logger = logging.getLogger("retrybus.cli")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")
DESCRIPTION = """\
Run a retry worker for APP until SIGINT or SIGTERM, then stop gracefully: on
the first signal it stops claiming, lets running handlers finish and releases
the items it claimed but did not start; a second signal cancels running
handlers (their items are retried once their lease runs out)."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The worker's options as given on the command line."""

    check_interval: float = 10.0
    batch_size: int = 100
    concurrency: int = 16
    lease: float = 60.0
    shutdown_timeout: float | None = None
    name: str | None = None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def build_parser(prog: str = "retrybus worker") -> argparse.ArgumentParser:
    """The worker's command line."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("app", metavar="APP", help="your EventBus as module:attribute")
    parser.add_argument(
        "--store",
        metavar="URL",
        help="store URL replacing the bus's store (sqlite:///path/to.db); "
        "default: $RETRYBUS_STORE, else the bus's own store",
    )
    parser.add_argument(
        "--check-interval", type=_seconds, default=10.0, metavar="S", help="longest sleep (10)"
    )
    parser.add_argument(
        "--batch-size", type=_count, default=100, metavar="N", help="items claimed at once (100)"
    )
    parser.add_argument(
        "--concurrency", type=_count, default=16, metavar="N", help="handlers run at once (16)"
    )
    parser.add_argument(
        "--lease", type=_seconds, default=60.0, metavar="S", help="seconds a claim holds (60)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        metavar="S",
        help="on a signal, cancel handlers still running after S seconds (default: wait)",
    )
    parser.add_argument("--name", help="worker name in logs and leases (default host:pid:random)")
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info",
        help="logging level, to stderr (info)",
    )
    parser.add_argument(
        "--app-dir", default=".", metavar="DIR", help="directory put first on sys.path (.)"
    )
    return parser


def main(argv: Sequence[str], prog: str = "retrybus worker") -> int:
    """Parse ``argv``, run the worker until a signal, return the exit status."""
    args = build_parser(prog).parse_args(list(argv))
    configure_logging(args.log_level)
    settings = WorkerSettings(
        check_interval=args.check_interval,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        lease=args.lease,
        shutdown_timeout=args.shutdown_timeout,
        name=args.name,
    )
    store = args.store or os.environ.get("RETRYBUS_STORE") or None
    try:
        asyncio.run(serve(build_bus(store, args.app, args.app_dir), settings))
    except CliError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return exc.code
    except RetrybusError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 1
    return 0


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (``debug``, ``info``, ``warning``, ``error``)."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=LOG_FORMAT, force=True)


async def serve(bus: EventBus, settings: WorkerSettings) -> None:
    """Run a worker on ``bus`` until SIGINT or SIGTERM, then stop it gracefully."""
    if not bus.handler_names:
        raise CliError(
            "the APP's bus has no handlers subscribed: a worker would dead-letter every "
            "item as 'unknown handler'",
            EXIT_USAGE,
        )
    worker = RetryWorker(
        bus,
        check_interval=settings.check_interval,
        batch_size=settings.batch_size,
        concurrency=settings.concurrency,
        lease=settings.lease,
        name=settings.name,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []
    forced: set[asyncio.Task[None]] = set()  # keeps the task alive until it is done

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        if len(received) == 1:
            logger.info(
                "%s received: stopping after in-flight handlers finish (send it again to cancel them)",
                signum.name,
            )
            stopping.set()
        elif len(received) == 2:
            logger.warning(
                "%s received again: cancelling in-flight handlers; their items are retried "
                "once their lease (%gs) runs out",
                signum.name,
                worker.lease,
            )
            task = loop.create_task(worker.stop(timeout=0))
            forced.add(task)
            task.add_done_callback(forced.discard)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.start()
        logger.info("serving handlers: %s", ", ".join(bus.handler_names))
        await stopping.wait()
        # A second signal cancels the worker's loop, which ends this stop() early.
        with contextlib.suppress(asyncio.CancelledError):
            await worker.stop(timeout=settings.shutdown_timeout)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await bus.close()
