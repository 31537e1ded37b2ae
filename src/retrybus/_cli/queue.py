"""``retrybus queue …`` and ``retrybus stats``: what waits in the retry queue."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import AppDirOption, AppOption, JsonOption, StoreOption, fail, run
from .output import echo_json, record_to_dict
from .session import EXIT_USAGE, connected_bus
from .typer_help import RetrybusTyper

__all__ = ["queue_app", "stats"]

queue_app = RetrybusTyper(
    name="queue",
    help="Look at the retry queue.",
    no_args_is_help=True,
)


@queue_app.command("list")
def list_retry_items(
    store: StoreOption = None,
    limit: Annotated[int, typer.Option(min=0, metavar="N", help="How many to show.")] = 50,
    offset: Annotated[int, typer.Option(min=0, metavar="N", help="How many to skip.")] = 0,
    handler: Annotated[str | None, typer.Option(metavar="NAME", help="Only this handler.")] = None,
    event_type: Annotated[
        str | None, typer.Option(metavar="TYPE", help="Only this event type.")
    ] = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """List retry items by next retry, earliest first."""

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            items = await bus.retry_queue.list(
                limit, offset, handler_name=handler, event_type=event_type
            )
            if json:
                echo_json([record_to_dict(item) for item in items])
                return
            from . import views

            total = await bus.retry_queue.count()
            out = views.console()
            title = f"retry queue — {bus.store.url}"
            out.print(views.retry_table(items, bus.clock.now(), title))
            shown = f"{offset + 1}–{offset + len(items)}" if items else "none"
            out.print(f"showing {shown} of {total} (all handlers and types)")

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
    """Queue sizes, retry success rate and average attempts."""

    async def main() -> None:
        async with connected_bus(store, app, app_dir) as bus:
            snapshot = await bus.stats()
            if json:
                echo_json(snapshot.to_dict())
                return
            from . import views

            views.console().print(views.stats_table(snapshot, bus.store.url))

    run(main())
