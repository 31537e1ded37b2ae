"""``retrybus relay --outbox URL``: publish what applications staged in an outbox
table (``bus.outbox.stage``) to the bus's store or transport, until SIGINT or
SIGTERM, or once (``--once``).

Workers of a bus given ``outbox=URL`` relay already; this command is for a relay
of its own (an outbox table of an app whose workers run elsewhere, or none).
Any number of relays and workers share one table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Annotated

import typer

from .._bus import EventBus
from .common import AppDirOption, AppOption, JsonOption, OutboxOption, StoreOption, fail, run
from .output import echo_json
from .session import EXIT_USAGE, CliError, build_bus, use_transport_url

__all__ = ["relay"]

logger = logging.getLogger("retrybus.cli")

TransportOption = Annotated[
    str | None,
    typer.Option(
        "--transport",
        envvar="RETRYBUS_TRANSPORT",
        metavar="URL",
        help="Broker to publish to (redis://…, amqp://…, nats://…); default: the --app "
        "bus's transport, else the store.",
        show_default=False,
    ),
]


def relay(
    outbox: OutboxOption = None,
    store: StoreOption = None,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
    transport: TransportOption = None,
    poll_interval: Annotated[
        float,
        typer.Option("--poll-interval", min=0.001, metavar="S", help="Seconds between two looks."),
    ] = 0.1,
    batch: Annotated[
        int, typer.Option("--batch", min=1, metavar="N", help="Rows claimed at once.")
    ] = 500,
    once: Annotated[
        bool, typer.Option("--once", help="Relay what the table holds now, then exit.")
    ] = False,
    json: JsonOption = False,
) -> None:
    """Publish the events staged in the outbox table at --outbox URL to the store
    (--store, or the --app bus's) or the broker (--transport)."""
    try:
        bus = _relay_bus(outbox, store, app, app_dir, transport)
    except CliError as exc:
        fail(str(exc), exc.code)
    if not once:
        logging.basicConfig(
            level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        )
    run(_relay(bus, poll_interval, batch, once, json))


def _relay_bus(
    outbox: str | None, store: str | None, app: str | None, app_dir: str, transport: str | None
) -> EventBus:
    if outbox is None:
        raise CliError("give --outbox URL (or set RETRYBUS_OUTBOX)", EXIT_USAGE)
    bus = build_bus(store, app, app_dir)
    try:
        bus.outbox.use(outbox)
    except ValueError as exc:
        raise CliError(f"--outbox: {exc}", EXIT_USAGE) from None
    if transport is not None:
        use_transport_url(bus, transport)
    return bus


async def _relay(bus: EventBus, poll_interval: float, batch: int, once: bool, json: bool) -> None:
    relay = bus.outbox.relay(poll_interval=poll_interval, batch=batch)
    try:
        if once:
            relayed = 0
            while True:
                count = await relay.relay_once()
                relayed += count
                if count < batch:
                    break
            depth = await relay.depth()
            if json:
                echo_json({"outbox": relay.database.url, "relayed": relayed, "waiting": depth.rows})
            else:
                typer.echo(f"{relay.database.url}: relayed {relayed}, {depth.rows} waiting")
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, relay.stop)
        logger.info(
            "relaying %s to %s (pid %d)",
            relay.database.url,
            bus.transport.url if bus.transport is not None else bus.store.url,
            os.getpid(),
        )
        try:
            await relay.run()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signum)
        logger.info("relay stopped after %d events", relay.relayed)
    finally:
        await relay.close()
        await bus.close()
