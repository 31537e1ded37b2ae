"""The dashboard's pages through Starlette's TestClient: every page renders, the
filters and paging of the dead letters, error pages for bad input, escaping of
what handlers and payloads contain, and the dashboard mounted under a prefix."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from html import escape, unescape
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from dashboard_support import XSS, Dash, dead, hrefs, links, open_test_store, running
from retrybus import DeadLetterFilter, DeadLetterItem, DepthHistory, Event, PermanentError
from retrybus.dashboard import background, create_app
from retrybus.dashboard._display import PREVIEW_CHARS, human_size


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path)) as opened:
        yield opened


def seed(dash: Dash) -> dict[str, list[str]]:
    """Dead letters of three handlers, two event types and two reasons, and a retry queue."""

    async def make() -> dict[str, list[str]]:
        bus = dash.bus
        ids: dict[str, list[str]] = {"Mailer": [], "Indexer": [], "Billing": []}
        for n in range(4):
            letter = await dead(bus, n, handler="Mailer", error=ConnectionError("smtp down"))
            ids["Mailer"].append(letter.id)
            dash.clock.advance(60)
        for n in range(3):
            letter = await dead(
                bus, n, handler="Indexer", event_type="post.published", error=KeyError(f"post {n}")
            )
            ids["Indexer"].append(letter.id)
            dash.clock.advance(60)
        billing = await dead(bus, 9, handler="Billing", event_type="order.paid", error="bad amount")
        ids["Billing"].append(billing.id)
        # marked processed as a successful reprocess marks it
        await bus.store.update_dead(
            replace(billing, processed=True, processed_at=billing.created_at)
        )
        now = dash.clock.now()
        for n, due_in in enumerate((30, 1800)):
            await bus.retry_queue.add(
                Event("like.added", {"n": n}),
                "Mailer",
                "timeout",
                next_retry=now + timedelta(seconds=due_in),
            )
        await bus.retry_queue.add(
            Event("like.added", {"n": 5}),
            "Indexer",
            "late",
            attempt=2,
            next_retry=now + timedelta(hours=2),
        )
        await DepthHistory(bus).record()
        return ids

    return dash.run(make)


# every page --------------------------------------------------------------------


def test_every_page_renders_on_an_empty_store(dash: Dash) -> None:
    for path in ("/", "/dead-letters", "/groups", "/retry-queue", "/redrives", "/login"):
        response = dash.get(path)
        assert response.status_code == 200, (path, response.text)
        assert "<h1>" in response.text
    overview = dash.get("/").text
    assert "No samples yet" in overview
    assert "No dead letters." in overview
    assert "No dead letters match" in dash.get("/dead-letters").text
    assert "The retry queue is empty." in dash.get("/retry-queue").text
    assert "No redrives yet." in dash.get("/redrives").text


def test_the_overview_shows_the_numbers_and_the_chart(dash: Dash) -> None:
    seed(dash)
    html = dash.get("/").text
    stats = dash.run(dash.bus.stats)
    assert stats.retry_queue_size == 3
    assert re.search(r'id="stat-retry">3<', html)
    assert re.search(r'id="stat-unprocessed">7<', html)
    assert re.search(r'id="stat-processed">1<', html)
    assert "1 due within a minute · 2 within an hour" in html
    dash.clock.advance(3600)
    assert "2 due within a minute · 2 within an hour" in dash.get("/").text
    for name in ("Mailer", "Indexer", "Billing", "post.published", "order.paid"):
        assert name in html
    assert '<svg class="chart"' in html
    assert "1 sample from" in html
    # the retry queue's breakdown by handler
    assert 'href="/retry-queue?handler=Mailer"' in html


def test_the_overview_shows_the_outbox_depth_when_the_bus_has_one(
    dash: Dash, tmp_path: Path
) -> None:
    assert 'id="stat-outbox"' not in dash.get("/").text
    app_db = tmp_path / "app.db"
    dash.bus.outbox.use(f"sqlite:///{app_db}")

    async def stage() -> None:
        conn = sqlite3.connect(app_db)
        for n in range(3):
            await dash.bus.outbox.stage(Event("like.added", {"n": n}), connection=conn)
        conn.commit()
        conn.close()

    dash.run(stage)
    dash.clock.advance(90)
    card = dash.get("/").text.split('id="stat-outbox"', 1)[1].split("</div>", 1)[0]
    assert '<span class="stat-value">3</span>' in card
    assert "staged in app.db, not relayed yet · oldest 90.0s" in card
    dash.bus.outbox.use(f"sqlite:///{tmp_path / 'missing' / 'app.db'}")
    card = dash.get("/").text.split('id="stat-outbox"', 1)[1].split("</div>", 1)[0]
    assert "app.db cannot be read" in card


def test_the_chart_draws_every_sample(dash: Dash) -> None:
    async def record() -> None:
        history = DepthHistory(dash.bus)
        for n in range(5):
            await dead(dash.bus, n)
            await history.record()
            dash.clock.advance(60)

    dash.run(record)
    html = dash.get("/").text
    assert html.count("<polyline") == 3  # three series
    assert "5 samples from" in html


def test_the_chart_breaks_where_samples_are_missing(dash: Dash) -> None:
    async def record() -> None:
        history = DepthHistory(dash.bus)
        for wait in (0, 1, 1, 28, 1):  # minutes: nothing recorded from 2 to 30 minutes in
            dash.clock.advance(wait * 60)
            await dead(dash.bus, wait)
            await history.record()

    dash.run(record)
    html = dash.get("/").text
    assert html.count("<polyline") == 6  # three series, each in two pieces
    assert "5 samples from" in html
    assert "The lines break where no sample was recorded" in html


def test_pages_list_what_the_store_holds(dash: Dash) -> None:
    ids = seed(dash)
    listing = dash.get("/dead-letters").text
    for handler_ids in ids.values():
        for item_id in handler_ids:
            assert f'/dead-letters/{item_id}"' in listing
    groups = dash.get("/groups").text
    assert "ConnectionError" in groups
    assert "smtp down" in groups
    assert ">4<" in groups  # the Mailer group's count
    queue = dash.get("/retry-queue").text
    assert "Mailer" in queue
    assert "Indexer" in queue
    assert "2 / 3" in queue  # attempt / max retries
    detail = dash.get(f"/dead-letters/{ids['Indexer'][0]}").text
    assert "KeyError" in detail
    assert "post.published" in detail
    assert "&#34;n&#34;: 0" in detail or '"n": 0' in detail


def test_the_retry_queue_page_filters_by_handler(dash: Dash) -> None:
    seed(dash)
    html = dash.get("/retry-queue?handler=Indexer").text
    rows = re.findall(r'href="/retry-queue/(retry_[0-9a-f]+)"', html)
    assert len(rows) == 1
    item = dash.get(f"/retry-queue/{rows[0]}")
    assert item.status_code == 200
    assert "late" in item.text


# filters and paging ----------------------------------------------------------------


def listed(html: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r'href="[^"]*/dead-letters/(dlq_[0-9a-f]+)"', html)))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("handler=Mailer", {"Mailer"}),
        ("type=post.published", {"Indexer"}),
        ("processed=true", {"Billing"}),
        ("processed=false", {"Mailer", "Indexer"}),
        ("reason=failed+after+1+retries", {"Mailer", "Indexer", "Billing"}),
        ("handler=Indexer&processed=true", set()),
    ],
)
def test_filters(dash: Dash, query: str, expected: set[str]) -> None:
    ids = seed(dash)
    shown = set(listed(dash.get(f"/dead-letters?{query}").text))
    assert shown == {i for handler in expected for i in ids[handler]}


def test_time_filters_take_iso_times_and_ages(dash: Dash) -> None:
    ids = seed(dash)
    now = dash.clock.now()
    # the Mailer letters are 7, 6, 5 and 4 minutes old, the Indexer ones 3, 2 and 1
    since = listed(dash.get("/dead-letters?since=3.5m").text)
    assert set(since) == set(ids["Indexer"]) | set(ids["Billing"])
    cutoff = (now - timedelta(minutes=3, seconds=30)).isoformat()
    until = listed(dash.get("/dead-letters", params={"until": cutoff}).text)
    assert set(until) == set(ids["Mailer"])


def test_search_by_event_id(dash: Dash) -> None:
    ids = seed(dash)
    letter = dash.run(dash.bus.dead_letters.get, ids["Indexer"][1])
    html = dash.get("/dead-letters", params={"event_id": letter.event_id}).text
    assert listed(html) == [letter.id]
    assert f'value="{letter.event_id}"' in html  # written back into the form


def test_a_failure_group_link_lists_its_dead_letters(dash: Dash) -> None:
    ids = seed(dash)
    groups = dash.get("/groups").text
    keys = re.findall(r'href="/dead-letters\?group=(grp_[0-9a-f]+)"', groups)
    assert keys
    mailer = dash.run(dash.bus.dead_letters.get, ids["Mailer"][0]).failure_group
    html = dash.get(f"/dead-letters?group={mailer}").text
    assert set(listed(html)) == set(ids["Mailer"])
    assert "Failure group" in html
    assert "smtp down" in html


def test_the_filter_is_written_back_and_kept_by_the_bulk_links(dash: Dash) -> None:
    seed(dash)
    html = dash.get("/dead-letters?handler=Mailer&processed=false&since=1h").text
    assert 'value="Mailer"' in html
    assert 'value="1h"' in html
    assert '<option value="false" selected>' in html
    dash.login()
    html = dash.get("/dead-letters?handler=Mailer&processed=false&since=1h").text
    assert (
        "/dead-letters/bulk?handler=Mailer&amp;processed=false&amp;since=1h&amp;action=requeue"
        in html
    )


def test_empty_filter_fields_are_dropped_from_the_address(dash: Dash) -> None:
    response = dash.get("/dead-letters?type=&handler=Mailer&reason=", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/dead-letters?handler=Mailer"


def test_paging_is_exact(dash: Dash) -> None:
    async def many() -> list[str]:
        made = []
        for n in range(23):
            made.append((await dead(dash.bus, n)).id)
            dash.clock.advance(1)
        return made

    made = dash.run(many)
    newest_first = list(reversed(made))
    first = dash.get("/dead-letters?limit=10").text
    assert listed(first) == newest_first[:10]
    assert "1–10 of 23" in first
    assert 'href="/dead-letters?limit=10&amp;offset=10"' in first
    second = dash.get("/dead-letters?limit=10&offset=10").text
    assert listed(second) == newest_first[10:20]
    assert 'href="/dead-letters?limit=10&amp;offset=0"' in second
    last = dash.get("/dead-letters?limit=10&offset=20").text
    assert listed(last) == newest_first[20:]
    assert "21–23 of 23" in last
    assert 'rel="next"' not in last


# bad input: a clear 4xx page naming the value, never a 500 ----------------------------


@pytest.mark.parametrize(
    ("path", "status", "named"),
    [
        ("/dead-letters?since=yesterday", 400, "&#39;yesterday&#39;"),
        ("/dead-letters?until=2026-13-45", 400, "&#39;2026-13-45&#39;"),
        ("/dead-letters?processed=maybe", 400, "&#39;maybe&#39;"),
        ("/dead-letters?colour=red", 400, "&#39;colour&#39;"),
        ("/dead-letters?offset=-1", 400, "&#39;-1&#39;"),
        ("/dead-letters?offset=ten", 400, "&#39;ten&#39;"),
        ("/dead-letters?limit=0", 400, "&#39;0&#39;"),
        ("/dead-letters?limit=100000", 400, "&#39;100000&#39;"),
        ("/groups?since=soon", 400, "&#39;soon&#39;"),
        ("/retry-queue?colour=red", 400, "&#39;colour&#39;"),
        ("/retry-queue?offset=x", 400, "&#39;x&#39;"),
        ("/dead-letters/dlq_missing", 404, "&#39;dlq_missing&#39;"),
        ("/retry-queue/retry_missing", 404, "&#39;retry_missing&#39;"),
        ("/redrives/redrive_missing", 404, "&#39;redrive_missing&#39;"),
        ("/dead-letters/bulk?action=explode", 400, "&#39;explode&#39;"),
        ("/dead-letters/bulk?action=delete&since=never", 400, "&#39;never&#39;"),
        ("/no/such/page", 404, "/no/such/page"),
    ],
)
def test_bad_input_gives_a_clear_error_page(dash: Dash, path: str, status: int, named: str) -> None:
    response = dash.get(path)
    assert response.status_code == status
    assert named in response.text
    assert 'class="card error-card"' in response.text


def test_a_store_failure_is_a_503_page_not_a_traceback(dash: Dash) -> None:
    from retrybus import StoreUnavailable

    async def broken(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("cannot reach store memory:// (test)")

    dash.bus.store.count_dead = broken  # type: ignore[method-assign]
    response = dash.get("/dead-letters")
    assert response.status_code == 503
    assert "cannot reach store" in response.text
    assert "Traceback" not in response.text


# escaping ---------------------------------------------------------------------------


def test_payloads_errors_and_metadata_are_rendered_escaped(dash: Dash) -> None:
    letter = dash.run(
        dead,
        dash.bus,
        1,
        handler="Mailer",
        event_type="like.added",
        data={"comment": XSS, XSS: "key"},
        error=ValueError(XSS),
        metadata={"note": XSS},
    )
    dash.login()
    pages = [
        "/",
        "/dead-letters",
        f"/dead-letters/{letter.id}",
        "/groups",
        "/dead-letters?" + "event_id=" + letter.event_id,
        "/dead-letters/bulk?action=delete&reason=" + XSS,
    ]
    for path in pages:
        html = dash.get(path).text
        assert "<script>alert" not in html, path
    detail = dash.get(f"/dead-letters/{letter.id}").text
    assert escape(XSS, quote=False) in detail or "&lt;script&gt;alert(1)&lt;/script&gt;" in detail
    assert detail.count("&lt;script&gt;") >= 4  # payload (2), error, textarea, metadata
    # an error message naming a bad value is escaped too
    bad = dash.get("/dead-letters", params={"since": XSS})
    assert bad.status_code == 400
    assert "<script>alert" not in bad.text


def test_responses_forbid_framing_and_foreign_content(dash: Dash) -> None:
    response = dash.get("/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    for link in links(response.text):
        assert link.startswith("/"), link  # nothing from another site


def test_static_files_are_served(dash: Dash) -> None:
    css = dash.get("/static/dashboard.css")
    assert css.status_code == 200
    assert "--brand" in css.text
    assert dash.get("/static/dashboard.js").status_code == 200


def test_the_icon_is_served_without_logging_in(dash: Dash) -> None:
    for path in ("/favicon.ico", "/static/favicon.svg"):
        response = dash.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "image/svg+xml", path
        assert response.content.startswith(b"<svg"), path
    for path in ("/", "/dead-letters", "/login", "/no/such/page"):
        assert '<link rel="icon" href="/static/favicon.svg"' in dash.get(path).text, path


# mounted under a prefix ---------------------------------------------------------------


def test_mounted_under_a_prefix_every_link_works(tmp_path: Path) -> None:
    dashboard = create_app(open_test_store("memory", tmp_path), tokens="alice:s3cret-value-123")
    parent = Starlette(routes=[Mount("/ops/retrybus", app=dashboard)])
    bus = dashboard.state.dashboard.bus
    with TestClient(parent, base_url="http://testserver") as client:
        client.portal.call(_seed_one, bus)  # type: ignore[union-attr]
        response = client.get("/ops/retrybus/")
        assert response.status_code == 200
        seen: set[str] = set()
        queue = ["/ops/retrybus/", "/ops/retrybus/dead-letters", "/ops/retrybus/groups"]
        while queue:
            page = queue.pop()
            if page in seen:
                continue
            seen.add(page)
            response = client.get(page)
            # 403: a confirmation page, logged out
            assert response.status_code in (200, 403), page
            for link in links(response.text):
                assert link.startswith("/ops/retrybus/"), (page, link)
            for link in hrefs(response.text):
                if "/static/" not in link and link.split("?")[0] not in {
                    p.split("?")[0] for p in seen
                }:
                    queue.append(link)
        assert len(seen) > 8
        # logging in and acting work under the prefix too
        login = client.get("/ops/retrybus/login").text
        csrf = re.search(r'name="csrf" value="([^"]*)"', login)
        assert csrf is not None
        done = client.post(
            "/ops/retrybus/login",
            data={"token": "s3cret-value-123", "csrf": csrf.group(1)},
            headers={"origin": "http://testserver"},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert done.headers["location"] == "/ops/retrybus/"
        assert "Path=/ops/retrybus" in done.headers["set-cookie"]
        letter_id = re.findall(
            r"/ops/retrybus/dead-letters/(dlq_[0-9a-f]+)",
            client.get("/ops/retrybus/dead-letters").text,
        )[0]
        page = client.get(f"/ops/retrybus/dead-letters/{letter_id}").text
        assert f'action="/ops/retrybus/dead-letters/{letter_id}/requeue"' in page
        csrf = re.search(r'name="csrf" value="([^"]*)"', page)
        assert csrf is not None
        moved = client.post(
            f"/ops/retrybus/dead-letters/{letter_id}/requeue",
            data={"csrf": csrf.group(1)},
            headers={"origin": "http://testserver"},
            follow_redirects=False,
        )
        assert moved.status_code == 303
        assert moved.headers["location"].startswith("/ops/retrybus/retry-queue/retry_")
        assert client.portal.call(bus.dead_letters.count) == 1  # type: ignore[union-attr]


def test_mounted_under_a_prefix_the_icon_is_there_too(tmp_path: Path) -> None:
    dashboard = create_app(open_test_store("memory", tmp_path), tokens="alice:s3cret-value-123")
    parent = Starlette(routes=[Mount("/ops/retrybus", app=dashboard)])
    with TestClient(parent, base_url="http://testserver") as client:
        icon = client.get("/ops/retrybus/favicon.ico")
        assert icon.status_code == 200
        assert icon.headers["content-type"] == "image/svg+xml"
        page = client.get("/ops/retrybus/").text
        linked = re.search(r'<link rel="icon" href="([^"]+)"', page)
        assert linked is not None
        assert linked.group(1) == "/ops/retrybus/static/favicon.svg"
        assert client.get(linked.group(1)).content == icon.content


async def _seed_one(bus: object) -> None:
    from retrybus import EventBus

    assert isinstance(bus, EventBus)
    await dead(bus, 1)
    await dead(bus, 2, handler="Indexer")


def test_a_mounted_dashboard_runs_its_background_work_in_the_parents_lifespan(
    tmp_path: Path,
) -> None:
    import contextlib
    import time

    dashboard = create_app(
        open_test_store("memory", tmp_path), tokens="alice:s3cret-value-123", redrive_interval=0.02
    )
    bus = dashboard.state.dashboard.bus

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        async with background(dashboard):
            yield

    parent = Starlette(routes=[Mount("/ops", app=dashboard)], lifespan=lifespan)
    with TestClient(parent) as client:
        portal = client.portal
        assert portal is not None
        portal.call(_seed_one, bus)
        redrive = portal.call(bus.redrives.start, DeadLetterFilter())
        deadline = time.monotonic() + 10
        while portal.call(bus.redrives.get, redrive.id).state != "completed":
            assert time.monotonic() < deadline, "the redrive did not run"
            time.sleep(0.02)
        assert portal.call(bus.dead_letters.count) == 0
        assert "not being driven" not in client.get("/ops/redrives").text
        assert portal.call(DepthHistory(bus).samples)  # a depth sample at start-up
    # without the lifespan the redrives page says nobody drives them
    with TestClient(
        Starlette(routes=[Mount("/ops", app=create_app(open_test_store("memory", tmp_path)))])
    ) as client:
        assert "not being driven" in client.get("/ops/redrives").text


def test_mounted_in_fastapi_as_the_readme_shows(tmp_path: Path) -> None:
    import contextlib
    from collections.abc import AsyncIterator

    from fastapi import FastAPI

    from retrybus.dashboard import background

    dashboard = create_app(open_test_store("memory", tmp_path), tokens="alice:s3cret-value-123")
    bus = dashboard.state.dashboard.bus

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with background(dashboard):
            yield

    api = FastAPI(lifespan=lifespan)
    api.mount("/ops/retrybus", dashboard)

    @api.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    with TestClient(api, base_url="http://testserver") as client:
        client.portal.call(_seed_one, bus)  # type: ignore[union-attr]
        assert client.get("/health").json() == {"status": "ok"}
        listed = client.get("/ops/retrybus/dead-letters")
        assert listed.status_code == 200
        letter_id = re.findall(r"/ops/retrybus/dead-letters/(dlq_[0-9a-f]+)", listed.text)[0]
        detail = client.get(f"/ops/retrybus/dead-letters/{letter_id}")
        assert detail.status_code == 200
        assert 'href="/ops/retrybus/static/dashboard.css"' in detail.text
        assert client.get("/ops/retrybus/static/dashboard.css").status_code == 200


# huge values: a page shows the start of a payload, a traceback or metadata --------------------


def pre(html: str, element_id: str) -> str:
    """The text of the ``<pre>`` with this id."""
    match = re.search(rf'<pre class="[^"]*" id="{element_id}">(.*?)</pre>', html, re.S)
    assert match is not None, element_id
    return unescape(match.group(1))


def test_a_huge_payload_is_cut_with_its_size_and_a_download_link(dash: Dash) -> None:
    data = {"blob": "é" * 5_000_000, "n": 1}  # 10 MB of UTF-8
    letter = dash.run(dead, dash.bus, 1, data=data)
    whole = json.dumps(data, indent=2, ensure_ascii=False)
    size = len(whole.encode())
    dash.login()
    response = dash.get(f"/dead-letters/{letter.id}")
    assert response.status_code == 200
    assert len(response.content) < 200_000
    assert pre(response.text, "payload") == whole[:PREVIEW_CHARS]
    note = re.sub(r"<[^>]+>", "", response.text.split('id="payload-cut">')[1].split("</p>")[0])
    assert f"first {PREVIEW_CHARS:,} characters" in note
    assert f"{human_size(size)} ({size:,} bytes)" in note
    assert human_size(size) == "9.5 MiB"
    download = f"/dead-letters/{letter.id}/payload.json"
    assert f'href="{download}" download>Download the whole payload as JSON' in response.text
    # the edit form says why it is not there (a cut payload sent back would replace the whole)
    assert "too large to edit in the browser" in response.text
    assert "<textarea" not in response.text
    served = dash.get(download)
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/json"
    assert (
        served.headers["content-disposition"] == f'attachment; filename="{letter.id}-payload.json"'
    )
    assert len(served.content) == size
    assert json.loads(served.content) == data


def test_a_payload_up_to_the_limit_is_shown_whole_and_editable(dash: Dash) -> None:
    around = len(json.dumps({"s": ""}, indent=2))  # what the JSON adds to the string
    for extra, cut in ((0, False), (1, True)):
        data = {"s": "x" * (PREVIEW_CHARS - around + extra)}
        letter = dash.run(dead, dash.bus, 1, data=data)
        dash.login()
        html = dash.get(f"/dead-letters/{letter.id}").text
        assert len(json.dumps(letter.event_data, indent=2)) == PREVIEW_CHARS + extra
        assert ('id="payload-cut"' in html) is cut
        assert ("<textarea" in html) is not cut
        assert f'href="/dead-letters/{letter.id}/payload.json"' in html  # offered either way


def test_the_payload_download_needs_what_the_detail_page_needs(tmp_path: Path) -> None:
    async def seed_one(dash: Dash) -> str:
        return (await dead(dash.bus, 1, data={"n": 1})).id

    for tokens in (None, "alice:s3cret-value-123"):  # read-only, and logged out
        with running(open_test_store("memory", tmp_path), tokens=tokens) as dash:
            item_id = dash.run(seed_one, dash)
            for detail in (f"/dead-letters/{item_id}", "/dead-letters/dlq_missing"):
                page = dash.get(detail)
                download = dash.get(detail + "/payload.json")
                assert download.status_code == page.status_code, detail
            download = dash.get(f"/dead-letters/{item_id}/payload.json")
            assert download.headers["x-content-type-options"] == "nosniff"
            assert "default-src 'none'" in download.headers["content-security-policy"]
            # it changes nothing: a POST there is not allowed (no action route takes it)
            refused = dash.post(f"/dead-letters/{item_id}/payload.json", csrf="")
            assert refused.status_code == 405
    # a Host the dashboard does not answer to gets neither
    with running(open_test_store("memory", tmp_path), allowed_hosts=["testserver"]) as dash:
        item_id = dash.run(seed_one, dash)
        for path in (f"/dead-letters/{item_id}", f"/dead-letters/{item_id}/payload.json"):
            assert dash.get(path).status_code == 200
            assert dash.get(path, headers={"host": "rebind.example"}).status_code == 400


def test_long_tracebacks_metadata_edits_and_errors_are_cut_on_both_detail_pages(
    dash: Dash,
) -> None:
    huge = {"blob": "x" * 200_000}
    long_text = "line of a traceback\n" * 10_000

    async def edited() -> str:
        """A retry item with a long traceback, error and metadata, whose huge
        original payload is kept in its edits."""
        bus = dash.bus
        event = Event("like.added", huge, source="svc", extensions={"trace": "t" * 100_000})
        item = await bus.retry_queue.add(event, "Mailer", "e" * 100_000)
        letter = await bus.retry_queue.mark_failed(item)
        assert letter is not None
        letter = replace(letter, traceback=long_text, metadata={"note": "m" * 100_000})
        assert await bus.store.update_dead(letter)
        return (await bus.dead_letters.requeue(letter.id, data={"n": 1}, actor="alice")).id

    def check(path: str) -> None:
        response = dash.get(path)
        assert response.status_code == 200, path
        assert len(response.content) < 8 * PREVIEW_CHARS, path
        html = response.text
        assert len(pre(html, "metadata")) == PREVIEW_CHARS
        assert 'id="metadata-cut"' in html
        assert "the whole traceback is" in html
        assert "the whole payload is" in html  # the original payload in the edits table
        assert "more characters)" in html  # the error (and the extension), clipped

    retry_id = dash.run(edited)
    check(f"/retry-queue/{retry_id}")
    again = dash.run(dash.bus.retry_queue.mark_failed, retry_id)  # it fails again
    assert again is not None
    check(f"/dead-letters/{again.id}")


def test_a_retry_items_huge_payload_is_cut_and_downloads_whole(dash: Dash) -> None:
    data = {"blob": "x" * 200_000}
    item = dash.run(dash.bus.retry_queue.add, Event("like.added", data), "Mailer", "timeout")
    html = dash.get(f"/retry-queue/{item.id}").text
    assert pre(html, "payload") == json.dumps(data, indent=2)[:PREVIEW_CHARS]
    assert 'id="payload-cut"' in html
    download = dash.get(f"/retry-queue/{item.id}/payload.json")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/json"
    assert f'filename="{item.id}-payload.json"' in download.headers["content-disposition"]
    assert json.loads(download.content) == data
    assert dash.get("/retry-queue/retry_missing/payload.json").status_code == 404


def test_error_types_are_shown_by_their_public_names(dash: Dash) -> None:
    private = "retrybus._errors.PermanentError"  # what a worker records for PermanentError

    async def recorded_privately(n: int) -> DeadLetterItem:
        letter = await dead(dash.bus, n, handler="Billing", error=PermanentError("card declined"))
        letter = replace(letter, error_type=private)
        assert await dash.bus.store.update_dead(letter)
        return letter

    letter = dash.run(recorded_privately, 1)
    item = dash.run(dash.bus.dead_letters.requeue, dash.run(recorded_privately, 2).id)
    assert item.error_type == private
    pages = [
        "/",
        "/dead-letters",
        f"/dead-letters/{letter.id}",
        f"/dead-letters?group={letter.failure_group}",
        "/groups",
        "/retry-queue",
        f"/retry-queue/{item.id}",
    ]
    for path in pages:
        html = dash.get(path).text
        # the traceback is shown as Python wrote it
        html = re.sub(r'<pre class="code traceback">.*?</pre>', "", html, flags=re.S)
        assert "retrybus._errors" not in html, path
        assert "retrybus.PermanentError" in html, path


def test_the_retry_queue_shows_each_handlers_newest_error_not_the_next_due(dash: Dash) -> None:
    async def make() -> None:
        now = dash.clock.now()
        await dash.bus.retry_queue.add(
            Event("like.added", {"n": 1}), "Mailer", "older error", next_retry=now
        )
        dash.clock.advance(60)
        await dash.bus.retry_queue.add(
            Event("like.added", {"n": 2}),
            "Mailer",
            "newer error",
            next_retry=now + timedelta(hours=1),
        )

    dash.run(make)
    for path in ("/retry-queue", "/retry-queue?service=default"):
        table = dash.get(path).text.split("By handler", 1)[1].split("</table>", 1)[0]
        assert "Last error" in table
        assert "newer error" in table
        assert "older error" not in table
