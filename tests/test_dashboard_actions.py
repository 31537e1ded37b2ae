"""Acting from the dashboard (logged in): requeue, reprocess and delete on one dead
letter, on a selection and on everything matching a filter or a failure group
(after a confirmation page with the count), edit-and-requeue, and redrives
started, paused, resumed and cancelled from the pages."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from markupsafe import escape

from dashboard_support import Dash, dead, open_test_store, running
from retrybus import DeadLetterFilter, DeadLetterItem, Event, RetryWorker
from retrybus._records import ErrorInfo


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def dash(store_kind: str, tmp_path: Path) -> Iterator[Dash]:
    """Logged in as alice; the bus has no handlers (reprocess is off)."""
    with running(open_test_store(store_kind, tmp_path)) as opened:
        opened.login()
        yield opened


@pytest.fixture
def dash_with_handlers(store_kind: str, tmp_path: Path) -> Iterator[Dash]:
    """Logged in as alice; "Mailer" succeeds unless the payload says ``fail``."""
    with running(open_test_store(store_kind, tmp_path), handlers=True) as opened:
        opened.login()
        yield opened


def flash_of(dash: Dash, response: object) -> str:
    """Follow a redirect and return the flash message the next page shows."""
    location = response.headers["location"]  # type: ignore[attr-defined]
    html = dash.client.get(location).text
    match = re.search(r'<div class="flash flash-(\w+)" role="status">(.*?)</div>', html, re.S)
    assert match is not None, html
    return f"{match.group(1)}: {match.group(2).strip()}"


def redrive_id(response: object) -> str:
    location = response.headers["location"]  # type: ignore[attr-defined]
    match = re.fullmatch(r"/redrives/(redrive_[0-9a-f]+)", location)
    assert match is not None, location
    return match.group(1)


# one dead letter ----------------------------------------------------------------------


def test_requeue_one(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    response = dash.post(f"/dead-letters/{letter.id}/requeue")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/retry-queue/retry_")
    assert "ok: Requeued" in flash_of(dash, response)
    assert dash.count() == 0
    (queued,) = dash.run(dash.bus.retry_queue.list)
    assert queued.event_id == letter.event_id
    assert queued.metadata["requeued_by"] == "alice"


def test_delete_one(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    keep = dash.run(dead, dash.bus, 2)
    response = dash.post(f"/dead-letters/{letter.id}/delete")
    assert response.status_code == 303
    assert f"Deleted {letter.id}" in flash_of(dash, response)
    assert [d.id for d in dash.run(dash.bus.dead_letters.list)] == [keep.id]


def test_acting_on_a_missing_dead_letter_is_a_404(dash: Dash) -> None:
    for action in ("requeue", "delete", "reprocess", "edit"):
        response = dash.post(f"/dead-letters/dlq_gone/{action}", {"data": "{}"})
        assert response.status_code in (404, 409), action
        if response.status_code == 404:
            assert "&#39;dlq_gone&#39;" in response.text
    assert dash.post("/dead-letters/dlq_gone/explode").status_code == 404


def test_reprocess_is_disabled_without_handlers_and_says_why(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    html = dash.get(f"/dead-letters/{letter.id}").text
    assert re.search(r'<button type="submit" class="btn" disabled>Reprocess now</button>', html)
    assert "start it with --app MODULE:ATTR" in html
    listing = dash.get("/dead-letters").text
    assert 'title="Reprocess calls the handlers' in listing
    response = dash.post(f"/dead-letters/{letter.id}/reprocess")
    assert response.status_code == 409
    assert "--app" in response.text
    assert dash.count(processed=False) == 1
    assert dash.get("/dead-letters/bulk?action=reprocess").text.count("--app MODULE:ATTR") >= 1


def test_reprocess_one_that_succeeds_and_one_that_fails_again(dash_with_handlers: Dash) -> None:
    dash = dash_with_handlers
    good = dash.run(dead, dash.bus, 1)
    bad = dash.run(dead, dash.bus, 2, data={"n": 2, "fail": True})
    response = dash.post(f"/dead-letters/{good.id}/reprocess")
    assert response.headers["location"] == f"/dead-letters/{good.id}"
    assert "the handler succeeded" in flash_of(dash, response)
    assert dash.run(dash.bus.dead_letters.get, good.id).processed
    response = dash.post(f"/dead-letters/{bad.id}/reprocess")
    assert "error: Reprocessed" in flash_of(dash, response)
    again = dash.run(dash.bus.dead_letters.get, bad.id)
    assert not again.processed
    assert again.error == "still failing: 2"
    assert again.metadata["last_reprocessed_by"] == "alice"


def test_reprocess_of_a_handler_the_app_lacks_is_a_409(dash_with_handlers: Dash) -> None:
    dash = dash_with_handlers
    orphan = dash.run(dead, dash.bus, 1, handler="Gone")
    response = dash.post(f"/dead-letters/{orphan.id}/reprocess")
    assert response.status_code == 409
    assert "&#39;Gone&#39;" in response.text


def test_reprocess_of_another_services_dead_letter_is_a_409(dash_with_handlers: Dash) -> None:
    dash = dash_with_handlers
    letter = DeadLetterItem.for_failure(
        Event("like.added", {"n": 1}),
        "Mailer",  # a handler of the same name in this app
        ErrorInfo("smtp down", "ConnectionError"),
        reason="failed after 3 retries",
        attempt=3,
        max_retries=3,
        now=dash.bus.clock.now(),
        service="billing",
    )
    dash.run(dash.bus.store.record_failures, [], [letter])
    response = dash.post(f"/dead-letters/{letter.id}/reprocess")
    assert response.status_code == 409
    assert "belongs to service billing: requeue it" in response.text
    bulk = dash.post("/dead-letters/bulk", {"action": "reprocess", "f_service": "billing"})
    assert bulk.status_code == 409
    assert "those dead letters belong to service billing" in bulk.text
    assert dash.run(dash.bus.redrives.list) == []
    assert not dash.run(dash.bus.dead_letters.get, letter.id).processed


# edit and requeue -------------------------------------------------------------------------


def test_edit_and_requeue_refuses_invalid_json_and_changes_nothing(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    for text, named in (
        ('{"n": 1,,}', "Expecting property name"),
        ("", "Expecting value"),
        ('{"n": NaN}', "NaN is not JSON"),
    ):
        response = dash.post(f"/dead-letters/{letter.id}/edit", {"data": text})
        assert response.status_code == 400
        assert "Not valid JSON" in response.text
        assert named in response.text
        assert f">{escape(text)}</textarea>" in response.text  # what was typed is kept
        assert '<details class="card" id="edit" open>' in response.text
    assert dash.count() == 1
    assert dash.run(dash.bus.retry_queue.count) == 0
    assert dash.run(dash.bus.dead_letters.get, letter.id).event_data == {"n": 1}


def test_edit_and_requeue_keeps_an_audit_trail(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    page = dash.get(f"/dead-letters/{letter.id}").text
    assert "&#34;n&#34;: 1" in page  # the payload, pretty, in the textarea
    response = dash.post(f"/dead-letters/{letter.id}/edit", {"data": '{"n": 1, "fixed": true}'})
    assert response.status_code == 303
    retry_path = response.headers["location"]
    assert "Edited and requeued" in flash_of(dash, response)
    retry_page = dash.get(retry_path).text
    assert "Edits" in retry_page
    assert "alice" in retry_page
    (queued,) = dash.run(dash.bus.retry_queue.list)
    assert queued.event_data == {"n": 1, "fixed": True}
    (edit,) = queued.metadata["edits"]
    assert (edit["by"], edit["original_data"], edit["data"]) == (
        "alice",
        {"n": 1},
        queued.event_data,
    )
    # it fails again: the detail page of the new dead letter shows the trail
    again = dash.run(dash.bus.retry_queue.mark_failed, queued.id)
    assert again is not None
    detail = dash.get(f"/dead-letters/{again.id}").text
    edits = detail.split("<h2>Edits</h2>")[1].split("</section>")[0]
    assert "alice" in edits
    assert "&#34;fixed&#34;: true" in edits


# a selection ---------------------------------------------------------------------------------


def test_requeue_a_selection(dash: Dash) -> None:
    letters = [dash.run(dead, dash.bus, n) for n in range(4)]
    listing = dash.get("/dead-letters?handler=Mailer").text
    assert 'name="ids" value="' + letters[0].id in listing
    chosen = [letters[0].id, letters[2].id, "dlq_vanished"]
    response = dash.post(
        "/dead-letters/selected",
        [("action", "requeue"), ("back", "handler=Mailer"), *[("ids", i) for i in chosen]],
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/dead-letters?handler=Mailer"
    message = flash_of(dash, response)
    assert "Requeued 2 of 3 selected." in message
    assert "No longer there: dlq_vanished." in message
    assert {d.id for d in dash.run(dash.bus.dead_letters.list)} == {letters[1].id, letters[3].id}
    assert {i.metadata["requeued_by"] for i in dash.run(dash.bus.retry_queue.list)} == {"alice"}


def test_reprocess_a_selection(dash_with_handlers: Dash) -> None:
    dash = dash_with_handlers
    good = dash.run(dead, dash.bus, 1)
    bad = dash.run(dead, dash.bus, 2, data={"n": 2, "fail": True})
    response = dash.post(
        "/dead-letters/selected", [("action", "reprocess"), ("ids", good.id), ("ids", bad.id)]
    )
    message = flash_of(dash, response)
    assert "Reprocessed 1 of 2 selected." in message
    assert f"{bad.id}: ValueError: still failing: 2" in message
    assert dash.count(processed=True) == 1


def test_delete_a_selection_asks_first(dash: Dash) -> None:
    letters = [dash.run(dead, dash.bus, n) for n in range(3)]
    fields = [("action", "delete"), ("ids", letters[0].id), ("ids", letters[1].id)]
    confirm = dash.post("/dead-letters/selected", fields)
    assert confirm.status_code == 200
    assert re.search(r'id="confirm-count">2<', confirm.text)
    assert dash.count() == 3  # nothing yet
    response = dash.post("/dead-letters/selected", [*fields, ("confirmed", "yes")])
    assert "Deleted 2 of 2 selected." in flash_of(dash, response)
    assert [d.id for d in dash.run(dash.bus.dead_letters.list)] == [letters[2].id]


def test_an_empty_selection_or_a_bad_action_changes_nothing(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    response = dash.post("/dead-letters/selected", {"action": "requeue"})
    assert "Select at least one" in flash_of(dash, response)
    assert (
        dash.post("/dead-letters/selected", {"action": "burn", "ids": letter.id}).status_code == 400
    )
    assert dash.count() == 1


# everything matching a filter or a group ---------------------------------------------------


def test_the_confirmation_page_shows_the_count_of_what_matches(dash: Dash) -> None:
    for n in range(3):
        dash.run(dead, dash.bus, n, handler="A")
    dash.run(dead, dash.bus, 9, handler="B")
    page = dash.get("/dead-letters/bulk?action=delete&handler=A")
    assert page.status_code == 200
    assert re.search(r'id="confirm-count">3<', page.text)
    assert "<dt>Handler</dt><dd>A</dd>" in page.text
    everything = dash.get("/dead-letters/bulk?action=requeue").text
    assert re.search(r'id="confirm-count">4<', everything)
    assert "every dead letter in the queue" in everything
    nothing = dash.get("/dead-letters/bulk?action=delete&handler=Nobody").text
    assert "Nothing matches" in nothing
    assert 'action="/dead-letters/bulk"' not in nothing
    assert dash.count() == 4  # showing a confirmation changes nothing


def test_delete_everything_matching_a_filter(dash: Dash) -> None:
    for n in range(3):
        dash.run(dead, dash.bus, n, handler="A")
    keep = dash.run(dead, dash.bus, 9, handler="B")
    page = dash.get("/dead-letters/bulk?action=delete&handler=A").text
    fields = re.findall(r'<input type="hidden" name="(f_\w+)" value="([^"]*)">', page)
    assert ("f_handler", "A") in fields
    response = dash.post("/dead-letters/bulk", [("action", "delete"), *fields])
    assert "Deleted 3 dead letters." in flash_of(dash, response)
    assert [d.id for d in dash.run(dash.bus.dead_letters.list)] == [keep.id]


def test_the_confirmation_pins_what_existed_when_it_was_shown(dash: Dash) -> None:
    dash.run(dead, dash.bus, 1, handler="A")
    page = dash.get("/dead-letters/bulk?action=delete&handler=A").text
    fields = re.findall(r'<input type="hidden" name="(f_\w+)" value="([^"]*)">', page)
    assert any(name == "f_until" for name, _ in fields)
    dash.clock.advance(5)
    late = dash.run(dead, dash.bus, 2, handler="A")
    response = dash.post("/dead-letters/bulk", [("action", "delete"), *fields])
    assert "Deleted 1 dead letters." in flash_of(dash, response)
    assert [d.id for d in dash.run(dash.bus.dead_letters.list)] == [late.id]


def test_requeue_a_failure_group_is_a_redrive(dash: Dash) -> None:
    for n in range(5):
        dash.run(
            dead, dash.bus, n, handler="Mailer", error=ConnectionError(f"smtp 10.0.0.{n} refused")
        )
    other = dash.run(dead, dash.bus, 9, handler="Mailer", error=KeyError("user 9"))
    groups = dash.get("/groups").text
    links = re.findall(
        r'href="(/dead-letters/bulk\?group=grp_[0-9a-f]+&amp;action=requeue)"', groups
    )
    assert len(links) == 2
    smtp = other_group = None
    for link in links:
        page = dash.get(link.replace("&amp;", "&")).text
        if re.search(r'id="confirm-count">5<', page):
            smtp = page
        else:
            other_group = page
    assert smtp is not None
    assert other_group is not None
    fields = re.findall(r'<input type="hidden" name="(f_\w+)" value="([^"]*)">', smtp)
    response = dash.post(
        "/dead-letters/bulk", [("action", "requeue"), ("rate", "50"), ("probe", "0"), *fields]
    )
    rid = redrive_id(response)
    redrive = dash.run(dash.bus.redrives.get, rid)
    assert (redrive.action, redrive.total, redrive.rate, redrive.created_by) == (
        "requeue",
        5,
        50.0,
        "alice",
    )
    page = dash.get(f"/redrives/{rid}").text
    assert '<meta http-equiv="refresh" content="2">' in page
    assert re.search(r'<progress id="redrive-progress" max="5" value="0">', page)
    # the rate allows 50 a second: the manual clock moves a second a step
    finished = dash.run(
        dash.bus.redrives.run, rid, interval=0, on_progress=lambda _: dash.clock.advance(1)
    )
    assert finished.state == "completed"
    page = dash.get(f"/redrives/{rid}").text
    assert re.search(r'<progress id="redrive-progress" max="5" value="5">', page)
    assert 'http-equiv="refresh"' not in page
    assert "5 requeued" in page
    assert [d.id for d in dash.run(dash.bus.dead_letters.list)] == [other.id]
    assert dash.run(dash.bus.retry_queue.count) == 5
    overview = dash.get("/").text
    assert re.search(r'id="stat-retry">5<', overview)
    assert re.search(r'id="stat-unprocessed">1<', overview)


def test_a_redrive_with_a_probe(dash_with_handlers: Dash) -> None:
    dash = dash_with_handlers
    for n in range(4):
        dash.run(dead, dash.bus, n)
    response = dash.post(
        "/dead-letters/bulk", {"action": "requeue", "f_handler": "Mailer", "probe": "2", "rate": ""}
    )
    rid = redrive_id(response)
    assert dash.run(dash.bus.redrives.get, rid).state == "probing"
    dash.run(dash.bus.redrives.step, rid)
    assert "waiting for a worker" in dash.get(f"/redrives/{rid}").text
    dash.run(RetryWorker(dash.bus).run_once)
    assert dash.run(dash.bus.redrives.run, rid, interval=0).state == "completed"
    assert dash.count() == 0


def test_reprocess_everything_matching_is_a_reprocess_redrive(dash_with_handlers: Dash) -> None:
    dash = dash_with_handlers
    for n in range(3):
        dash.run(dead, dash.bus, n)
    dash.run(dead, dash.bus, 7, data={"n": 7, "fail": True})
    page = dash.get("/dead-letters/bulk?action=reprocess").text
    assert "Only unprocessed ones are reprocessed." in page
    fields = re.findall(r'<input type="hidden" name="(f_\w+)" value="([^"]*)">', page)
    assert ("f_processed", "false") in fields
    rid = redrive_id(dash.post("/dead-letters/bulk", [("action", "reprocess"), *fields]))
    finished = dash.run(dash.bus.redrives.run, rid, interval=0)
    assert (finished.action, finished.done, finished.failed) == ("reprocess", 3, 1)
    assert dash.count(processed=True) == 3


def test_bad_rate_or_probe_starts_nothing(dash: Dash) -> None:
    dash.run(dead, dash.bus, 1)
    for rate, probe, named in (
        ("fast", "0", "&#39;fast&#39;"),
        ("-2", "0", "&#39;-2&#39;"),
        ("", "x", "&#39;x&#39;"),
    ):
        response = dash.post(
            "/dead-letters/bulk", {"action": "requeue", "rate": rate, "probe": probe}
        )
        assert response.status_code == 400
        assert named in response.text
    assert dash.post("/dead-letters/bulk", {"action": "melt"}).status_code == 400
    assert (
        dash.post("/dead-letters/bulk", {"action": "delete", "f_since": "soon"}).status_code == 400
    )
    assert dash.run(dash.bus.redrives.list) == []
    assert dash.count() == 1


def test_bulk_reprocess_without_handlers_is_refused(dash: Dash) -> None:
    dash.run(dead, dash.bus, 1)
    assert dash.post("/dead-letters/bulk", {"action": "reprocess"}).status_code == 409
    assert dash.run(dash.bus.redrives.list) == []


# steering redrives -----------------------------------------------------------------------------


def test_pause_resume_cancel_and_forget_a_redrive_from_the_page(dash: Dash) -> None:
    for n in range(6):
        dash.run(dead, dash.bus, n)
    redrive = dash.run(dash.bus.redrives.start, DeadLetterFilter(), rate=1, actor="alice")
    dash.run(dash.bus.redrives.step, redrive.id)
    listing = dash.get("/redrives").text
    assert f'action="/redrives/{redrive.id}/pause"' in listing
    assert f'action="/redrives/{redrive.id}/resume"' not in listing
    response = dash.post(f"/redrives/{redrive.id}/pause", {"back": "list"})
    assert response.headers["location"] == "/redrives"
    assert "paused" in flash_of(dash, response)
    assert dash.run(dash.bus.redrives.get, redrive.id).state == "paused"
    dash.clock.advance(10)
    dash.run(dash.bus.redrives.step, redrive.id)
    assert dash.run(dash.bus.redrives.get, redrive.id).done == 1  # paused: stays put
    detail = dash.get(f"/redrives/{redrive.id}").text
    assert f'action="/redrives/{redrive.id}/resume"' in detail
    assert "refresh" not in detail.split("</head>")[0]  # paused: no refresh needed
    assert dash.post(f"/redrives/{redrive.id}/pause").status_code == 409
    response = dash.post(f"/redrives/{redrive.id}/resume")
    assert response.headers["location"] == f"/redrives/{redrive.id}"
    assert dash.run(dash.bus.redrives.get, redrive.id).state == "running"
    assert dash.post(f"/redrives/{redrive.id}/delete").status_code == 409  # not finished
    dash.post(f"/redrives/{redrive.id}/cancel")
    assert dash.run(dash.bus.redrives.get, redrive.id).state == "cancelled"
    assert dash.post(f"/redrives/{redrive.id}/resume").status_code == 409
    response = dash.post(f"/redrives/{redrive.id}/delete")
    assert response.headers["location"] == "/redrives"
    assert dash.run(dash.bus.redrives.list) == []
    assert dash.post(f"/redrives/{redrive.id}/pause").status_code == 404
    assert dash.post(f"/redrives/{redrive.id}/explode").status_code == 404


def test_the_dashboard_drives_redrives_and_samples_depth_in_the_background(
    store_kind: str, tmp_path: Path
) -> None:
    store = open_test_store(store_kind, tmp_path)
    with running(store, background=True, redrive_interval=0.02) as dash:
        dash.login()
        samples = dash.run(_samples, dash)
        assert len(samples) == 1  # recorded at start-up
        for n in range(3):
            dash.run(dead, dash.bus, n)
        page = dash.get("/dead-letters/bulk?action=requeue").text
        fields = re.findall(r'<input type="hidden" name="(f_\w+)" value="([^"]*)">', page)
        rid = redrive_id(dash.post("/dead-letters/bulk", [("action", "requeue"), *fields]))
        deadline = time.monotonic() + 10
        while dash.run(dash.bus.redrives.get, rid).state != "completed":
            assert time.monotonic() < deadline, "the background runner did not drive the redrive"
            time.sleep(0.02)
        assert dash.count() == 0
        assert dash.run(dash.bus.retry_queue.count) == 3


async def _samples(dash: Dash) -> list[object]:
    from retrybus import DepthHistory

    return list(await DepthHistory(dash.bus).samples())


def test_back_links_keep_only_the_dashboards_own_pages(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    response = dash.post(
        f"/dead-letters/{letter.id}/delete", {"back": "handler=Mailer&x=https://evil.example"}
    )
    location = urlsplit(response.headers["location"])
    assert (location.scheme, location.netloc, location.path) == ("", "", "/dead-letters")
    assert dict(parse_qsl(location.query))["handler"] == "Mailer"


def test_acting_on_a_dead_letter_being_reprocessed_elsewhere_is_a_409(
    dash: Dash, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrybus import ItemBusy

    letter = dash.run(dead, dash.bus, 1)

    async def busy(item_id: str, **kwargs: object) -> None:
        raise ItemBusy(item_id, "being reprocessed by bob")

    monkeypatch.setattr(dash.bus.dead_letters, "delete", busy)
    response = dash.post(f"/dead-letters/{letter.id}/delete")
    assert response.status_code == 409
    assert "being reprocessed by bob" in response.text
    assert dash.count() == 1
