"""The retry queue page by kind (retries, pending and scheduled deliveries, with their
counts), and cancelling a pending or scheduled delivery from it: a button, a
confirmation, a token like every action that changes data."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from dashboard_support import BOB_SECRET, Dash, open_test_store, running
from retrybus import Event, EventBus, RetryItem
from retrybus._records import ErrorInfo, delivery_id


@dataclass(frozen=True)
class Queue:
    retry: str
    deferred: str
    running: str
    scheduled: str


async def fill(bus: EventBus) -> Queue:
    now = bus.clock.now()
    retry = await bus.retry_queue.add(
        Event("like.added", {"n": 1}), "Mailer", "connection timeout", next_retry=now
    )
    await bus.publish(Event("reminder.due", {"n": 2}, id="deferred"), defer=True)
    await bus.publish(Event("reminder.due", {"n": 3}, id="scheduled"), deliver_in=600)
    event = Event("reminder.due", {"n": 4}, id="running")
    first = RetryItem.for_failure(
        event, "Mailer", ErrorInfo("", ""), attempt=0, max_retries=3, next_retry=now, now=now
    )
    running_item = replace(
        first,
        id=delivery_id(event.source, event.id, "Mailer"),
        lease_owner="publisher",
        lease_until=now + timedelta(minutes=5),
        claims=1,
    )
    await bus.store.record_pending([running_item])
    return Queue(
        retry=retry.id,
        deferred=delivery_id("", "deferred", "Mailer"),
        running=running_item.id,
        scheduled=delivery_id("", "scheduled", "Mailer"),
    )


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path), handlers=True) as opened:
        yield opened


@pytest.fixture
def queue(dash: Dash) -> Queue:
    return dash.run(fill, dash.bus)


def rows(html: str) -> dict[str, str]:
    """Each row of the item table, by the item id it links to."""
    body = html[html.index('<table class="table rows">') :]
    found = {}
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        link = re.search(r'href="/retry-queue/(retry_[0-9a-f]+)"', row)
        if link:
            found[link.group(1)] = row
    return found


def queued(dash: Dash) -> set[str]:
    return {item.id for item in dash.run(dash.bus.retry_queue.list)}


# the page ------------------------------------------------------------------------------


def test_the_tabs_count_each_kind_and_each_row_shows_its_kind(dash: Dash, queue: Queue) -> None:
    html = dash.get("/retry-queue").text
    tabs = dict(re.findall(r'class="tab[^"]*"[^>]*>(\w+) <span class="tab-count">(\d+)<', html))
    assert tabs == {"All": "4", "Retries": "1", "Pending": "2", "Scheduled": "1"}
    assert 'href="/retry-queue?kind=scheduled"' in html
    shown = rows(html)
    assert set(shown) == {queue.retry, queue.deferred, queue.running, queue.scheduled}
    assert "badge-kind-retry" in shown[queue.retry]
    assert "badge-kind-pending" in shown[queue.deferred]
    assert "badge-kind-pending" in shown[queue.running]
    assert "badge-kind-scheduled" in shown[queue.scheduled]
    assert "running" in shown[queue.running]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("retry", {"retry"}), ("pending", {"deferred", "running"}), ("scheduled", {"scheduled"})],
)
def test_the_kind_filter_lists_only_that_kind(
    dash: Dash, queue: Queue, kind: str, expected: set[str]
) -> None:
    html = dash.get(f"/retry-queue?kind={kind}").text
    assert set(rows(html)) == {getattr(queue, name) for name in expected}
    assert re.search(rf'class="tab active" id="kind-{kind}"', html)
    assert f"1–{len(expected)} of {len(expected)}" in html


def test_the_kind_filter_with_a_handler_pages_without_a_total(dash: Dash, queue: Queue) -> None:
    html = dash.get("/retry-queue?handler=Mailer&kind=pending&limit=1").text
    assert list(rows(html)) in ([queue.deferred], [queue.running])
    assert 'rel="next"' in html
    assert "1–1<" in html
    # the tabs keep the handler
    assert 'href="/retry-queue?handler=Mailer&amp;kind=scheduled"' in html
    last = dash.get("/retry-queue?handler=Mailer&kind=pending&limit=1&offset=1").text
    assert len(rows(last)) == 1
    assert 'rel="next"' not in last
    none = dash.get("/retry-queue?handler=Nobody&kind=scheduled").text
    assert "No scheduled of Nobody in the retry queue." in none


def test_an_unknown_kind_is_a_400_naming_it(dash: Dash, queue: Queue) -> None:
    response = dash.get("/retry-queue?kind=failed")
    assert response.status_code == 400
    assert "&#39;failed&#39;" in response.text
    assert "retry, pending, scheduled" in response.text


def test_cancel_buttons_only_on_pending_and_scheduled_rows_no_one_runs(
    dash: Dash, queue: Queue
) -> None:
    dash.login()
    shown = rows(dash.get("/retry-queue").text)
    cancels = {item_id for item_id, row in shown.items() if f"/retry-queue/{item_id}/cancel" in row}
    assert cancels == {queue.deferred, queue.scheduled}


def test_without_logging_in_there_is_no_cancel_button(dash: Dash, queue: Queue) -> None:
    html = dash.get("/retry-queue").text
    assert "/cancel" not in html
    assert "to cancel pending and scheduled deliveries" in html


def test_a_scheduled_deliverys_page_says_what_it_is_and_offers_to_cancel(
    dash: Dash, queue: Queue
) -> None:
    dash.login()
    html = dash.get(f"/retry-queue/{queue.scheduled}").text
    assert "scheduled first delivery" in html
    assert f'action="/retry-queue/{queue.scheduled}/cancel"' in html
    running_page = dash.get(f"/retry-queue/{queue.running}").text
    assert "Its handler is running now: it cannot be cancelled." in running_page
    assert "/cancel" not in running_page
    retry_page = dash.get(f"/retry-queue/{queue.retry}").text
    assert "retry 1 of 3" in retry_page
    assert "/cancel" not in retry_page


# cancelling ------------------------------------------------------------------------------


def test_cancel_asks_first_then_cancels_and_goes_back_to_the_list(dash: Dash, queue: Queue) -> None:
    dash.login()
    back = "kind=scheduled&offset=0&colour=red"
    asked = dash.post(f"/retry-queue/{queue.scheduled}/cancel", {"back": back})
    assert asked.status_code == 200
    assert "Cancel the scheduled delivery of reminder.due to Mailer?" in asked.text
    assert 'name="confirmed" value="yes"' in asked.text
    assert queued(dash) == {queue.retry, queue.deferred, queue.running, queue.scheduled}
    done = dash.post(f"/retry-queue/{queue.scheduled}/cancel", {"back": back, "confirmed": "yes"})
    assert done.status_code == 303
    location = urlsplit(done.headers["location"])
    assert location.path == "/retry-queue"
    assert dict(parse_qsl(location.query)) == {"kind": "scheduled", "offset": "0"}
    page = dash.client.get(done.headers["location"]).text
    assert f"Cancelled {queue.scheduled}: reminder.due to Mailer will not be delivered." in page
    assert queued(dash) == {queue.retry, queue.deferred, queue.running}
    assert dash.run(dash.bus.dead_letters.count) == 0


def test_cancel_of_a_deferred_delivery(dash: Dash, queue: Queue) -> None:
    dash.login()
    response = dash.post(f"/retry-queue/{queue.deferred}/cancel", {"confirmed": "yes"})
    assert response.status_code == 303
    assert queue.deferred not in queued(dash)


def test_cancel_refuses_a_retry_and_a_running_delivery(dash: Dash, queue: Queue) -> None:
    dash.login()
    for item_id, why in ((queue.retry, "it is a retry"), (queue.running, "handler is running")):
        for form in ({}, {"confirmed": "yes"}):
            response = dash.post(f"/retry-queue/{item_id}/cancel", form)
            assert response.status_code == 409, (item_id, form)
            assert why in response.text
            assert item_id in response.text
    assert len(queued(dash)) == 4


def test_cancel_of_an_unknown_item_is_a_404(dash: Dash, queue: Queue) -> None:
    dash.login()
    response = dash.post("/retry-queue/retry_gone/cancel", {"confirmed": "yes"})
    assert response.status_code == 404
    assert "&#39;retry_gone&#39;" in response.text


def test_cancel_needs_the_token(dash: Dash, queue: Queue) -> None:
    # not logged in: refused, asked or not
    for form in ({}, {"confirmed": "yes"}):
        response = dash.post(f"/retry-queue/{queue.scheduled}/cancel", form, csrf="")
        assert response.status_code == 403
    # logged in, but a GET changes nothing
    dash.login()
    assert dash.get(f"/retry-queue/{queue.scheduled}/cancel").status_code == 405
    assert queue.scheduled in queued(dash)
    # a script's bearer token
    response = dash.post(
        f"/retry-queue/{queue.scheduled}/cancel",
        {"confirmed": "yes"},
        csrf=None,
        headers={"authorization": f"Bearer {BOB_SECRET}"},
    )
    assert response.status_code == 303
    assert queue.scheduled not in queued(dash)
