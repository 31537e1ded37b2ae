"""``retrybus dlq redrive …``: follow and steer redrives (bulk requeues and reprocesses
started by ``dlq requeue --filter`` or from the dashboard)."""

from __future__ import annotations

from typing import Annotated

import typer

from .._redrive import Redrive
from .common import EXIT_INTERRUPTED, AppDirOption, AppOption, JsonOption, StoreOption, run
from .ids import RedriveIdArgument, resolve_redrive_id
from .output import echo_json
from .selection import describe, drive
from .session import EXIT_FAILURE, CliError, connected_bus
from .typer_help import RetrybusTyper

__all__ = ["redrive_app"]

redrive_app = RetrybusTyper(
    name="redrive",
    help="Follow, pause, resume and cancel redrives (bulk requeues of dead letters).",
    no_args_is_help=True,
)


def _line(redrive: Redrive) -> str:
    rate = f"{redrive.rate:g}/s" if redrive.rate else "no limit"
    probe = f"probe {redrive.probe}"
    if redrive.probe and redrive.action == "requeue":
        probe += f" (waits {redrive.probe_limit})"
    return (
        f"{redrive.id}  {redrive.action} {redrive.state:<9} {redrive.done}/{redrive.total} done"
        f"{f', {redrive.failed} failed' if redrive.failed else ''}  [{describe(redrive.where)}]"
        f"  {rate}, {probe}  by {redrive.created_by or '?'}  — {redrive.message}"
    )


@redrive_app.command("list")
def list_redrives(store: StoreOption = None, json: JsonOption = False) -> None:
    """Every redrive the store keeps, newest first."""

    async def main() -> None:
        async with connected_bus(store) as bus:
            redrives = await bus.redrives.list()
            if json:
                echo_json([r.to_dict() for r in redrives])
            elif not redrives:
                typer.echo("no redrives")
            else:
                for redrive in redrives:
                    typer.echo(_line(redrive))

    run(main())


@redrive_app.command("show")
def show_redrive(
    redrive_id: RedriveIdArgument, store: StoreOption = None, json: JsonOption = False
) -> None:
    """One redrive: its filter, rate, probe, progress and state."""

    async def main() -> None:
        async with connected_bus(store) as bus:
            redrive = await bus.redrives.get(await resolve_redrive_id(bus, redrive_id))
            if json:
                echo_json(redrive.to_dict())
            else:
                typer.echo(_line(redrive))

    run(main())


def _steer(verb: str, redrive_id: str, store: str | None, json: bool) -> None:
    async def main() -> None:
        async with connected_bus(store) as bus:
            change = {"pause": bus.redrives.pause, "cancel": bus.redrives.cancel}[verb]
            target = await resolve_redrive_id(bus, redrive_id)
            try:
                redrive = await change(target)
            except ValueError as exc:
                raise CliError(str(exc)) from None
            if json:
                echo_json(redrive.to_dict())
            else:
                typer.echo(_line(redrive))

    run(main())


@redrive_app.command("pause")
def pause_redrive(
    redrive_id: RedriveIdArgument, store: StoreOption = None, json: JsonOption = False
) -> None:
    """Pause a redrive; it keeps its progress."""
    _steer("pause", redrive_id, store, json)


@redrive_app.command("cancel")
def cancel_redrive(
    redrive_id: RedriveIdArgument, store: StoreOption = None, json: JsonOption = False
) -> None:
    """Cancel a redrive for good (what it requeued stays requeued)."""
    _steer("cancel", redrive_id, store, json)


@redrive_app.command("resume")
def resume_redrive(
    redrive_id: RedriveIdArgument,
    store: StoreOption = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Only mark it resumed; let a dashboard drive it.")
    ] = False,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Resume a paused redrive (or take over an active one whose runner is gone) and
    drive it here until it ends; Ctrl-C pauses it again. Reprocess redrives need --app."""

    async def main() -> Redrive:
        async with connected_bus(store, app, app_dir) as bus:
            redrive = await bus.redrives.get(await resolve_redrive_id(bus, redrive_id))
            if redrive.state == "paused":
                redrive = await bus.redrives.resume(redrive.id)
            elif not redrive.active:
                raise CliError(f"redrive {redrive.id} is {redrive.state}: nothing to resume")
            if redrive.action == "reprocess" and app is None:
                raise CliError(
                    "this redrive reprocesses: give --app MODULE:ATTR naming your EventBus"
                )
            if detach:
                return redrive
            return await drive(bus, redrive, quiet=json)

    redrive = run(main())
    if json:
        echo_json(redrive.to_dict())
    else:
        typer.echo(_line(redrive))
    if redrive.state == "paused":
        raise typer.Exit(EXIT_INTERRUPTED)
    if redrive.state in ("stopped", "cancelled") or redrive.failed:
        raise typer.Exit(EXIT_FAILURE)


@redrive_app.command("delete")
def delete_redrive(
    redrive_id: RedriveIdArgument, store: StoreOption = None, json: JsonOption = False
) -> None:
    """Forget a finished redrive."""

    async def main() -> None:
        async with connected_bus(store) as bus:
            target = await resolve_redrive_id(bus, redrive_id)
            try:
                await bus.redrives.delete(target)
            except ValueError as exc:
                raise CliError(str(exc)) from None
            if json:
                echo_json({"deleted": target})
            else:
                typer.echo(f"deleted redrive {target}")

    run(main())
