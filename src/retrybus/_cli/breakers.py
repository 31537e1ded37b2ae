"""``retrybus breakers …``: the circuit breakers the store holds, of every service
(``retrybus breakers``, the same as ``list``), and an operator's ``isolate`` (held
open until reset) and ``reset`` (closed now). Only a store URL is needed: each
breaker's record holds its settings and handlers (``_breaker_records``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from .._breaker_records import (
    StoredBreaker,
    isolate_breaker,
    read_breakers,
    reset_breaker,
)
from .._event import check_text
from .._services import check_service
from .common import AppDirOption, AppOption, JsonOption, StoreOption, fail, run
from .output import echo_json
from .selection import actor_name
from .session import EXIT_USAGE, connected_bus
from .typer_help import RetrybusTyper, group_defaulting_to

if TYPE_CHECKING:  # for annotations only, as in typer_help
    from .views import FittedTable

__all__ = ["breakers_app"]


breakers_app = RetrybusTyper(
    cls=group_defaulting_to("list"),
    name="breakers",
    help="The circuit breakers of the services sharing the store: state, handlers, trips, "
    "when an open one half-opens (`retrybus breakers`, the same as `list`); `isolate` "
    "holds one open until `reset` closes it.",
    no_args_is_help=False,
)

ServiceOption = Annotated[
    str | None,
    typer.Option(
        "--service",
        metavar="SERVICE",
        help="Only this service's breakers (needed when several services have a breaker "
        "of that name).",
        show_default=False,
    ),
]
NameArgument = Annotated[
    str, typer.Argument(metavar="NAME", help="The breaker's name.", show_default=False)
]
ActorOption = Annotated[
    str | None,
    typer.Option(
        "--actor",
        metavar="NAME",
        help="Who does it, for the breaker's reason and the log (default: $RETRYBUS_ACTOR, "
        "else your login name).",
        show_default=False,
    ),
]


def _checked_service(service: str | None) -> None:
    if service is None:
        return
    try:
        check_service(service)
    except ValueError as exc:
        fail(f"--service {service!r}: {exc}", EXIT_USAGE)


def _checked_actor(actor: str | None) -> str:
    who = actor_name() if actor is None else actor
    try:
        if not who.strip():
            raise ValueError("may not be empty")
        check_text(who, "--actor")
    except ValueError as exc:
        fail(f"--actor {who!r}: {exc}", EXIT_USAGE)
    return who


@breakers_app.command("list")
def list_breakers(
    service: ServiceOption = None,
    store: StoreOption = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """List the circuit breakers of every service sharing the store (or of
    --service): state (closed, open, half_open or isolated), the handlers behind
    each, how many times it opened, when it opened, when an open one half-opens
    and why it is in its state.

    A breaker is listed once a worker of its service has started (it stores the
    breakers' settings as it registers), or once it first opened.

    With --json, a list of objects with `service`, `name`, `state`, `handlers`,
    `trips`, `open_for` (seconds of its current open period), `opened_at`,
    `half_open_at` and `half_open_in` (seconds; null unless open), `reason`,
    `changed_at`, `settings` (its CircuitBreaker fields; null when an older
    release wrote its record) and `read_at`; times are ISO 8601 in UTC.
    """
    _checked_service(service)

    async def main() -> tuple[list[StoredBreaker], str]:
        async with connected_bus(store, app, app_dir) as bus:
            found = await read_breakers(bus.store, service, now=bus.clock.now())
            return found, bus.store.url

    found, url = run(main())
    if json:
        echo_json([breaker.to_dict() for breaker in found])
        return
    if not found:
        where = f" of service {service}" if service else ""
        typer.echo(
            f"no circuit breakers{where} in {url}: a worker stores its breakers when it "
            "starts (bus.register())"
        )
        return
    from . import views

    views.console().print(breakers_table(found, f"circuit breakers — {url}"))


def _half_open(breaker: StoredBreaker) -> str:
    from .views import duration

    at = breaker.status.half_open_at
    seconds = breaker.half_open_in
    if at is None or seconds is None:
        return "—"
    return f"{_time(at)} (in {duration(seconds)})"


def _time(moment: datetime | None) -> str:
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def breakers_table(breakers: list[StoredBreaker], title: str) -> FittedTable:
    """The breakers as a table that fits the console."""
    from .views import Column, FittedTable

    columns: list[Column[StoredBreaker]] = [
        Column("service", lambda b: b.service),
        Column("name", lambda b: b.name, style="cyan"),
        Column("state", lambda b: b.state),
        Column("handlers", lambda b: ", ".join(b.handlers) or "—", wraps_to=12, drop=3),
        Column("trips", lambda b: str(b.trips), justify="right", drop=4),
        Column("opened", lambda b: _time(b.status.opened_at), drop=2),
        Column("half-open at", _half_open),
        Column("reason", lambda b: b.status.reason or "—", wraps_to=16, drop=1),
    ]
    return FittedTable(title, columns, breakers, caption="times in UTC")


def _act(
    action: str,
    name: str,
    service: str | None,
    store: str | None,
    actor: str | None,
    json: bool,
    app: str | None,
    app_dir: str,
) -> None:
    _checked_service(service)
    who = _checked_actor(actor)
    change = isolate_breaker if action == "isolate" else reset_breaker

    async def main() -> StoredBreaker:
        async with connected_bus(store, app, app_dir) as bus:
            return await change(bus.store, name, service, now=bus.clock.now(), actor=who)

    breaker = run(main())
    if json:
        echo_json(breaker.to_dict())
        return
    done = "isolated" if action == "isolate" else "reset"
    typer.echo(
        f"breaker {breaker.service}/{breaker.name} {done} by {who}: now {breaker.state}; "
        "every process of the service follows at its next refresh (5 s by default)"
    )


@breakers_app.command("isolate")
def isolate(
    name: NameArgument,
    service: ServiceOption = None,
    store: StoreOption = None,
    actor: ActorOption = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Hold breaker NAME open until it is reset: its handlers' deliveries wait in
    the retry queue, uncalled and without using an attempt, in every process of
    its service. With --json, the breaker as `list --json` shows it."""
    _act("isolate", name, service, store, actor, json, app, app_dir)


@breakers_app.command("reset")
def reset(
    name: NameArgument,
    service: ServiceOption = None,
    store: StoreOption = None,
    actor: ActorOption = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Close breaker NAME now (isolated or open), its open period back to its
    `open_for` setting, in every process of its service. With --json, the
    breaker as `list --json` shows it."""
    _act("reset", name, service, store, actor, json, app, app_dir)
