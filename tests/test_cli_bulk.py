"""The command line's bulk side: failure groups, --filter on list, requeue, reprocess
and delete, redrives with --rate and --probe (and their pause, resume and cancel),
edit-and-requeue, and the retry queue's breakdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from retrybus import DeadLetterFilter
from test_cli import WITH_APP, Seeded, _seed, invoke, json_of, ok, one_line_error, with_bus


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    return asyncio.run(_seed(f"sqlite:///{tmp_path / 'queues.db'}", tmp_path / "calls.jsonl"))


def remaining(url: str, **fields: object) -> set[str]:
    where = DeadLetterFilter(**fields)  # type: ignore[arg-type]
    return {d.id for d in with_bus(url, lambda bus: bus.dead_letters.list(1000, where=where))}


# groups and filters --------------------------------------------------------------------


def test_dlq_groups_shows_one_row_per_failure(seeded: Seeded) -> None:
    groups = json_of("dlq", "groups", "--store", seeded.url)
    assert [(g["handler_name"], g["error_type"], g["shape"], g["count"]) for g in groups] == [
        ("CommentNotificationHandler", "ConnectionError", "email service unavailable", 3),
        ("FeedUpdateHandler", "retrybus._errors.PermanentError", "post was deleted", 2),
    ]
    out = ok("dlq", "groups", "--store", seeded.url).stdout
    assert "email service unavailable" in out
    assert groups[0]["key"] in out


def test_dlq_groups_by_another_field_with_a_filter(seeded: Seeded) -> None:
    counts = json_of(
        "dlq", "groups", "--store", seeded.url, "--by", "handler", "--filter", "processed=false"
    )
    assert [(c["key"], c["count"]) for c in counts] == [
        ("CommentNotificationHandler", 3),
        ("FeedUpdateHandler", 1),
    ]
    assert "--by 'colour'" in one_line_error(
        invoke("dlq", "groups", "--store", seeded.url, "--by", "colour"), code=2
    )


def test_dlq_list_takes_filters(seeded: Seeded) -> None:
    listed = json_of("dlq", "list", "--store", seeded.url, "-f", "reason=failed after 3 retries")
    assert {d["id"] for d in listed} == set(seeded.old)
    group = json_of("dlq", "groups", "--store", seeded.url)[1]["key"]
    by_group = json_of("dlq", "list", "--store", seeded.url, "--filter", f"group={group}")
    assert {d["id"] for d in by_group} == set(seeded.recent)
    recent = json_of("dlq", "list", "--store", seeded.url, "--filter", "since=1h")
    assert {d["id"] for d in recent} == set(seeded.recent)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("colour=red", "unknown filter 'colour'"),
        ("processed=maybe", "must be true or false"),
        ("since=yesterday", "not a time: 'yesterday'"),
        ("handler", "expected KEY=VALUE"),
        ("handler=", "has an empty value"),
        ("since=100000000d", "reaches past the calendar"),
    ],
)
def test_a_bad_filter_is_a_one_line_usage_error(seeded: Seeded, option: str, says: str) -> None:
    assert says in one_line_error(
        invoke("dlq", "list", "--store", seeded.url, "-f", option), code=2
    )


# bulk requeue: a redrive -----------------------------------------------------------------


def test_requeue_by_filter_runs_a_redrive_to_the_end(seeded: Seeded) -> None:
    redrive = json_of(
        "dlq",
        "requeue",
        "--store",
        seeded.url,
        "--filter",
        "handler=CommentNotificationHandler",
        "--rate",
        "1000/s",
        "--yes",
    )
    assert (redrive["state"], redrive["done"], redrive["total"]) == ("completed", 3, 3)
    assert redrive["rate"] == 1000.0
    assert remaining(seeded.url) == set(seeded.recent)
    queued = with_bus(seeded.url, lambda bus: bus.retry_queue.list(100))
    assert len(queued) == len(seeded.retry_items) + 3


def test_requeue_by_filter_asks_first_showing_the_count(seeded: Seeded) -> None:
    refused = invoke(
        "dlq", "requeue", "--store", seeded.url, "-f", "handler=FeedUpdateHandler", input="n\n"
    )
    assert refused.exit_code == 1
    assert "Requeue 2 dead letter(s) matching handler=FeedUpdateHandler" in refused.stderr
    assert remaining(seeded.url) == {*seeded.old, *seeded.recent}
    accepted = ok(
        "dlq", "requeue", "--store", seeded.url, "-f", "handler=FeedUpdateHandler", input="y\n"
    )
    assert "completed: 2 requeued" in accepted.stdout
    assert remaining(seeded.url) == set(seeded.old)


def test_requeue_of_a_filter_nothing_matches_says_so(seeded: Seeded) -> None:
    out = ok("dlq", "requeue", "--store", seeded.url, "-f", "handler=Nobody", "--yes").stdout
    assert out.strip() == "no dead letters match handler=Nobody"


def test_a_detached_probing_redrive_can_be_paused_resumed_and_cancelled(seeded: Seeded) -> None:
    started = json_of(
        "dlq", "requeue", "--store", seeded.url, "--all", "--probe", "1", "--detach", "--yes"
    )
    assert (started["state"], started["probe"], started["total"]) == ("probing", 1, 5)
    rid = started["id"]
    assert [r["id"] for r in json_of("dlq", "redrive", "list", "--store", seeded.url)] == [rid]
    assert json_of("dlq", "redrive", "pause", rid, "--store", seeded.url)["state"] == "paused"
    shown = ok("dlq", "redrive", "show", rid, "--store", seeded.url).stdout
    assert "paused" in shown
    resumed = json_of("dlq", "redrive", "resume", rid, "--store", seeded.url, "--detach")
    assert resumed["state"] == "probing"
    assert json_of("dlq", "redrive", "cancel", rid, "--store", seeded.url)["state"] == "cancelled"
    assert "cancelled already" in one_line_error(
        invoke("dlq", "redrive", "cancel", rid, "--store", seeded.url)
    )
    ok("dlq", "redrive", "delete", rid, "--store", seeded.url)
    assert json_of("dlq", "redrive", "list", "--store", seeded.url) == []
    assert "no item with id 'redrive_nope'" in one_line_error(
        invoke("dlq", "redrive", "show", "redrive_nope", "--store", seeded.url)
    )


def test_resume_drives_a_paused_redrive_to_the_end(seeded: Seeded) -> None:
    started = json_of(
        "dlq",
        "requeue",
        "--store",
        seeded.url,
        "-f",
        "handler=FeedUpdateHandler",
        "--detach",
        "--yes",
    )
    ok("dlq", "redrive", "pause", started["id"], "--store", seeded.url)
    finished = json_of("dlq", "redrive", "resume", started["id"], "--store", seeded.url)
    assert (finished["state"], finished["done"]) == ("completed", 2)


def test_requeue_of_several_ids_with_an_unknown_one_changes_nothing(seeded: Seeded) -> None:
    result = invoke("dlq", "requeue", seeded.old[0], "dlq_nope", "--store", seeded.url, "--json")
    message = one_line_error(result)
    assert "no item with id 'dlq_nope'" in message
    assert "nothing was changed" in message
    assert result.stdout == ""
    assert seeded.old[0] in remaining(seeded.url)


def test_ids_and_a_filter_together_are_a_usage_error(seeded: Seeded) -> None:
    both = invoke("dlq", "requeue", seeded.old[0], "--store", seeded.url, "--all")
    assert "not both" in one_line_error(both, code=2)
    neither = invoke("dlq", "delete", "--store", seeded.url)
    assert "--filter KEY=VALUE, or --all" in one_line_error(neither, code=2)
    rate_without_filter = invoke(
        "dlq", "requeue", seeded.old[0], "--store", seeded.url, "--rate", "5"
    )
    assert "--rate and --probe apply to --filter" in one_line_error(rate_without_filter, code=2)
    bad_rate = invoke("dlq", "requeue", "--all", "--store", seeded.url, "--rate", "fast", "--yes")
    assert "not a rate: 'fast'" in one_line_error(bad_rate, code=2)


# edit and requeue ------------------------------------------------------------------------


def test_edit_and_requeue_keeps_the_original_in_the_audit_trail(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RETRYBUS_ACTOR", "alice")
    target = seeded.recent[1]
    original = json_of("dlq", "show", target, "--store", seeded.url)["event_data"]
    item = json_of("dlq", "requeue", target, "--store", seeded.url, "--data", '{"post_id": 42}')
    assert item["event_data"] == {"post_id": 42}
    (edit,) = item["metadata"]["edits"]
    assert (edit["by"], edit["original_data"], edit["data"]) == ("alice", original, {"post_id": 42})


def test_edit_and_requeue_refuses_invalid_json(seeded: Seeded) -> None:
    result = invoke("dlq", "requeue", seeded.recent[1], "--store", seeded.url, "--data", "{oops")
    assert "not valid JSON" in one_line_error(result, code=2)
    assert seeded.recent[1] in remaining(seeded.url)


def test_edit_and_requeue_reads_the_payload_from_a_file(seeded: Seeded, tmp_path: Path) -> None:
    payload = tmp_path / "fixed.json"
    payload.write_text('{"post_id": 7, "fixed": true}', "utf-8")
    item = json_of(
        "dlq", "requeue", seeded.recent[1], "--store", seeded.url, "--data-file", payload
    )
    assert item["event_data"] == {"post_id": 7, "fixed": True}


# bulk reprocess and delete ---------------------------------------------------------------


def test_reprocess_by_filter_calls_each_handler_and_reports_failures(seeded: Seeded) -> None:
    result = invoke(
        "dlq",
        "reprocess",
        "--store",
        seeded.url,
        "-f",
        "handler=CommentNotificationHandler",
        "--yes",
        "--json",
        *WITH_APP,
    )
    assert result.exit_code == 1, result.output  # one of them fails again
    assert '"done": 2' in result.stdout
    assert '"failed": 1' in result.stdout
    assert remaining(seeded.url, handler_name="CommentNotificationHandler", processed=False) == {
        seeded.failing
    }


def test_delete_by_filter_deletes_what_matches_after_asking(seeded: Seeded) -> None:
    refused = invoke("dlq", "delete", "--store", seeded.url, "-f", "processed=true", input="n\n")
    assert "Delete 1 dead letter(s) matching processed=true" in refused.stderr
    assert seeded.processed in remaining(seeded.url)
    out = ok("dlq", "delete", "--store", seeded.url, "-f", "processed=true", "--yes").stdout
    assert out.strip() == "deleted 1 dead letter(s)"
    assert remaining(seeded.url) == {*seeded.old, *seeded.recent} - {seeded.processed}


def test_delete_of_several_ids(seeded: Seeded) -> None:
    assert json_of("dlq", "delete", *seeded.old[:2], "--store", seeded.url) == {"deleted": 2}
    assert remaining(seeded.url) == {seeded.old[2], *seeded.recent}


# the retry queue ----------------------------------------------------------------------------


def test_queue_groups_counts_retry_items_per_handler(seeded: Seeded) -> None:
    counts = json_of("queue", "groups", "--store", seeded.url)
    assert sorted((c["key"], c["count"]) for c in counts) == [
        ("CommentNotificationHandler", 1),
        ("SocialStatisticsHandler", 1),
    ]
    by_type = json_of("queue", "groups", "--store", seeded.url, "--by", "type")
    assert sorted(c["key"] for c in by_type) == ["comment.created", "like.added"]
    table = ok("queue", "groups", "--store", seeded.url).stdout
    assert "CommentNotificationHandler" in table
    assert "first due" in table


def test_an_empty_filter_value_never_selects_everything(seeded: Seeded) -> None:
    result = invoke("dlq", "delete", "--store", seeded.url, "-f", "handler=", "--yes")
    assert "empty value" in one_line_error(result, code=2)
    assert remaining(seeded.url) == {*seeded.old, *seeded.recent}


def test_two_names_of_one_filter_field_are_a_usage_error(seeded: Seeded) -> None:
    result = invoke("dlq", "list", "--store", seeded.url, "-f", "type=a", "-f", "event_type=b")
    assert "name the same field" in one_line_error(result, code=2)


def test_reprocess_refuses_a_processed_filter(seeded: Seeded) -> None:
    result = invoke(
        "dlq", "reprocess", "--store", seeded.url, "-f", "processed=true", "--yes", *WITH_APP
    )
    assert "unprocessed" in one_line_error(result, code=2)
