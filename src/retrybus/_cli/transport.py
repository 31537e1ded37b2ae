"""``retrybus transport check URL``: what holds each service's messages on a
broker (its queues, groups or consumers), their lag, and what is wrong.

``check_report`` does the work on a ``Transport`` object and ``show_report``
prints what it found, so that both serve any transport, opened by URL or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Annotated

import typer

from .._services import check_service
from .._transports import Transport, TransportReport
from .common import JsonOption, fail, run
from .output import echo_json, transport_report_to_dict
from .session import EXIT_FAILURE, EXIT_USAGE, CliError, open_transport_url
from .typer_help import RetrybusTyper

__all__ = ["check_report", "show_report", "transport_app"]

transport_app = RetrybusTyper(
    name="transport",
    help="The broker that carries first deliveries between services: check what holds "
    "each service's messages.",
    no_args_is_help=True,
)


async def check_report(
    transport: Transport, services: Collection[str] = (), within: float = 10.0
) -> TransportReport:
    """``transport.check(services)``, connecting first (the caller closes it).
    ``CliError`` when the broker does not answer within ``within`` seconds;
    ``TransportUnavailable`` when it cannot be reached."""
    try:
        async with asyncio.timeout(within):
            await transport.connect()
            return await transport.check(services)
    except TimeoutError:
        raise CliError(f"the broker at {transport.url} did not answer within {within:g}s") from None


async def _check_url(url: str, services: Collection[str], within: float) -> TransportReport:
    transport = open_transport_url(url, "URL")
    try:
        return await check_report(transport, services, within)
    finally:
        await transport.close()


def show_report(report: TransportReport, as_json: bool = False) -> int:
    """Print ``report`` (a table per service, then the rest of the topology and the
    warnings; or JSON) and return the exit status: 0 healthy, 1 when a service
    has a problem. Warnings do not fail it."""
    if as_json:
        echo_json(transport_report_to_dict(report))
    else:
        from . import views

        views.console().print(views.transport_view(report))
    return 0 if report.healthy else EXIT_FAILURE


def _check_services(names: list[str]) -> list[str]:
    for name in names:
        try:
            check_service(name)
        except ValueError as exc:
            fail(f"--service {name!r}: {exc}", EXIT_USAGE)
    return names


@transport_app.command("check")
def check(
    url: Annotated[
        str,
        typer.Argument(
            metavar="URL",
            envvar="RETRYBUS_TRANSPORT",
            help="The broker: redis://host:6379/0?stream=NAME, amqp://user:pass@host/vhost, "
            "nats://host:4222 or memory:// (default: $RETRYBUS_TRANSPORT).",
            show_default=False,
        ),
    ],
    service: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            metavar="NAME",
            help="A service that must have its queue, group or consumer on the broker "
            "(repeat it for several); the services the broker knows are checked too.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(min=0.1, metavar="S", help="Give up when the broker takes longer."),
    ] = 10.0,
    json: JsonOption = False,
) -> None:
    """Connect to the broker at URL and show what holds each service's messages:
    its queues, groups or consumers (holders), the messages waiting for it or held
    by its consumers (lag), those received and not yet acked (in flight), its
    consumers and its problems; then the rest of the topology and warnings.

    Exits 0 when every service is in order, 1 when one has a problem (a service
    given with --service that the broker does not hold, say) or the broker cannot
    be reached. Warnings (a Redis without persistence) do not fail it.

    With --json: `{url, kind, healthy, services, extra, warnings}`, each service
    an object with `service`, `holders`, `lag`, `in_flight`, `consumers` (null: the
    broker does not say) and `problems`.
    """
    services = _check_services(service or [])
    report = run(_check_url(url, services, timeout))
    code = show_report(report, json)
    if code:
        raise typer.Exit(code)
