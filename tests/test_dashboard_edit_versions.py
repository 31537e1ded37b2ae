"""The dashboard's edit-and-requeue form with an app that registers the event's
type: it offers the payload a handler gets (upcast to the current version), and
the edit is stored as that version."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dashboard_support import Dash, dead, open_test_store, running


def rename_post(data: dict[str, Any]) -> dict[str, Any]:
    return {"post_id": int(data["post"])}


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store("sqlite", tmp_path)) as opened:
        opened.login()
        yield opened


def textarea(page: str) -> Any:
    match = re.search(r'<textarea id="data"[^>]*>(.*?)</textarea>', page, re.S)
    assert match is not None, page
    return json.loads(html.unescape(match.group(1)))


def test_the_edit_form_offers_the_stored_payload_without_a_registered_type(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, data={"post": "7"})
    assert textarea(dash.get(f"/dead-letters/{letter.id}").text) == {"post": "7"}


def test_the_edit_form_offers_the_upcast_payload_and_the_edit_is_stored_at_v2(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, data={"post": "7"})
    dash.bus.event_type("like.added", version=2, upcasters={1: rename_post})
    assert textarea(dash.get(f"/dead-letters/{letter.id}").text) == {"post_id": 7}
    response = dash.post(f"/dead-letters/{letter.id}/edit", {"data": '{"post_id": 8}'})
    assert response.status_code == 303, response.text
    (queued,) = dash.run(dash.bus.retry_queue.list)
    assert (queued.event_data, queued.event_extensions["dataversion"]) == ({"post_id": 8}, "2")
    (edit,) = queued.metadata["edits"]
    assert (edit["original_data"], edit["original_version"], edit["version"]) == (
        {"post": "7"},
        1,
        2,
    )


def test_the_edit_form_offers_the_stored_payload_when_the_upcaster_fails(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, data={"no post": True})
    dash.bus.event_type("like.added", version=2, upcasters={1: rename_post})
    assert textarea(dash.get(f"/dead-letters/{letter.id}").text) == {"no post": True}
