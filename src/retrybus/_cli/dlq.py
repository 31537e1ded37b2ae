"""``retrybus dlq …``: browse, reprocess, requeue, delete and purge dead letters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from .._bus import EventBus
from .._filters import DeadLetterFilter
from .common import AppDirOption, AppOption, JsonOption, StoreOption, fail, run
from .dlq_actions import delete_dead_letters, reprocess_dead_letters, requeue_dead_letters
from .ids import DeadLetterIdArgument, resolve_dead_letter_id
from .output import echo_json, reading_to_dict, record_to_dict
from .redrive import redrive_app
from .selection import FilterOption, describe, parse_filter
from .session import EXIT_USAGE, connected_bus
from .typer_help import RetrybusTyper

__all__ = ["dlq_app"]

dlq_app = RetrybusTyper(
    name="dlq",
    help="Browse and act on the dead letter queue.",
    no_args_is_help=True,
)

dlq_app.command("requeue")(requeue_dead_letters)
dlq_app.command("reprocess")(reprocess_dead_letters)
dlq_app.command("delete")(delete_dead_letters)
dlq_app.add_typer(redrive_app)


@dlq_app.command("list")
def list_dead_letters(
    store: StoreOption = None,
    limit: Annotated[int, typer.Option(min=0, metavar="N", help="How many to show.")] = 50,
    offset: Annotated[
        int, typer.Option(min=0, metavar="N", help="How many to skip (newest first).")
    ] = 0,
    event_type: Annotated[
        str | None, typer.Option(metavar="TYPE", help="Only this event type.")
    ] = None,
    handler: Annotated[str | None, typer.Option(metavar="NAME", help="Only this handler.")] = None,
    processed: Annotated[
        bool | None,
        typer.Option(
            "--processed/--unprocessed",
            help="Only processed (or only unprocessed) dead letters.",
            show_default=False,
        ),
    ] = None,
    filters: FilterOption = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """List dead letters, newest first."""
    where = parse_filter(filters, datetime.now(UTC)) if filters else DeadLetterFilter()

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            selected = where.narrowed(
                **{
                    name: value
                    for name, value in (
                        ("event_type", event_type),
                        ("handler_name", handler),
                        ("processed", processed),
                    )
                    if value is not None
                }
            )
            items = await bus.dead_letters.list(limit, offset, where=selected)
            if json:
                echo_json([record_to_dict(item) for item in items])
                return
            from . import views

            total = await bus.dead_letters.count(where=selected)
            title = f"dead letters — {bus.store.url}"
            out = views.console()
            out.print(views.dead_letter_table(items, bus.clock.now(), title))
            shown = f"{offset + 1}–{offset + len(items)}" if items else "none"
            of = "" if total is None else f" of {total}"
            more = (
                f"; --offset {offset + len(items)} for more"
                if len(items) == limit and limit and (total is None or offset + limit < total)
                else ""
            )
            out.print(f"showing {shown}{of}{more}")

    run(main())


@dlq_app.command("show")
def show_dead_letter(
    item_id: DeadLetterIdArgument,
    store: StoreOption = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Print the event data, metadata and traceback whole, however long "
            "(else the first 64 KB of each; --json is always whole).",
        ),
    ] = False,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Show one dead letter: event, error, traceback, metadata (the first 64 KB of
    each of the last three, unless --full).

    With an --app that registers the event's type: its stored and current
    versions, and the data as the handler gets it (upcast), or why it cannot be
    read (in --json: "reading")."""

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            item = await bus.dead_letters.get(await resolve_dead_letter_id(bus, item_id))
            reading = await bus.dead_letters.reading(item)
            known = reading.current_version is not None
            if json:
                shown = record_to_dict(item)
                echo_json({**shown, "reading": reading_to_dict(reading)} if known else shown)
                return
            from . import views

            views.console().print(
                views.dead_letter_detail(
                    item, bus.clock.now(), full=full, reading=reading if known else None
                )
            )

    run(main())


@dlq_app.command("groups")
def dead_letter_groups(
    store: StoreOption = None,
    by: Annotated[
        str,
        typer.Option(
            metavar="FIELD",
            help="failure (handler + error type + message shape), handler, type or reason.",
        ),
    ] = "failure",
    filters: FilterOption = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="How many groups to show.")] = 50,
    json: JsonOption = False,
) -> None:
    """Dead letters grouped, largest group first: one bad deploy is one row.

    A failure group's key selects its dead letters in other commands:
    `retrybus dlq requeue --filter group=KEY`.
    """
    fields = {
        "failure": "failure_group",
        "handler": "handler_name",
        "type": "event_type",
        "reason": "reason",
    }
    if by not in fields:
        fail(f"--by {by!r}: use one of {', '.join(fields)}", EXIT_USAGE)
    where = parse_filter(filters, datetime.now(UTC))

    async def main() -> None:
        async with connected_bus(store) as bus:
            now = bus.clock.now()
            from . import views

            if by == "failure":
                groups = await bus.dead_letters.groups(where, limit=limit)
                if json:
                    echo_json([group.to_dict() for group in groups])
                    return
                title = f"failure groups ({describe(where)}) — {bus.store.url}"
                views.console().print(views.failure_group_table(groups, now, title))
                return
            counts = await bus.dead_letters.counts_by(fields[by], where, limit=limit)
            if json:
                echo_json([count.to_dict() for count in counts])
                return
            title = f"dead letters by {by} ({describe(where)}) — {bus.store.url}"
            views.console().print(views.count_table(counts, by, now, title))

    run(main())


@dlq_app.command("purge")
def purge_dead_letters(
    store: StoreOption = None,
    before_days: Annotated[
        float | None,
        typer.Option(
            min=0,
            metavar="DAYS",
            help="Delete dead letters created more than DAYS days ago "
            "(default: the 30-day retention).",
            show_default=False,
        ),
    ] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="Delete every dead letter.")] = False,
    processed: Annotated[
        bool, typer.Option("--processed", help="Delete only processed dead letters.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json: JsonOption = False,
) -> None:
    """Delete dead letters by age (all of them with --all)."""
    if purge_all and before_days is not None:
        fail("give either --before-days or --all, not both", EXIT_USAGE)
    if store is None:
        fail("give --store URL (or set RETRYBUS_STORE)", EXIT_USAGE)
    now = datetime.now(UTC)
    if purge_all:
        before = datetime.max.replace(tzinfo=UTC)
        what = "ALL dead letters"
    else:
        days = 30.0 if before_days is None else before_days
        before = now - timedelta(days=days)
        what = (
            f"dead letters created more than {days:g} days ago (before {before:%Y-%m-%d %H:%M} UTC)"
        )
    if processed:
        what = f"processed {what}"

    if not yes:
        typer.confirm(f"Delete {what} from {store}?", abort=True, err=True)

    async def main() -> int:
        async with connected_bus(store) as bus:
            if processed:
                return await _purge_processed(bus, before)
            return await bus.dead_letters.cleanup(before)

    deleted = run(main())
    if json:
        echo_json({"deleted": deleted})
    else:
        typer.echo(f"deleted {deleted} dead letter(s)")


async def _purge_processed(bus: EventBus, before: datetime) -> int:
    where = DeadLetterFilter(processed=True)
    if before < datetime.max.replace(tzinfo=UTC):
        where = where.narrowed(created_before=before)
    return await bus.dead_letters.delete_matching(where)
