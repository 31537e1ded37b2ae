"""``retrybus events …``: the event types an app registers (``retrybus events``,
the same as ``list``), and ``retrybus events check APP [--samples DIR]``: its
upcaster chains and schemas, and sample payloads of each version read as a
delivery reads them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .._event_types import EventType
from .common import AppDirOption, AppOption, JsonOption, fail
from .events_check import EventsCheck, check_event_types
from .output import echo_json
from .session import EXIT_FAILURE, EXIT_USAGE, CliError, build_bus
from .typer_help import RetrybusTyper, group_defaulting_to

if TYPE_CHECKING:  # for annotations only, as in typer_help
    from .views import FittedTable

__all__ = ["events_app"]


events_app = RetrybusTyper(
    cls=group_defaulting_to("list"),
    name="events",
    help="The event types your app registers: versions, schemas, aliases "
    "(`retrybus events [--app APP]`, the same as `list`); `check` runs sample payloads "
    "of each version through the upcasters and the current schema.",
    no_args_is_help=False,
)


def _registered(app: str | None, app_dir: str, named_by: str) -> list[EventType]:
    """The event types the app's bus registers (its store is not opened: they
    need none); a usage error without an app."""
    if app is None:
        fail(f"give {named_by} naming your EventBus (or set RETRYBUS_APP)", EXIT_USAGE)
    try:
        return build_bus(None, app, app_dir).event_types
    except CliError as exc:
        fail(str(exc), exc.code)


@events_app.command("list")
def list_event_types(
    app: AppOption = None,
    app_dir: AppDirOption = ".",
    json: JsonOption = False,
) -> None:
    """List the event types APP registers: current version, the versions it reads
    (oldest..current), schema, aliases, when data is validated, dataschema."""
    types = _registered(app, app_dir, "--app MODULE:ATTR")
    if json:
        echo_json([event_type.describe() for event_type in types])
        return
    from . import views

    out = views.console()
    if not types:
        out.print(f"{app} registers no event types (bus.event_type(...))")
        return
    out.print(_types_table(types, f"event types — {app}"))


def _types_table(types: list[EventType], title: str) -> FittedTable:
    from .views import Column, FittedTable

    def readable(event_type: EventType) -> str:
        oldest, current = event_type.oldest_version, event_type.version
        return f"v{current}" if oldest == current else f"v{oldest}..v{current}"

    columns: list[Column[EventType]] = [
        Column("type", lambda t: t.name, style="cyan"),
        Column("version", lambda t: str(t.version), justify="right"),
        Column("reads", readable, drop=4),
        Column("schema", lambda t: t.schema_name or "—", wraps_to=12, drop=3),
        Column("aliases", lambda t: ", ".join(t.aliases) or "—", wraps_to=10, drop=2),
        Column("validate", lambda t: t.validate or "never", drop=5),
        Column("dataschema", lambda t: t.dataschema or "—", wraps_to=12, drop=1),
    ]
    return FittedTable(title, columns, types)


@events_app.command("check")
def check_event_types_command(
    app: Annotated[
        str | None,
        typer.Argument(
            metavar="APP",
            envvar="RETRYBUS_APP",
            help="Your EventBus, as module:attribute.",
            show_default=False,
        ),
    ] = None,
    samples: Annotated[
        Path | None,
        typer.Option(
            "--samples",
            metavar="DIR",
            help="Sample payloads per type and version: DIR/<type>/v<N>.json (one payload, "
            "or a JSON list of them) or DIR/<type>/v<N>/*.json.",
            show_default=False,
        ),
    ] = None,
    app_dir: AppDirOption = ".",
    json: JsonOption = False,
) -> None:
    """Check the event types APP registers: each upcaster chain (the oldest version
    it reads), each pydantic schema (it builds a JSON schema), and with --samples
    each sample payload, upcast from its version and validated by the current
    schema. Exit status 1 when anything fails, a sample names a type APP does not
    register or a version no chain reads."""
    types = _registered(app, app_dir, "APP (module:attribute)")
    report = check_event_types(types, samples)
    if json:
        echo_json(report.to_dict())
    else:
        _print_check(report, app or "")
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


def _print_check(report: EventsCheck, app: str) -> None:
    if not report.types:
        typer.echo(f"{app} registers no event types")
    for checked in report.types:
        reads = (
            f"reads v{checked.oldest}..v{checked.current}"
            if checked.oldest < checked.current
            else f"reads v{checked.current} only"
        )
        if checked.schema_error is not None:
            schema = f"FAILED: {checked.schema_error}"
        elif checked.schema_checked:
            schema = f"schema {checked.schema} builds a JSON schema"
        else:
            schema = f"schema {checked.schema}" if checked.schema else "no schema"
        typer.echo(f"{checked.event_type} v{checked.current}: {reads}; {schema}")
    if report.samples_dir is None:
        return
    for sample in report.samples:
        version = "" if sample.version is None else f" v{sample.version}"
        outcome = "ok" if sample.ok else f"FAILED: {sample.error}"
        typer.echo(f"{sample.where} ({sample.event_type}{version}): {outcome}")
    failed = sum(not sample.ok for sample in report.samples)
    typer.echo(
        f"{len(report.samples)} sample(s) in {report.samples_dir}: "
        f"{len(report.samples) - failed} ok, {failed} failed"
    )
