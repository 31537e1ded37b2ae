"""``retrybus queue …`` and ``retrybus stats``: what waits in the retry queue (retries,
pending and scheduled deliveries), and cancelling a pending or scheduled delivery."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from .._bus import EventBus
from .._records import RETRY_KINDS, RetryItem, RetryKind
from .._services import check_service
from .common import AppDirOption, AppOption, JsonOption, StoreOption, fail, run
from .ids import RetryIdArgument, resolve_retry_id
from .output import echo_json, record_to_dict
from .selection import YesOption, actor_name
from .session import EXIT_USAGE, connected_bus
from .typer_help import RetrybusTyper

__all__ = ["queue_app", "stats"]

queue_app = RetrybusTyper(
    name="queue",
    help="Look at the retry queue; cancel a pending or scheduled delivery.",
    no_args_is_help=True,
)


def kinds_line(counts: dict[RetryKind, int]) -> str:
    """``2 retries, 1 pending, 3 scheduled``."""
    retries = counts["retry"]
    return (
        f"{retries} retr{'y' if retries == 1 else 'ies'}, {counts['pending']} pending, "
        f"{counts['scheduled']} scheduled"
    )


async def _service_kinds(bus: EventBus, service: str, now: datetime) -> dict[RetryKind, int]:
    """How many items of each kind wait for ``service``'s handlers at ``now``."""
    loads = [load for load in await bus.store.service_loads(now) if load.service == service]
    return {
        "retry": sum(load.retrying for load in loads),
        "pending": sum(load.pending for load in loads),
        "scheduled": sum(load.scheduled for load in loads),
    }


def _item_dict(item: RetryItem, kind: RetryKind) -> dict[str, Any]:
    return {**record_to_dict(item), "kind": kind}


@queue_app.command("list")
def list_retry_items(
    store: StoreOption = None,
    limit: Annotated[int, typer.Option(min=0, metavar="N", help="How many to show.")] = 50,
    offset: Annotated[int, typer.Option(min=0, metavar="N", help="How many to skip.")] = 0,
    handler: Annotated[str | None, typer.Option(metavar="NAME", help="Only this handler.")] = None,
    event_type: Annotated[
        str | None, typer.Option(metavar="TYPE", help="Only this event type.")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            metavar="KIND",
            help="Only retries (retry: deliveries that failed), pending first deliveries "
            "(pending: due, deferred or running) or scheduled ones (scheduled: due later).",
            show_default=False,
        ),
    ] = None,
    service: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only this service's items.")
    ] = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """List retry queue items by next retry, earliest first, with the kind of each:
    retry, pending or scheduled."""
    if kind is not None and kind not in RETRY_KINDS:
        fail(f"--kind {kind!r}: use {', '.join(RETRY_KINDS)}", EXIT_USAGE)
    wanted: RetryKind | None = kind  # narrowed by the check above
    if service is not None:
        try:
            check_service(service)
        except ValueError as exc:
            fail(f"--service {service!r}: {exc}", EXIT_USAGE)

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            now = bus.clock.now()
            items = await bus.store.list_retry(
                limit=limit,
                offset=offset,
                handler_name=handler,
                event_type=event_type,
                kind=wanted,
                now=None if wanted is None else now,
                service=service,
            )
            if json:
                echo_json([_item_dict(item, item.kind(now)) for item in items])
                return
            from . import views

            out = views.console()
            what = "retry queue" if service is None else f"retry queue of service {service}"
            if wanted is not None:
                what += f", {wanted} only"
            out.print(views.retry_table(items, now, f"{what} — {bus.store.url}"))
            shown = f"{offset + 1}–{offset + len(items)}" if items else "none"
            if service is None:
                counts = await bus.retry_queue.count_kinds()
                whole = "all handlers and types"
            else:
                counts = await _service_kinds(bus, service, now)
                whole = f"service {service}, all its handlers and types"
            total = sum(counts.values())
            out.print(f"showing {shown} of {total} ({whole}): {kinds_line(counts)}")

    run(main())


@queue_app.command("cancel")
def cancel_delivery(
    item_id: RetryIdArgument,
    store: StoreOption = None,
    yes: YesOption = False,
    json: JsonOption = False,
) -> None:
    """Cancel a pending or scheduled delivery no worker holds: its record is removed,
    and its handler never runs (nothing is dead-lettered). A retry, or a delivery whose
    handler is running, is refused. Asks first unless --yes."""

    async def main() -> None:
        async with connected_bus(store) as bus:
            resolved = await resolve_retry_id(bus, item_id)
            item = await bus.retry_queue.get(resolved)
            now = bus.clock.now()
            kind = item.kind(now)
            if not yes and kind != "retry" and not item.leased_at(now):
                when = item.next_retry.isoformat()
                typer.confirm(
                    f"Cancel the {kind} delivery {resolved} ({item.event_type} to "
                    f"{item.handler_name}, due {when}) in {bus.store.url}, so that its "
                    "handler never runs?",
                    abort=True,
                    err=True,
                )
            cancelled = await bus.retry_queue.cancel(resolved, actor=actor_name())
            if json:
                echo_json({"cancelled": _item_dict(cancelled, cancelled.kind(bus.clock.now()))})
            else:
                typer.echo(
                    f"cancelled {resolved}: {cancelled.event_type} to {cancelled.handler_name} "
                    "will not be delivered"
                )

    run(main())


@queue_app.command("groups")
def retry_groups(
    store: StoreOption = None,
    by: Annotated[str, typer.Option(metavar="FIELD", help="handler or type.")] = "handler",
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="How many groups to show.")] = 50,
    json: JsonOption = False,
) -> None:
    """Retry items counted per handler (or event type), largest first, with when the
    first and the last of them fall due (first_at and last_at in --json)."""
    fields = {"handler": "handler_name", "type": "event_type"}
    if by not in fields:
        fail(f"--by {by!r}: use handler or type", EXIT_USAGE)

    async def main() -> None:
        async with connected_bus(store) as bus:
            counts = await bus.store.group_retry(fields[by], limit=limit)  # type: ignore[arg-type]
            if json:
                echo_json([count.to_dict() for count in counts])
                return
            from . import views

            title = f"retry queue by {by} — {bus.store.url}"
            views.console().print(views.count_table(counts, by, bus.clock.now(), title, due=True))

    run(main())


def stats(
    store: StoreOption = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Queue sizes (the retry queue's by kind: retries, pending and scheduled
    deliveries), retry success rate and average attempts."""

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            snapshot = await bus.stats()
            if json:
                echo_json(snapshot.to_dict())
                return
            from . import views

            views.console().print(views.stats_table(snapshot, bus.store.url))

    run(main())
