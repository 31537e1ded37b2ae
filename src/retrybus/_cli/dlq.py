"""``retrybus dlq …``: browse, reprocess, requeue, delete and purge dead letters."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from .._bus import EventBus
from .._errors import ItemNotFound
from .common import AppDirOption, AppOption, JsonOption, StoreOption, fail, run
from .output import echo_json, record_to_dict
from .session import EXIT_FAILURE, EXIT_USAGE, connected_bus

__all__ = ["dlq_app"]

dlq_app = typer.Typer(
    name="dlq",
    help="Browse and act on the dead letter queue.",
    no_args_is_help=True,
)

IdArgument = Annotated[str, typer.Argument(metavar="ID", help="A dead letter id (dlq_…).")]
_PAGE = 500


@dlq_app.command("list")
def list_dead_letters(
    store: StoreOption = None,
    limit: Annotated[int, typer.Option(min=0, help="How many to show.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="How many to skip (newest first).")] = 0,
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
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """List dead letters, newest first."""

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            items = await bus.dead_letters.list(
                limit,
                offset,
                event_type=event_type,
                handler_name=handler,
                processed=processed,
            )
            if json:
                echo_json([record_to_dict(item) for item in items])
                return
            from . import views

            filtered = event_type is not None or handler is not None
            total = None if filtered else await bus.dead_letters.count(processed)
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
    item_id: IdArgument,
    store: StoreOption = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Show one dead letter in full: event, error, traceback, metadata."""

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            item = await bus.dead_letters.get(item_id)
            if json:
                echo_json(record_to_dict(item))
                return
            from . import views

            views.console().print(views.dead_letter_detail(item, bus.clock.now()))

    run(main())


@dlq_app.command("reprocess")
def reprocess_dead_letter(
    item_id: IdArgument,
    store: StoreOption = None,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
    json: JsonOption = False,
) -> None:
    """Call the dead letter's handler now (needs --app).

    On success the dead letter is marked processed; on failure it stays, with the new
    error, and the exit status is 1.
    """
    if app is None:
        fail(
            "dlq reprocess calls the handler, so it needs --app MODULE:ATTR naming your "
            "EventBus; without it use 'retrybus dlq requeue ID' and let a worker retry it",
            EXIT_USAGE,
        )

    async def main() -> bool:
        async with connected_bus(store, app, app_dir) as bus:
            before = await bus.dead_letters.get(item_id)
            bus.subscription(before.handler_name)  # UnknownHandler before the call, not after
            after = await bus.dead_letters.reprocess(item_id)
            succeeded = after.processed and after.processed_at != before.processed_at
            if json:
                echo_json({**record_to_dict(after), "reprocess_succeeded": succeeded})
            elif succeeded:
                typer.echo(
                    f"reprocessed {item_id}: {after.handler_name} succeeded; marked processed"
                )
            else:
                typer.echo(
                    f"reprocessed {item_id}: {after.handler_name} failed again: "
                    f"{after.error_type or 'error'}: {after.error}"
                )
            return succeeded

    if not run(main()):
        raise typer.Exit(EXIT_FAILURE)


@dlq_app.command("requeue")
def requeue_dead_letter(
    item_id: IdArgument,
    store: StoreOption = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Move a dead letter back to the retry queue, due now.

    It gets all its retries ahead of it, counted by the handler's policy when --app
    is given, else by the default policy (3 retries). A running worker picks it up.
    """

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            item = await bus.dead_letters.requeue(item_id)
            if json:
                echo_json(record_to_dict(item))
            else:
                typer.echo(
                    f"requeued {item_id} as {item.id}: due now for {item.handler_name}, "
                    f"{item.max_retries} retries ahead; a running worker will pick it up"
                )

    run(main())


@dlq_app.command("delete")
def delete_dead_letter(
    item_id: IdArgument,
    store: StoreOption = None,
    json: JsonOption = False,
) -> None:
    """Delete one dead letter."""

    async def main() -> None:
        async with connected_bus(store) as bus:
            await bus.dead_letters.delete(item_id)
            if json:
                echo_json({"deleted": item_id})
            else:
                typer.echo(f"deleted {item_id}")

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
    # The store deletes by age only; processed ones older than ``before`` are
    # found page by page (newest first) and deleted one by one.
    deleted = 0
    kept = 0
    while True:
        page = await bus.dead_letters.list(_PAGE, kept, processed=True)
        if not page:
            return deleted
        for item in page:
            if item.created_at < before:
                with contextlib.suppress(ItemNotFound):  # deleted meanwhile by someone else
                    await bus.dead_letters.delete(item.id)
                    deleted += 1
            else:
                kept += 1
