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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._budget import RetryBudget
from .._bus import EventBus
from .._errors import RetrybusError
from .._stores._url import redact
from .._worker import RetryWorker
from .session import EXIT_USAGE, CliError, build_bus, error_line, use_transport_url

__all__ = ["WorkerSettings", "configure_logging", "main", "serve"]

logger = logging.getLogger("retrybus.cli")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
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
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    tracing: bool = False
    fail_fast: bool = False
    handler_timeout: float | None = None
    heartbeat_interval: float = 10.0
    #: messages the broker's consumer handles at once (None: ``concurrency``)
    prefetch: int | None = None
    #: relay the bus's outbox table (when it has one)
    relay: bool = True
    #: drive the active redrives the worker can drive
    redrives: bool = True
    #: the budget the handlers' retries are kept within (None: none)
    retry_budget: RetryBudget | None = None


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


def _budget(text: str) -> RetryBudget:
    """``PERCENT[,MIN_PER_SECOND[,WINDOW]]`` as a ``RetryBudget``."""
    parts = text.split(",")
    try:
        if len(parts) > 3:
            raise ValueError("at most three numbers")
        numbers = [float(part) for part in parts]
        return RetryBudget(*numbers)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"expected PERCENT[,MIN_PER_SECOND[,WINDOW]], got {text!r}: {exc}"
        ) from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {text!r}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, given the terminal's width as ``shutil.get_terminal_size``
    reads it: argparse makes a formatter for every option it adds, and its own
    lookup imports shutil, bz2 and lzma, half a megabyte in every worker."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                width = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                width = 80
        super().__init__(prog, width=max(width - 2, 11))


def build_parser(prog: str = "retrybus worker") -> argparse.ArgumentParser:
    """The worker's command line."""
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=_HelpFormatter
    )
    parser.add_argument("app", metavar="APP", help="your EventBus as module:attribute")
    parser.add_argument(
        "--store",
        metavar="URL",
        help="store URL replacing the bus's store (sqlite:///path/to.db); "
        "default: $RETRYBUS_STORE, else the bus's own store",
    )
    parser.add_argument(
        "--transport",
        metavar="URL",
        help="broker carrying first deliveries (redis://…, amqp://…, nats://…, memory://); "
        "default: $RETRYBUS_TRANSPORT, else the bus's own transport, else none",
    )
    parser.add_argument(
        "--outbox",
        metavar="URL",
        help="your application's database whose retrybus_outbox table the worker relays "
        "(postgresql://…, sqlite:///…); default: $RETRYBUS_OUTBOX, else the bus's own outbox",
    )
    parser.add_argument(
        "--no-relay",
        action="store_true",
        help="do not relay the bus's outbox table (leave it to `retrybus relay`)",
    )
    parser.add_argument(
        "--no-redrives",
        action="store_true",
        help="do not drive redrives (leave them to the dashboard, `retrybus dlq redrive` "
        "or other workers); by default the worker drives every active redrive it can",
    )
    parser.add_argument(
        "--retry-budget",
        type=_budget,
        metavar="PERCENT[,MIN/S[,WINDOW]]",
        help="call each handler's retries only while they stay within PERCENT %% of its first "
        "deliveries, at least MIN/S a second, over WINDOW seconds (defaults 10 and 10); the "
        "others wait, their attempt unused (default: no budget)",
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
        "--prefetch",
        type=_count,
        metavar="N",
        help="messages from the broker handled at once (default: --concurrency)",
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
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default="text",
        help="text lines, or one JSON object per line with the event id, type, handler "
        "and attempt as fields (text)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics "
        "(needs retrybus[prometheus]; default: no metrics)",
    )
    parser.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address the metrics endpoint listens on (0.0.0.0)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="trace retries with OpenTelemetry's global tracer provider, as the APP or "
        "opentelemetry-instrument sets it up (needs retrybus[otel])",
    )
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="exit with status 1 when the store cannot be reached at start (default: wait "
        "for it, retrying with backoff, as a running worker rides out an outage)",
    )
    parser.add_argument(
        "--handler-timeout",
        type=_seconds,
        metavar="S",
        help="fail a call with TimeoutError after S seconds, for handlers without a "
        "handler_timeout of their own (an async handler is cancelled; a plain one's "
        "thread is left to finish) (default: no limit)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="store a heartbeat every S seconds: the worker counts as live for three of them (10)",
    )
    parser.add_argument(
        "--app-dir", default=".", metavar="DIR", help="directory put first on sys.path (.)"
    )
    return parser


def main(argv: Sequence[str], prog: str = "retrybus worker") -> int:
    """Parse ``argv``, run the worker until a signal, return the exit status."""
    args = build_parser(prog).parse_args(list(argv))
    configure_logging(args.log_level, args.log_format)
    settings = WorkerSettings(
        check_interval=args.check_interval,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        lease=args.lease,
        shutdown_timeout=args.shutdown_timeout,
        name=args.name,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        tracing=args.tracing,
        fail_fast=args.fail_fast,
        handler_timeout=args.handler_timeout,
        heartbeat_interval=args.heartbeat_interval,
        prefetch=args.prefetch,
        relay=not args.no_relay,
        redrives=not args.no_redrives,
        retry_budget=args.retry_budget,
    )
    store = args.store or os.environ.get("RETRYBUS_STORE") or None
    transport, source = args.transport, "--transport"
    if not transport:
        transport, source = os.environ.get("RETRYBUS_TRANSPORT") or None, "$RETRYBUS_TRANSPORT"
    try:
        bus = build_bus(store, args.app, args.app_dir)
        if transport is not None:
            use_transport_url(bus, transport, source)
        outbox = args.outbox or os.environ.get("RETRYBUS_OUTBOX") or None
        if outbox is not None:
            try:
                bus.outbox.use(outbox)
            except ValueError as exc:
                raise CliError(f"--outbox: {exc}", EXIT_USAGE) from None
        asyncio.run(serve(bus, settings))
    except CliError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return exc.code
    except RetrybusError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 1
    return 0


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level`` (``debug``, ``info``, ``warning``, ``error``),
    as text lines or (``log_format="json"``) one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from ..logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _instrument(bus: EventBus, settings: WorkerSettings) -> Callable[[], None]:
    """Turn on what the settings ask for; returns what stops it again."""
    if settings.tracing and bus.tracing is None:
        try:
            from ..otel import OpenTelemetryTracing
        except ImportError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        bus.instrument(tracing=OpenTelemetryTracing())
    if settings.metrics_port is None:
        return lambda: None
    try:
        from .. import prometheus
    except ImportError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    metrics = bus.metrics
    if metrics is None:
        metrics = prometheus.PrometheusMetrics()
        bus.instrument(metrics=metrics)
    elif not isinstance(metrics, prometheus.PrometheusMetrics):
        raise CliError(
            f"--metrics-port serves retrybus.prometheus.PrometheusMetrics, but the APP's bus "
            f"reports to {metrics!r}",
            EXIT_USAGE,
        )
    try:
        server, _thread = metrics.serve(settings.metrics_port, settings.metrics_host)
    except OSError as exc:
        raise CliError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}",
            EXIT_USAGE,
        ) from None
    host, port = server.server_address[:2]
    logger.info("serving Prometheus metrics at http://%s:%s/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


async def _until_stopped_or_failed(stopping: asyncio.Event, worker: RetryWorker) -> None:
    """Wait for a signal; raise ``CliError`` should the worker's loop end first
    (it failed, and has logged why): the process must not linger doing nothing."""
    signalled = asyncio.ensure_future(stopping.wait())
    ended = asyncio.ensure_future(worker.join())
    try:
        await asyncio.wait({signalled, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
    if not ended.done():
        ended.cancel()
        return
    if ended.cancelled():
        raise CliError(f"worker {worker.name} stopped: its claim loop was cancelled", 1)
    error = ended.exception()
    raise CliError(f"worker {worker.name} stopped: {error or 'its claim loop ended'}", 1)


async def serve(bus: EventBus, settings: WorkerSettings) -> None:
    """Run a worker on ``bus`` until SIGINT or SIGTERM, then stop it gracefully."""
    if not bus.handler_names and bus.transport is None:
        raise CliError(
            "the APP's bus has no handlers subscribed: a worker claims only the records "
            "of its handlers, so it would have nothing to do",
            EXIT_USAGE,
        )
    stop_instruments = _instrument(bus, settings)
    worker = RetryWorker(
        bus,
        check_interval=settings.check_interval,
        batch_size=settings.batch_size,
        concurrency=settings.concurrency,
        lease=settings.lease,
        name=settings.name,
        fail_fast=settings.fail_fast,
        handler_timeout=settings.handler_timeout,
        heartbeat_interval=settings.heartbeat_interval,
        prefetch=settings.prefetch,
        relay=settings.relay,
        drive_redrives=settings.redrives,
        retry_budget=settings.retry_budget,
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
        logger.info(
            "serving the handlers of service %s: %s",
            bus.service,
            ", ".join(bus.handler_names) or "none (it sends the service's scheduled events)",
        )
        if settings.relay and bus.outbox.url is not None:
            logger.info("relaying the outbox table of %s", redact(bus.outbox.url))
        await _until_stopped_or_failed(stopping, worker)
        # A second signal cancels the worker's loop, which ends this stop() early.
        with contextlib.suppress(asyncio.CancelledError):
            await worker.stop(timeout=settings.shutdown_timeout)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await asyncio.to_thread(stop_instruments)  # the server's shutdown waits for its thread
        await bus.close()
