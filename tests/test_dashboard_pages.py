"""The dashboard's pages through Starlette's TestClient: every page renders, the
filters and paging of the dead letters, error pages for bad input, escaping of
what handlers and payloads contain, and the dashboard mounted under a prefix."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from html import escape
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from dashboard_support import XSS, Dash, dead, hrefs, links, open_test_store, running
from retrybus import DeadLetterFilter, DepthHistory, Event
from retrybus.dashboard import background, create_app


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
