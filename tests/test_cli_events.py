"""``retrybus events``, ``retrybus events check`` and the versions in ``retrybus dlq
show`` and ``dlq requeue --data``, with tests/apps/events_app.py: like.added at v3
(v1 → v2 renames ``post`` to ``post_id``, v2 → v3 adds ``source``), also known as
social.like."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import retrybus
from retrybus import Event, EventBus
from retrybus._cli.app import app

APPS = Path(__file__).parent / "apps"
APP = "events_app:bus"
WITH_APP = ("--app", APP, "--app-dir", APPS)

runner = CliRunner()


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(arg) for arg in args], env=env)


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def write_samples(directory: Path, samples: dict[str, Any]) -> Path:
    """``samples`` by path within ``directory`` (``like.added/v1.json``), as JSON."""
    for name, payload in samples.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload), "utf-8")
    return directory


def check(samples: Path, *more: object) -> Result:
    return invoke("events", "check", APP, "--app-dir", APPS, "--samples", samples, *more)


# retrybus events ------------------------------------------------------------------


def test_events_json_lists_each_type_as_it_describes_itself() -> None:
    result = invoke("events", *WITH_APP, "--json")
    assert result.exit_code == 0, result.output
    like, comment = json.loads(result.stdout)
    assert like == {
        "type": "like.added",
        "version": 3,
        "versions": [1, 2, 3],
        "schema": "events_app.LikeAdded",
        "aliases": ["social.like"],
        "validate": "publish",
        "unknown_version": "dead_letter",
        "dataschema": "https://example.com/schemas/like.added/3",
    }
    assert (comment["type"], comment["versions"], comment["schema"]) == (
        "comment.created",
        [1],
        None,
    )


def test_events_table_shows_versions_schema_and_aliases_with_the_app_from_the_environment() -> None:
    result = invoke("events", "--app-dir", APPS, env={"RETRYBUS_APP": APP})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "like.added" in line)
    for cell in ("3", "v1..v3", "events_app.LikeAdded", "social.like", "publish"):
        assert cell in row


def test_events_without_an_app_is_a_usage_error() -> None:
    error = one_line_error(invoke("events", env={"RETRYBUS_APP": ""}), code=2)
    assert error == "Error: give --app MODULE:ATTR naming your EventBus (or set RETRYBUS_APP)"


def test_events_with_an_app_that_cannot_be_imported_is_a_usage_error() -> None:
    error = one_line_error(invoke("events", "--app", "no_such_module:bus"), code=2)
    assert "no_such_module" in error


# retrybus events check --------------------------------------------------------------


def test_check_without_samples_reports_each_chain_and_schema() -> None:
    result = invoke("events", "check", APP, "--app-dir", APPS)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "like.added v3: reads v1..v3; schema events_app.LikeAdded builds a JSON schema" in lines
    assert "comment.created v1: reads v1 only; no schema" in lines


def test_check_fails_for_a_schema_that_builds_no_json_schema() -> None:
    result = invoke("events", "check", "events_app:unbuildable", "--app-dir", APPS)
    assert result.exit_code == 1, result.output
    assert "WithOpaque builds no JSON schema: PydanticInvalidForJsonSchema" in result.stdout


def test_check_passes_samples_of_every_version_through_the_chain(tmp_path: Path) -> None:
    samples = write_samples(
        tmp_path,
        {
            "like.added/v1.json": [{"post": "7"}, {"post": "8", "source": "app"}],
            "like.added/v2/first.json": {"post_id": 3},
            "like.added/v2/second.json": {"post_id": 4},
            "social.like/v3.json": {"post_id": 5, "source": "web"},
            "comment.created/v1.json": {"text": "anything: no schema"},
        },
    )
    result = check(samples)
    assert result.exit_code == 0, result.output
    assert "like.added/v1.json[1] (like.added v1): ok" in result.stdout
    assert "like.added/v2/second.json (like.added v2): ok" in result.stdout
    assert "6 sample(s)" in result.stdout
    assert "6 ok, 0 failed" in result.stdout


def test_a_sample_the_chain_cannot_lift_fails_naming_the_step(tmp_path: Path) -> None:
    samples = write_samples(tmp_path, {"like.added/v1.json": [{"post": "7"}, {"post_id": 7}]})
    result = check(samples)
    assert result.exit_code == 1, result.output
    assert "like.added/v1.json[0] (like.added v1): ok" in result.stdout
    assert (
        "like.added/v1.json[1] (like.added v1): FAILED: upcast failed v1→v2: KeyError 'post'"
        in result.stdout
    )


def test_a_sample_that_fails_the_current_schema_fails_naming_the_field(tmp_path: Path) -> None:
    samples = write_samples(tmp_path, {"like.added/v2.json": {"post_id": "seven"}})
    result = check(samples)
    assert result.exit_code == 1, result.output
    assert "FAILED: invalid like.added v3 data: post_id:" in result.stdout


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("like.added/v4.json", "unknown version 4 of like.added (this code knows up to 3)"),
        ("like.added/v0.json", "unknown version 0 of like.added"),
        ("like.added/latest.json", "not a sample: name it v<N>.json"),
        ("comment.posted/v1.json", "'comment.posted' is no registered type"),
    ],
)
def test_a_sample_of_no_version_or_type_the_app_reads_fails(
    tmp_path: Path, name: str, error: str
) -> None:
    result = check(write_samples(tmp_path, {name: {"post_id": 1, "source": "web"}}))
    assert result.exit_code == 1, result.output
    assert error in result.stdout


def test_a_sample_file_that_is_not_json_fails(tmp_path: Path) -> None:
    (tmp_path / "like.added").mkdir()
    (tmp_path / "like.added" / "v3.json").write_text("{not json", "utf-8")
    result = check(tmp_path)
    assert result.exit_code == 1, result.output
    assert "like.added/v3.json (like.added v3): FAILED: cannot read it" in result.stdout


def test_check_json_reports_types_and_every_sample(tmp_path: Path) -> None:
    samples = write_samples(
        tmp_path, {"like.added/v1.json": [{"post": "1"}, {}], "social.like/v3.json": {}}
    )
    result = check(samples, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [t["type"] for t in report["types"]] == ["like.added", "comment.created"]
    assert report["types"][0]["versions"] == [1, 2, 3]
    assert [(s["path"], s["index"], s["version"], s["ok"]) for s in report["samples"]] == [
        ("like.added/v1.json", 0, 1, True),
        ("like.added/v1.json", 1, 1, False),
        ("social.like/v3.json", None, 3, False),
    ]
    assert report["samples"][1]["error"].startswith("upcast failed v1→v2: KeyError 'post'")


def test_check_with_a_missing_samples_directory_fails(tmp_path: Path) -> None:
    result = check(tmp_path / "missing")
    assert result.exit_code == 1, result.output
    assert "not a directory" in result.stdout


# dlq show and dlq requeue --data with the app's types -------------------------------


@pytest.fixture
def v1_dead_letter(tmp_path: Path) -> tuple[str, str]:
    """A store holding a like.added dead letter at v1 (written by a bus that
    knew no versions): its URL and the dead letter's id."""
    url = f"sqlite:///{tmp_path / 'store.db'}"

    async def main() -> str:
        async with EventBus(retrybus.open_store(url)) as bus:
            event = Event("like.added", {"post": "7"}, source="social")
            item = await bus.retry_queue.add(event, "count", TimeoutError("slow"))
            dead = await bus.dead_letters.add(item, reason="failed after 3 retries")
            await bus.retry_queue.delete(item.id)
            return dead.id

    return url, asyncio.run(main())


def test_dlq_show_with_the_app_shows_both_versions_and_the_upcast_data(
    v1_dead_letter: tuple[str, str],
) -> None:
    url, item_id = v1_dead_letter
    result = invoke("dlq", "show", item_id, "--store", url, *WITH_APP)
    assert result.exit_code == 0, result.output
    assert "stored 1, current 3" in result.stdout
    assert "as this app reads it (upcast to v3)" in result.stdout
    assert '"post_id": 7' in result.stdout
    plain = invoke("dlq", "show", item_id, "--store", url)
    assert "current 3" not in plain.stdout


def test_dlq_show_json_with_the_app_gives_the_reading(v1_dead_letter: tuple[str, str]) -> None:
    url, item_id = v1_dead_letter
    result = invoke("dlq", "show", item_id, "--store", url, *WITH_APP, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["event_data"] == {"post": "7"}
    assert shown["reading"] == {
        "type": "like.added",
        "stored_version": 1,
        "current_version": 3,
        "upcast": True,
        "data": {"post_id": 7, "source": "social"},
        "error": None,
    }
    assert "reading" not in json.loads(
        invoke("dlq", "show", item_id, "--store", url, "--json").stdout
    )


def test_dlq_requeue_data_stores_the_edit_at_the_current_version(
    v1_dead_letter: tuple[str, str],
) -> None:
    url, item_id = v1_dead_letter
    edited = {"post_id": 8, "source": "app"}
    result = invoke(
        "dlq", "requeue", item_id, "--store", url, *WITH_APP, "--data", json.dumps(edited)
    )
    assert result.exit_code == 0, result.output
    assert "with the new payload as v3" in result.stdout
    (item,) = json.loads(invoke("queue", "list", "--store", url, "--json").stdout)
    assert (item["event_data"], item["event_extensions"]["dataversion"]) == (edited, "3")
    assert item["event_type"] == "like.added"


def test_dlq_requeue_data_the_schema_refuses_is_a_usage_error_naming_the_field(
    v1_dead_letter: tuple[str, str],
) -> None:
    url, item_id = v1_dead_letter
    result = invoke(
        "dlq", "requeue", item_id, "--store", url, *WITH_APP, "--data", '{"post_id": "x"}'
    )
    assert "post_id" in one_line_error(result, code=2)
    still = json.loads(invoke("dlq", "show", item_id, "--store", url, "--json").stdout)
    assert still["event_data"] == {"post": "7"}
