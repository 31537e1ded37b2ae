"""``retrybus services …``: the services sharing a store (their live workers, their
handlers and what waits for each), and removing a service's subscriptions.

``retrybus services [SERVICE]`` is ``retrybus services show [SERVICE]``: the group
runs ``show`` unless its first argument names another of its commands.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .._bus import EventBus
from .._errors import SubscriptionInUse, UnknownSubscription
from .._event import check_text
from .._service_admin import ServiceRemoval
from .._services import check_service
from .common import AppDirOption, AppOption, JsonOption, StoreOption, fail, run
from .output import echo_json, service_to_dict
from .selection import YesOption, actor_name
from .session import EXIT_USAGE, CliError, connected_bus, use_transport_url
from .typer_help import RetrybusTyper, group_defaulting_to

__all__ = ["services_app"]

#: workers an error names, at most (then how many more)
_WORKERS_SHOWN = 10


services_app = RetrybusTyper(
    cls=group_defaulting_to("show"),
    name="services",
    help="The services sharing the store: their live workers, their handlers and what "
    "waits for each (`retrybus services [SERVICE]`, the same as `show`); remove a "
    "service's subscriptions.",
    no_args_is_help=False,
)


def _check_service_name(value: str) -> None:
    try:
        check_service(value)
    except ValueError as exc:
        fail(f"SERVICE {value!r}: {exc}", EXIT_USAGE)


@services_app.command("show")
def show_services(
    service: Annotated[
        str | None,
        typer.Argument(metavar="SERVICE", help="Only this service.", show_default=False),
    ] = None,
    store: StoreOption = None,
    transport: Annotated[
        str | None,
        typer.Option(
            "--transport",
            envvar="RETRYBUS_TRANSPORT",
            metavar="URL",
            help="The broker carrying first deliveries, for each service's broker lag "
            "(default: the --app bus's transport, else none).",
            show_default=False,
        ),
    ] = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Every service sharing the store (or only SERVICE): its live workers, its
    handlers and what waits for each; with a transport (--transport, or the --app
    bus's), the messages the broker holds for each (broker lag).

    A service with work waiting and no live worker is marked `WARNING no live worker`.

    When services register event types (their `bus.event_type`), an "event
    types" table follows: each type's producers and consumers version beside
    version, the consumers behind the newest producer marked `BEHIND`.

    With --json, a list of services, each an object with these fields (times are
    ISO 8601 in UTC, ages seconds):

    * `service`; `at`, when this was read; `warning`, "no live worker" or null;
      `waiting`, its pending and retrying deliveries; `dead`, its unprocessed dead
      letters; `oldest_pending_age` (null: none pending); `stale_workers`, how many
      heartbeats were not seen for three intervals; `broker_lag`, the messages
      the broker holds for it (null without a transport, or when the broker did
      not answer within a second);
    * `workers`, the live ones, each with `name`, `host`, `pid`, `started_at`,
      `last_seen`, `last_seen_age`, `interval`, `lanes`, `lanes_busy`, `handlers`,
      `version`;
    * `handlers`, each with `handler_name`; its subscription: `patterns`, `policy`,
      `max_retries`, `handler_timeout`, `registered_at` (all null when the store
      keeps none of it), `removed`, `removed_at`, `removed_by`; what waits for it:
      `pending`, `scheduled`, `retrying`, `leased`, `dead_unprocessed`,
      `dead_processed`, `oldest_pending_due`, `oldest_pending_age`;
    * `event_types`, the types the service produces or consumes, each with
      `type`; `newest`, the highest version a service registers (null: none
      does); `producers`, the services registering it, each to its version;
      `consumers`, the stored subscriptions receiving it (`service/handler`),
      each to the version it reads (null: unversioned, it registered none);
      `behind`, the consumers reading a version older than `newest`.
    """
    if service is not None:
        _check_service_name(service)

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            if transport is not None:
                use_transport_url(bus, transport)
            summaries = await bus.services.overview(service)
            if service is not None and not summaries:
                known = ", ".join(s.service for s in await bus.services.overview()) or "none"
                raise CliError(
                    f"no service {service!r} in {bus.store.url}: no subscription, worker "
                    f"heartbeat or record of it (services: {known})"
                )
            versions = await bus.services.versions(service)
            if json:
                echo_json(
                    [
                        {
                            **service_to_dict(summary),
                            "event_types": [
                                t.to_dict() for t in versions if t.involves(summary.service)
                            ],
                        }
                        for summary in summaries
                    ]
                )
                return
            if not summaries:
                typer.echo(
                    f"no services in {bus.store.url}: no subscription, worker heartbeat or "
                    "record of any"
                )
                return
            from . import views

            broker = None if bus.transport is None else bus.transport.url
            views.console().print(views.services_view(summaries, bus.store.url, broker))
            if versions:
                from .versions_view import event_types_view

                views.console().print(event_types_view(versions))

    run(main())


def _workers_line(workers: list[str]) -> str:
    shown = ", ".join(workers[:_WORKERS_SHOWN])
    more = len(workers) - _WORKERS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _in_use_error(refused: SubscriptionInUse) -> CliError:
    which = ", ".join(f"{refused.service}/{name}" for name in refused.handlers)
    return CliError(
        f"cannot remove {which}: live worker(s) run it: {_workers_line(refused.workers)}; "
        "stop them first (they would register it again when they restart), or give "
        "--force to remove it anyway"
    )


async def _question(
    bus: EventBus, service: str, handlers: list[str], live: list[str], running: list[str]
) -> str | None:
    """What to ask before the removal (``running``: the live workers that run the
    handlers, when forced); None when it would change nothing."""
    loads = [
        load
        for load in await bus.services.loads()
        if load.service == service and load.handler_name in handlers
    ]
    queued = sum(load.queued for load in loads)
    deliveries = f"{queued} deliver{'y' if queued == 1 else 'ies'}"
    if not live:
        if not queued:
            return None
        removed = ", ".join(f"{service}/{name}" for name in handlers)
        return (
            f"{removed} was removed already: dead-letter the {deliveries} still waiting "
            f"for it in {bus.store.url}?"
        )
    which = ", ".join(f"{service}/{name}" for name in live)
    question = (
        f"Remove the subscription{'s' if len(live) > 1 else ''} of {which} from "
        f"{bus.store.url}? Publishers stop routing events to it, and the {deliveries} "
        "waiting for it are dead-lettered."
    )
    if running:
        question += (
            f" Live workers run it ({_workers_line(running)}) and will register it again "
            "when they restart."
        )
    return question


def _report(removal: ServiceRemoval, handlers: list[str], actor: str) -> None:
    service = removal.service
    if removal.removed:
        which = ", ".join(f"{service}/{name}" for name in removal.removed)
        typer.echo(f"removed the subscription of {which} (by {actor})")
    else:
        which = ", ".join(f"{service}/{name}" for name in handlers)
        typer.echo(f"{which} was removed already: no subscription to remove")
    count = removal.dead_lettered
    typer.echo(f"dead-lettered {count} deliver{'y' if count == 1 else 'ies'} waiting for it")
    if removal.leased:
        typer.echo(
            f"{removal.leased} more wait(s) for a handler's lease to run out: a worker's "
            "sweep dead-letters them then (or run this again)"
        )


@services_app.command("remove")
def remove_subscriptions(
    service: Annotated[
        str, typer.Argument(metavar="SERVICE", help="The service.", show_default=False)
    ],
    handler: Annotated[
        str | None,
        typer.Argument(
            metavar="HANDLER",
            help="Only this handler (default: every handler of SERVICE).",
            show_default=False,
        ),
    ] = None,
    store: StoreOption = None,
    yes: YesOption = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Remove it even while live workers run the handler (they register it "
            "again when they restart).",
        ),
    ] = False,
    actor: Annotated[
        str | None,
        typer.Option(
            "--actor",
            metavar="NAME",
            help="Who removes it, for the dead letters' reason and the log (default: "
            "$RETRYBUS_ACTOR, else your login name).",
            show_default=False,
        ),
    ] = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Remove the subscription of SERVICE's HANDLER (without HANDLER, of every
    handler of SERVICE), after a confirmation unless --yes.

    Publishers stop routing events to it, and what waited for it is dead-lettered
    with the reason `subscription removed: SERVICE/HANDLER (by NAME)`: now, or, for
    a delivery a handler runs, once its lease has run out. Refused while a live
    worker runs the handler, unless --force.

    With --json: `{service, removed, dead_lettered, leased, actor}`: the handlers
    whose subscription was removed, how many deliveries were dead-lettered, how
    many wait for a lease to run out, and who removed it.
    """
    _check_service_name(service)
    if handler is not None and not handler.strip():
        fail("HANDLER may not be empty", EXIT_USAGE)
    who = actor_name() if actor is None else actor
    try:
        if not who.strip():
            raise ValueError("may not be empty")
        check_text(who, "--actor")
    except ValueError as exc:
        fail(f"--actor {who!r}: {exc}", EXIT_USAGE)

    async def main() -> tuple[ServiceRemoval, list[str]]:
        async with connected_bus(store, app, app_dir) as bus:
            stored = await bus.services.list(service, removed=True)
            chosen = [s for s in stored if handler is None or s.handler_name == handler]
            if not chosen:
                others = ", ".join(s.handler_name for s in stored)
                has = f" (service {service} has: {others})" if others else ""
                raise CliError(f"{UnknownSubscription(service, handler)} in {bus.store.url}{has}")
            handlers = [s.handler_name for s in chosen]
            live = [s.handler_name for s in chosen if not s.removed]
            refusal = await bus.services.in_use(service, live) if live else None
            if refusal is not None and not force:
                raise _in_use_error(refusal)
            running = [] if refusal is None else refusal.workers
            question = await _question(bus, service, handlers, live, running)
            if question is not None and not yes:
                typer.confirm(question, abort=True, err=True)
            try:
                removal = await bus.services.remove(service, handler, actor=who, force=force)
            except SubscriptionInUse as refused:  # a worker started since
                raise _in_use_error(refused) from None
            return removal, handlers

    removal, handlers = run(main())
    if json:
        echo_json(
            {
                "service": removal.service,
                "removed": list(removal.removed),
                "dead_lettered": removal.dead_lettered,
                "leased": removal.leased,
                "actor": who,
            }
        )
    else:
        _report(removal, handlers, who)
