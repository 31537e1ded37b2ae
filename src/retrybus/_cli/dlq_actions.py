"""``retrybus dlq requeue|reprocess|delete``: on one dead letter, on a list of ids, or
on everything matching ``--filter`` (or ``--all``) after a confirmation showing
the count. Requeue and reprocess of a filter run as a redrive (``--rate``,
``--probe``), driven here with progress; Ctrl-C pauses it."""

from __future__ import annotations

import json as jsonlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from .._bus import EventBus
from .._dead_letters import BulkResult
from .._filters import DeadLetterFilter
from .._records import RetryItem
from .._redrive import Redrive, parse_rate
from .common import EXIT_INTERRUPTED, AppDirOption, AppOption, JsonOption, StoreOption, fail, run
from .ids import DeadLetterIdsArgument, resolve_dead_letter_ids
from .output import echo_json, record_to_dict
from .selection import (
    AllOption,
    FilterOption,
    ProbeOption,
    RateOption,
    YesOption,
    actor_name,
    describe,
    drive,
    parse_filter,
)
from .session import EXIT_FAILURE, EXIT_USAGE, connected_bus

__all__ = ["delete_dead_letters", "reprocess_dead_letters", "requeue_dead_letters"]

DetachOption = Annotated[
    bool,
    typer.Option(
        "--detach",
        help="Start the redrive and return; a dashboard or 'retrybus dlq redrive resume' drives it.",
    ),
]


def _selection(
    ids: list[str] | None, filters: list[str] | None, everything: bool
) -> DeadLetterFilter | None:
    """The filter of a bulk run, or None when ids are given."""
    if ids and (filters or everything):
        fail("give dead letter ids, or --filter/--all, not both", EXIT_USAGE)
    if ids:
        return None
    if not filters and not everything:
        fail("give dead letter ids, or --filter KEY=VALUE, or --all for every one", EXIT_USAGE)
    if filters and everything:
        fail("give either --filter or --all, not both", EXIT_USAGE)
    return parse_filter(filters, datetime.now(UTC))


def _as_of_now(where: DeadLetterFilter) -> DeadLetterFilter:
    """``where`` limited to what exists now: the confirmation counts what is acted on,
    nothing created while the question waits for an answer."""
    return where.narrowed(created_before=datetime.now(UTC))


def _report_bulk(verb: str, result: BulkResult, json: bool) -> None:
    if json:
        echo_json(result.to_dict())
    else:
        typer.echo(f"{verb} {len(result.succeeded)} dead letter(s)")
        for item_id, error in result.failed.items():
            typer.echo(f"failed: {item_id}: {error}")
        if result.missing:
            typer.echo(f"not found: {', '.join(result.missing)}")
    if result.failed or result.missing:
        raise typer.Exit(EXIT_FAILURE)


async def _start_redrive(
    bus: EventBus,
    where: DeadLetterFilter,
    *,
    action: str,
    rate: str | None,
    probe: int,
    yes: bool,
    detach: bool,
    json: bool,
) -> Redrive | None:
    """Confirm, start and (unless ``detach``) drive a redrive; None when nothing matched."""
    try:
        per_second = parse_rate(rate)
    except ValueError as exc:
        fail(f"--rate: {exc}", EXIT_USAGE)
    if action == "reprocess" and where.processed is True:
        fail("reprocess takes unprocessed dead letters: drop processed=true", EXIT_USAGE)
    shown, where = where, _as_of_now(where)
    count = await bus.dead_letters.count(
        where=where.narrowed(processed=False) if action == "reprocess" else where
    )
    if count == 0:
        if json:
            echo_json({"matched": 0})
        else:
            typer.echo(f"no dead letters match {describe(shown)}")
        return None
    if not yes:
        pace = f" at {per_second:g}/s" if per_second else ""
        first = f", after a probe of {probe}" if probe else ""
        typer.confirm(
            f"{action.capitalize()} {count} dead letter(s) matching {describe(shown)}"
            f"{pace}{first} in {bus.store.url}?",
            abort=True,
            err=True,
        )
    redrive = await bus.redrives.start(
        where, action=action, rate=per_second, probe=probe, actor=actor_name()
    )
    if detach:
        return redrive
    return await drive(bus, redrive, quiet=json)


def _finish_redrive(redrive: Redrive | None, json: bool) -> None:
    if redrive is None:
        return
    if json:
        echo_json(redrive.to_dict())
    elif redrive.active:  # detached
        typer.echo(
            f"started redrive {redrive.id} ({redrive.total} item(s)); follow it with "
            f"'retrybus dlq redrive show {redrive.id}'"
        )
    elif redrive.state == "paused":
        typer.echo(
            f"paused redrive {redrive.id} after {redrive.done} of {redrive.total}; "
            f"resume with 'retrybus dlq redrive resume {redrive.id}'"
        )
    else:
        typer.echo(f"redrive {redrive.id} {redrive.state}: {redrive.message}")
    if redrive.state == "paused":
        raise typer.Exit(EXIT_INTERRUPTED)
    if redrive.state in ("stopped", "cancelled") or redrive.failed:
        raise typer.Exit(EXIT_FAILURE)


def _load_data(data: str | None, data_file: Path | None) -> Any:
    if data is not None and data_file is not None:
        fail("give either --data or --data-file, not both", EXIT_USAGE)
    if data_file is not None:
        try:
            text = (
                typer.get_text_stream("stdin").read()
                if str(data_file) == "-"
                else data_file.read_text("utf-8")
            )
        except OSError as exc:
            fail(f"--data-file {str(data_file)!r}: {exc.strerror or exc}", EXIT_USAGE)
    else:
        assert data is not None
        text = data
    try:
        return jsonlib.loads(text)
    except ValueError as exc:
        fail(f"the new payload is not valid JSON: {exc}", EXIT_USAGE)


def _at_version(item: RetryItem) -> str:
    """`` as v3`` when an edit was stored at its type's current version."""
    edits = item.metadata.get("edits")
    last = edits[-1] if isinstance(edits, list) and edits else None
    return f" as v{last['version']}" if isinstance(last, dict) and "version" in last else ""


def requeue_dead_letters(
    ids: DeadLetterIdsArgument = None,
    store: StoreOption = None,
    filters: FilterOption = None,
    everything: AllOption = False,
    rate: RateOption = None,
    probe: ProbeOption = 0,
    yes: YesOption = False,
    detach: DetachOption = False,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            metavar="JSON",
            help="Edit and requeue: replace the event's payload with this JSON first "
            "(one ID; the original is kept in the item's metadata). With an --app that "
            "registers the event's type, this is the payload at its current version "
            "(as 'dlq show ID --app APP' shows it), checked against its schema.",
            show_default=False,
        ),
    ] = None,
    data_file: Annotated[
        Path | None,
        typer.Option(
            "--data-file",
            metavar="PATH",
            help="As --data, read from PATH (- for stdin).",
            show_default=False,
        ),
    ] = None,
    json: JsonOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
) -> None:
    """Move dead letters back to the retry queue, due now.

    Each gets all its retries ahead of it, counted by the handler's policy when --app
    is given, else by the default policy (3 retries); a running worker picks them up.
    With --filter or --all this is a redrive: after a confirmation showing the count,
    at most --rate items per second, optionally after a --probe.
    """
    where = _selection(ids, filters, everything)
    editing = data is not None or data_file is not None
    if where is None and (rate is not None or probe):
        fail("--rate and --probe apply to --filter and --all", EXIT_USAGE)
    if editing and (where is not None or len(ids or []) != 1):
        fail("--data and --data-file edit one dead letter: give exactly one ID", EXIT_USAGE)
    payload = _load_data(data, data_file) if editing else None

    async def main() -> Redrive | None:
        async with connected_bus(store, app, app_dir) as bus:
            if where is not None:
                return await _start_redrive(
                    bus,
                    where,
                    action="requeue",
                    rate=rate,
                    probe=probe,
                    yes=yes,
                    detach=detach,
                    json=json,
                )
            assert ids
            targets = await resolve_dead_letter_ids(bus, ids)
            if len(targets) > 1:
                _report_bulk(
                    "requeued",
                    await bus.dead_letters.requeue_many(targets, actor=actor_name()),
                    json,
                )
                return None
            (target,) = targets
            if editing:
                try:
                    item = await bus.dead_letters.requeue(target, data=payload, actor=actor_name())
                except ValueError as exc:  # the type's schema refuses the new payload
                    fail(str(exc), EXIT_USAGE)
            else:
                item = await bus.dead_letters.requeue(target, actor=actor_name())
            if json:
                echo_json(record_to_dict(item))
            else:
                edited = f" with the new payload{_at_version(item)}" if editing else ""
                typer.echo(
                    f"requeued {target} as {item.id}{edited}: due now for {item.handler_name}, "
                    f"{item.max_retries} retries ahead; a running worker will pick it up"
                )
            return None

    _finish_redrive(run(main()), json)


def reprocess_dead_letters(
    ids: DeadLetterIdsArgument = None,
    store: StoreOption = None,
    filters: FilterOption = None,
    everything: AllOption = False,
    rate: RateOption = None,
    probe: ProbeOption = 0,
    yes: YesOption = False,
    app: AppOption = None,
    app_dir: AppDirOption = ".",
    json: JsonOption = False,
) -> None:
    """Call the dead letters' handlers now (needs --app).

    On success a dead letter is marked processed; on failure it stays, with the new
    error, and the exit status is 1. With --filter or --all: every unprocessed one
    matching, after a confirmation, at most --rate per second, optionally after a
    --probe of N that must all succeed.
    """
    if app is None:
        fail(
            "dlq reprocess calls the handler, so it needs --app MODULE:ATTR naming your "
            "EventBus; without it use 'retrybus dlq requeue ID' and let a worker retry it",
            EXIT_USAGE,
        )
    where = _selection(ids, filters, everything)
    if where is None and (rate is not None or probe):
        fail("--rate and --probe apply to --filter and --all", EXIT_USAGE)

    async def main() -> tuple[bool, Redrive | None]:
        async with connected_bus(store, app, app_dir) as bus:
            if where is not None:
                redrive = await _start_redrive(
                    bus,
                    where,
                    action="reprocess",
                    rate=rate,
                    probe=probe,
                    yes=yes,
                    detach=False,
                    json=json,
                )
                return True, redrive
            assert ids
            targets = await resolve_dead_letter_ids(bus, ids)
            if len(targets) > 1:
                _report_bulk(
                    "reprocessed",
                    await bus.dead_letters.reprocess_many(targets, actor=actor_name()),
                    json,
                )
                return True, None
            (item_id,) = targets
            before = await bus.dead_letters.get(item_id)
            bus.subscription(before.handler_name)  # UnknownHandler before the call, not after
            after, succeeded = await bus.dead_letters.attempt_reprocess(item_id, actor=actor_name())
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
            return succeeded, None

    succeeded, redrive = run(main())
    _finish_redrive(redrive, json)
    if not succeeded:
        raise typer.Exit(EXIT_FAILURE)


async def _delete_by_id(bus: EventBus, targets: list[str], json: bool) -> None:
    if len(targets) == 1:
        await bus.dead_letters.delete(targets[0])
        if json:
            echo_json({"deleted": targets[0]})
        else:
            typer.echo(f"deleted {targets[0]}")
        return
    deleted = await bus.dead_letters.delete_many(targets)
    if json:
        echo_json({"deleted": deleted})
    else:
        typer.echo(f"deleted {deleted} dead letter(s)")
    if deleted < len(targets):  # some were deleted by someone else meanwhile
        raise typer.Exit(EXIT_FAILURE)


def delete_dead_letters(
    ids: DeadLetterIdsArgument = None,
    store: StoreOption = None,
    filters: FilterOption = None,
    everything: AllOption = False,
    yes: YesOption = False,
    json: JsonOption = False,
) -> None:
    """Delete dead letters: by id, or every one matching --filter (or --all) after a
    confirmation showing the count. Those created after the count are kept."""
    where = _selection(ids, filters, everything)

    async def main() -> None:
        async with connected_bus(store) as bus:
            if where is None:
                assert ids
                await _delete_by_id(bus, await resolve_dead_letter_ids(bus, ids), json)
                return
            acted = _as_of_now(where)
            count = await bus.dead_letters.count(where=acted)
            if count and not yes:
                typer.confirm(
                    f"Delete {count} dead letter(s) matching {describe(where)} from "
                    f"{bus.store.url}?",
                    abort=True,
                    err=True,
                )
            deleted = await bus.dead_letters.delete_matching(acted) if count else 0
            if json:
                echo_json({"deleted": deleted})
            else:
                typer.echo(f"deleted {deleted} dead letter(s)")

    run(main())
