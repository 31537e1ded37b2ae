"""Which dead letters a bulk command acts on (ids, ``--filter KEY=VALUE`` or ``--all``),
the confirmation that shows their count, and driving a redrive with progress."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

import typer

from .._bus import EventBus
from .._filters import DeadLetterFilter, field_name
from .._redrive import Redrive
from .common import fail
from .session import EXIT_USAGE

__all__ = [
    "AllOption",
    "FilterOption",
    "ProbeOption",
    "RateOption",
    "YesOption",
    "actor_name",
    "describe",
    "drive",
    "parse_filter",
]

FilterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--filter",
        "-f",
        metavar="KEY=VALUE",
        help="Only dead letters matching (repeatable): type, handler, reason, processed "
        "(true/false), since and until (ISO 8601 or an age: 2h, 7d), event_id, group, service.",
        show_default=False,
    ),
]
AllOption = Annotated[
    bool, typer.Option("--all", help="Every dead letter (when no ID or --filter is given).")
]
RateOption = Annotated[
    str | None,
    typer.Option(
        "--rate",
        metavar="N/s",
        help="At most this many items per second (10, 10/s, 600/m); default: no limit.",
        show_default=False,
    ),
]
ProbeOption = Annotated[
    int,
    typer.Option(
        "--probe",
        min=0,
        metavar="N",
        help="First requeue only N items and go on once a worker has handled them "
        "successfully; stop if any fails again.",
    ),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def parse_filter(pairs: Sequence[str] | None, now: datetime) -> DeadLetterFilter:
    """``--filter KEY=VALUE`` options as a ``DeadLetterFilter``; a malformed one ends the
    command with a one-line usage error."""
    given: dict[str, str] = {}
    fields: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"--filter {pair!r}: expected KEY=VALUE, e.g. handler=Mailer", EXIT_USAGE)
        if not value.strip():
            # `-f handler=$H` with H unset must not select every dead letter
            fail(f"--filter {pair!r} has an empty value", EXIT_USAGE)
        name = field_name(key)
        if name is not None and name in fields:
            fail(f"--filter {key!r} and {fields[name]!r} name the same field", EXIT_USAGE)
        if name is not None:
            fields[name] = key
        given[key] = value
    try:
        return DeadLetterFilter.parse(given, now)
    except ValueError as exc:
        fail(f"--filter: {exc}", EXIT_USAGE)


def describe(where: DeadLetterFilter) -> str:
    """``handler=Mailer, processed=false`` (or ``all``), for confirmations and messages."""
    query = where.to_query()
    return ", ".join(f"{key}={value}" for key, value in query.items()) if query else "all"


def actor_name() -> str:
    """Who acts, for audit trails: ``$RETRYBUS_ACTOR``, else the login name."""
    for name in ("RETRYBUS_ACTOR", "USER", "LOGNAME"):
        value = os.environ.get(name)
        if value:
            return value
    return "cli"


def _progress_line(redrive: Redrive) -> str:
    total = f"/{redrive.total}" if redrive.total else ""
    failed = f", {redrive.failed} failed" if redrive.failed else ""
    return (
        f"redrive {redrive.id}: {redrive.state}, {redrive.done}{total} done{failed}"
        f" ({redrive.progress:.0%}) — {redrive.message}"
    )


async def drive(bus: EventBus, redrive: Redrive, *, quiet: bool) -> Redrive:
    """Drive ``redrive`` here until it ends, printing progress on stderr.

    SIGINT or SIGTERM pauses it (the store keeps its state) instead of leaving it
    to wait for another runner's lease to run out."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, interrupted.set)
            handled.append(sig)
    tty = sys.stderr.isatty()
    last = ""

    def show(current: Redrive) -> None:
        nonlocal last
        line = _progress_line(current)
        if quiet or line == last:
            return
        last = line
        if tty:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        else:
            typer.echo(line, err=True)

    try:
        current = redrive
        while True:
            current = await bus.redrives.step(current.id)
            show(current)
            if not current.active:
                break
            if interrupted.is_set():
                try:
                    current = await bus.redrives.pause(current.id)
                except ValueError:  # it ended (or was cancelled) meanwhile
                    current = await bus.redrives.get(current.id)
                show(current)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), 0.2)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if tty and last and not quiet:
            sys.stderr.write("\n")
    return current
