"""What the command line shows people: tables that keep ids whole in narrow
terminals, ids given by a unique start, huge payloads cut to a readable size,
and help without placeholders beside flags."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from rich.cells import cell_len
from rich.console import Console
from typer.core import TyperGroup

from retrybus import DeadLetterFilter, Event, EventBus, PermanentError
from retrybus._cli import views
from retrybus._cli.app import app
from test_cli import WITH_APP, Seeded, _seed, invoke, json_of, ok, one_line_error, with_bus

WIDTHS = [60, 80, 100]
LONG_HANDLER = "AccountingLedgerSynchronisationHandler"
LONG_ERROR = (
    "could not post to https://ledger.example.com/api/v2/accounts/8812/entries?batch=77 "
    "after the upstream answered 503 Service Unavailable for the third time today"
)


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    """The CLI tests' store, plus a dead letter with a long handler name, event type and error."""
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    seeded = asyncio.run(_seed(url, tmp_path / "calls.jsonl"))

    async def add_long_one(bus: EventBus) -> None:
        @bus.handler("ledger.entry.posted.to.the.accounting.system", name=LONG_HANDLER)
        async def post(event: Event) -> None:
            raise PermanentError(LONG_ERROR)

        await bus.publish(Event("ledger.entry.posted.to.the.accounting.system", {"n": 1}))

    with_bus(url, add_long_one)
    return seeded


def remaining(url: str) -> set[str]:
    where = DeadLetterFilter()
    return {d.id for d in with_bus(url, lambda bus: bus.dead_letters.list(1000, where=where))}


def all_dead_letter_ids(url: str) -> list[str]:
    return [d.id for d in with_bus(url, lambda bus: bus.dead_letters.list(1000))]


# tables in narrow terminals ----------------------------------------------------------------


def shown_at(width: int, monkeypatch: pytest.MonkeyPatch, *args: object) -> list[str]:
    """The lines a command prints on a terminal ``width`` columns wide."""
    monkeypatch.setattr(views, "console", lambda stderr=False: Console(width=width))
    lines = ok(*args).stdout.splitlines()
    too_wide = [line for line in lines if cell_len(line) > width]
    assert not too_wide, "\n".join(lines)
    return lines


def whole_on_a_line(value: str, lines: list[str]) -> bool:
    return any(value in line for line in lines)


@pytest.mark.parametrize("width", WIDTHS)
def test_dlq_list_keeps_every_id_whole_and_fits_the_width(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    lines = shown_at(width, monkeypatch, "dlq", "list", "--store", seeded.url)
    ids = all_dead_letter_ids(seeded.url)
    assert len(ids) == 6
    assert [i for i in ids if not whole_on_a_line(i, lines)] == [], "\n".join(lines)
    assert "showing 1–6 of 6" in lines[-1]


def test_dlq_list_at_80_columns_keeps_the_handler_and_the_error(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = shown_at(80, monkeypatch, "dlq", "list", "--store", seeded.url)
    header = next(line for line in lines if " id " in line)
    assert header.split() == ["┃", "id", "┃", "handler", "┃", "error", "┃", "processed", "┃"]


def test_dlq_list_in_a_wide_terminal_shows_every_column(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = next(
        line
        for line in shown_at(200, monkeypatch, "dlq", "list", "--store", seeded.url)
        if " id " in line
    )
    for column in ("created", "event type", "handler", "retries", "reason", "error", "processed"):
        assert column in header


@pytest.mark.parametrize("width", WIDTHS)
def test_queue_list_keeps_every_id_whole_and_fits_the_width(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    lines = shown_at(width, monkeypatch, "queue", "list", "--store", seeded.url)
    assert all(whole_on_a_line(i, lines) for i in seeded.retry_items), "\n".join(lines)


@pytest.mark.parametrize("width", WIDTHS)
def test_dlq_groups_keeps_every_group_key_whole_and_fits_the_width(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    keys = [g["key"] for g in json_of("dlq", "groups", "--store", seeded.url)]
    assert len(keys) == 3
    lines = shown_at(width, monkeypatch, "dlq", "groups", "--store", seeded.url)
    assert all(whole_on_a_line(key, lines) for key in keys), "\n".join(lines)
    assert "--filter group=" in "\n".join(lines)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("by", ["handler", "reason"])
def test_dlq_groups_by_a_field_keeps_each_value_whole_and_fits_the_width(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, width: int, by: str
) -> None:
    keys = [c["key"] for c in json_of("dlq", "groups", "--store", seeded.url, "--by", by)]
    lines = shown_at(width, monkeypatch, "dlq", "groups", "--store", seeded.url, "--by", by)
    assert all(whole_on_a_line(key, lines) for key in keys), "\n".join(lines)


# ids given by a unique start -------------------------------------------------------------


def unique_start(item_id: str) -> str:
    return item_id[:-4]  # the last hex digits of an id are random


def test_dlq_show_takes_a_unique_start_of_an_id(seeded: Seeded) -> None:
    target = seeded.old[1]
    assert json_of("dlq", "show", unique_start(target), "--store", seeded.url)["id"] == target
    assert target in ok("dlq", "show", unique_start(target), "--store", seeded.url).stdout


def test_an_ambiguous_start_is_refused_listing_the_matches(seeded: Seeded) -> None:
    for command in (["dlq", "show"], ["dlq", "requeue"], ["dlq", "delete"]):
        message = one_line_error(invoke(*command, "dlq_", "--store", seeded.url))
        assert "'dlq_' starts more than one id" in message
        assert all(item_id in message for item_id in seeded.old + seeded.recent)
    assert len(remaining(seeded.url)) == 6


def test_dlq_requeue_resolves_each_id_before_changing_anything(seeded: Seeded) -> None:
    given = [unique_start(seeded.old[0]), "dlq_nope", unique_start(seeded.old[1])]
    message = one_line_error(invoke("dlq", "requeue", *given, "--store", seeded.url))
    assert "no item with id 'dlq_nope'" in message
    assert "nothing was changed" in message
    assert len(remaining(seeded.url)) == 6
    requeued = json_of("dlq", "requeue", *given[::2], "--store", seeded.url)
    assert sorted(requeued["succeeded"]) == sorted(seeded.old[:2])
    assert remaining(seeded.url).isdisjoint(seeded.old[:2])


def test_dlq_requeue_of_one_start_names_the_full_id(seeded: Seeded) -> None:
    out = ok("dlq", "requeue", unique_start(seeded.old[2]), "--store", seeded.url).stdout
    assert out.startswith(f"requeued {seeded.old[2]} as retry_")


def test_dlq_delete_takes_starts_and_refuses_an_ambiguous_one_first(seeded: Seeded) -> None:
    given = [unique_start(seeded.recent[0]), "dlq_"]
    assert "starts more than one id" in one_line_error(
        invoke("dlq", "delete", *given, "--store", seeded.url)
    )
    assert len(remaining(seeded.url)) == 6
    both = (given[0], seeded.recent[0])  # one dead letter, given twice, deleted once
    assert json_of("dlq", "delete", *both, "--store", seeded.url) == {"deleted": seeded.recent[0]}
    assert seeded.recent[0] not in remaining(seeded.url)
    out = ok("dlq", "delete", unique_start(seeded.recent[1]), "--store", seeded.url).stdout
    assert out.strip() == f"deleted {seeded.recent[1]}"


def test_dlq_reprocess_takes_a_unique_start(seeded: Seeded) -> None:
    item = json_of(
        "dlq", "reprocess", unique_start(seeded.healthy), "--store", seeded.url, *WITH_APP
    )
    assert (item["id"], item["reprocess_succeeded"]) == (seeded.healthy, True)


def test_an_empty_id_is_a_usage_error(seeded: Seeded) -> None:
    assert "empty" in one_line_error(invoke("dlq", "show", "", "--store", seeded.url), code=2)
    assert "empty" in one_line_error(
        invoke("dlq", "redrive", "show", "", "--store", seeded.url), code=2
    )


def test_redrive_commands_take_a_unique_start_and_refuse_an_ambiguous_one(
    seeded: Seeded,
) -> None:
    def start(handler: str) -> str:
        options = ("--detach", "--yes", "--probe", "1", "-f", f"handler={handler}")
        return str(json_of("dlq", "requeue", "--store", seeded.url, *options)["id"])

    first, second = start("FeedUpdateHandler"), start("CommentNotificationHandler")
    for verb in ("show", "pause", "resume", "cancel", "delete"):
        message = one_line_error(invoke("dlq", "redrive", verb, "redrive_", "--store", seeded.url))
        assert "'redrive_' starts more than one id" in message
        assert first in message
        assert second in message
    short = unique_start(first)
    assert json_of("dlq", "redrive", "show", short, "--store", seeded.url)["id"] == first
    assert json_of("dlq", "redrive", "pause", short, "--store", seeded.url)["state"] == "paused"
    resumed = json_of("dlq", "redrive", "resume", short, "--store", seeded.url, "--detach")
    assert resumed["state"] == "probing"
    assert json_of("dlq", "redrive", "cancel", short, "--store", seeded.url)["state"] == "cancelled"
    assert ok("dlq", "redrive", "delete", short, "--store", seeded.url).stdout.strip() == (
        f"deleted redrive {first}"
    )
    assert [r["id"] for r in json_of("dlq", "redrive", "list", "--store", seeded.url)] == [second]
    assert "no item with id 'redrive_nope'" in one_line_error(
        invoke("dlq", "redrive", "cancel", "redrive_nope", "--store", seeded.url)
    )


# huge payloads -------------------------------------------------------------------------------


def add_dead_letter(url: str, data: Any, *, traceback: str = "", metadata: Any = None) -> str:
    """A dead letter of ``data`` (with this traceback and metadata, when given); its id."""

    async def add(bus: EventBus) -> str:
        @bus.handler("blob.stored", name="BlobHandler")
        async def store_blob(event: Event) -> None:
            raise PermanentError("blob store is read-only")

        await bus.publish(Event("blob.stored", data))
        (item,) = await bus.dead_letters.list(handler_name="BlobHandler")
        if traceback or metadata:
            changed = dataclasses.replace(
                item, traceback=traceback or item.traceback, metadata=metadata or item.metadata
            )
            assert await bus.store.update_dead(changed)
        return str(item.id)

    return str(with_bus(url, add))


@pytest.fixture
def blobs(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'blobs.db'}"


def test_dlq_show_of_a_10_mb_payload_prints_its_first_64_kb(blobs: str) -> None:
    data = {"rows": [{"n": n, "text": "x" * 100} for n in range(100_000)]}
    item_id = add_dead_letter(blobs, data)
    out = ok("dlq", "show", item_id, "--store", blobs).stdout
    assert len(out) < 80 * 1024
    assert '"rows": [' in out
    assert "--full prints all of it" in out
    assert "MB" in out
    item = json_of("dlq", "show", item_id, "--store", blobs)
    assert item["event_data"] == data


def test_dlq_show_cuts_a_huge_traceback_and_metadata_and_full_prints_all(blobs: str) -> None:
    data = {"blob": "d" * 100_000}
    traceback = "Traceback (most recent call last):\n" + "  t\n" * 25_000
    metadata = {"note": "m" * 100_000}
    item_id = add_dead_letter(blobs, data, traceback=traceback, metadata=metadata)
    cut = ok("dlq", "show", item_id, "--store", blobs).stdout
    assert len(cut) < 3 * 70 * 1024
    assert cut.count("--full prints all of it") == 3
    whole = ok("dlq", "show", item_id, "--store", blobs, "--full").stdout
    assert "--full" not in whole
    unwrapped = "".join(whole.split())  # long lines are wrapped at the console's width
    assert "d" * 100_000 in unwrapped
    assert "m" * 100_000 in unwrapped
    assert whole.count("  t\n") == 25_000


def test_dlq_show_prints_a_small_payload_whole_without_a_note(seeded: Seeded) -> None:
    out = ok("dlq", "show", seeded.old[0], "--store", seeded.url).stdout
    assert '"comment_id":' in out
    assert "--full" not in out


# help ----------------------------------------------------------------------------------------


def command_paths() -> Iterator[list[str]]:
    """Every command and group of the app, as the words that name it."""

    def walk(command: Any, path: list[str]) -> Iterator[list[str]]:
        yield path
        if isinstance(command, TyperGroup):
            for name, sub in sorted(command.commands.items()):
                if name != "worker":  # its own argparse help, outside Typer
                    yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


PLACEHOLDER = re.compile(r"<[a-z][^<>\n]*>")  # Typer's types: <bool>, <str>, <int range>


@pytest.mark.parametrize("path", list(command_paths()), ids=" ".join)
def test_help_shows_no_type_placeholders(path: list[str]) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert PLACEHOLDER.findall(result.output) == [], result.output
    assert "[[" not in result.output
    assert "]...]" not in result.output


def test_help_of_id_arguments_says_a_unique_start_will_do() -> None:
    from typer.testing import CliRunner

    for path in (["dlq", "show"], ["dlq", "requeue"], ["dlq", "redrive", "pause"]):
        out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        assert "unique start" in out, out
