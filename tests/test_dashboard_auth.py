"""Who may change data on the dashboard: tokens, read-only mode, log-in and
sessions, CSRF tokens, foreign origins and bearer tokens. Every refused request
changes nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashboard_support import (
    BASE,
    BOB_SECRET,
    POST_ENDPOINTS,
    SECRET,
    TOKENS,
    Dash,
    dead,
    form_csrf,
    open_test_store,
    running,
)
from retrybus import DeadLetterFilter, Event
from retrybus.dashboard import create_app, parse_tokens
from retrybus.dashboard._auth import SESSION_COOKIE, Auth


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path), handlers=True) as opened:
        yield opened


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store("memory", tmp_path), tokens=None, handlers=True) as opened:
        yield opened


def snapshot(dash: Dash) -> tuple[object, ...]:
    """Everything a data-changing request could change."""

    async def take() -> tuple[object, ...]:
        bus = dash.bus
        letters = await bus.dead_letters.list(limit=1000)
        return (
            sorted((d.id, d.processed, d.error, repr(d.event_data)) for d in letters),
            sorted(i.id for i in await bus.retry_queue.list(limit=1000)),
            sorted((r.id, r.state, r.done) for r in await bus.redrives.list()),
            [(s.key, s.removed) for s in await bus.store.list_subscriptions(removed=True)],
        )

    return dash.run(take)


def seed(dash: Dash) -> dict[str, str]:
    async def make() -> dict[str, str]:
        letter = await dead(dash.bus, 1)
        await dead(dash.bus, 2)
        redrive = await dash.bus.redrives.start(DeadLetterFilter(handler_name="Nobody"), rate=1)
        await dash.bus.publish(Event("reminder.due", {"n": 1}), deliver_in=3600)
        (scheduled,) = await dash.bus.retry_queue.list(kind="scheduled")
        await dash.bus.register()  # a subscription to remove (default/Mailer)
        return {"id": letter.id, "redrive": redrive.id, "scheduled": scheduled.id}

    return dash.run(make)


def endpoints(ids: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    forms = {
        "/dead-letters/{id}/edit": {"data": '{"n": 7}'},
        "/dead-letters/selected": {"action": "delete", "ids": ids["id"], "confirmed": "yes"},
        "/dead-letters/bulk": {"action": "delete"},
        "/retry-queue/{scheduled}/cancel": {"confirmed": "yes"},
        "/services/remove": {"service": "default", "confirmed": "yes", "force": "yes"},
        "/login": {"token": SECRET},
    }
    return [(path.format(**ids), forms.get(path, {})) for path in POST_ENDPOINTS]


def test_every_post_endpoint_is_in_the_list_the_tests_check(dash: Dash) -> None:
    app = dash.client.app
    posting = set()
    for route in app.routes:  # type: ignore[attr-defined]
        if "POST" in (getattr(route, "methods", None) or ()):
            posting.add(
                route.path.replace("{item_id}", "{id}").replace("{redrive_id}", "{redrive}")
            )
    listed = set(POST_ENDPOINTS)
    generic = {
        "/dead-letters/{id}/{action}": {
            "/dead-letters/{id}/requeue",
            "/dead-letters/{id}/reprocess",
            "/dead-letters/{id}/delete",
        },
        "/redrives/{redrive}/{action}": {
            f"/redrives/{{redrive}}/{a}" for a in ("pause", "resume", "cancel", "delete")
        },
        "/retry-queue/{id}/cancel": {"/retry-queue/{scheduled}/cancel"},
    }
    for path in posting:
        assert generic.get(path, {path}) <= listed, path


# parsing tokens -----------------------------------------------------------------------------


def test_tokens_are_name_secret_pairs_and_a_bare_secret_is_admin() -> None:
    assert parse_tokens("alice:s1, bob:s2") == {"alice": "s1", "bob": "s2"}
    assert parse_tokens("just-a-secret") == {"admin": "just-a-secret"}
    assert parse_tokens("a:with:colons") == {"a": "with:colons"}
    assert parse_tokens(["alice:s1", ""]) == {"alice": "s1"}
    assert parse_tokens({"carol": "s3"}) == {"carol": "s3"}
    assert parse_tokens(None) == {}
    assert parse_tokens(" , ") == {}


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("alice:", "'alice'"),
        ("bad name:secret-value", "'bad name'"),
        ("alice:one,alice:two", "'alice' is given twice"),
        (":secret-value", "''"),
    ],
)
def test_malformed_tokens_are_refused_without_showing_the_secret(spec: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)) as caught:
        parse_tokens(spec)
    assert "secret-value" not in str(caught.value)
    assert "one" not in str(caught.value).replace("given", "")


# read-only mode -----------------------------------------------------------------------------


def test_without_tokens_the_dashboard_is_read_only(read_only: Dash) -> None:
    dash = read_only
    ids = seed(dash)
    for path in (
        "/",
        "/dead-letters",
        f"/dead-letters/{ids['id']}",
        "/groups",
        "/retry-queue",
        f"/retry-queue/{ids['scheduled']}",
        "/redrives",
        f"/redrives/{ids['redrive']}",
        "/login",
    ):
        html = dash.get(path).text
        assert "<strong>Read-only.</strong>" in html, path
        assert 'method="post"' not in html, path  # no action forms at all
    assert "Read-only dashboard" in dash.get("/dead-letters").text
    before = snapshot(dash)
    for path, form in endpoints(ids):
        response = dash.post(path, form, csrf="")
        assert response.status_code == 403, path
        assert "read-only" in response.text
    bulk = dash.get("/dead-letters/bulk?action=delete")
    assert bulk.status_code == 403
    assert snapshot(dash) == before


def test_read_only_refuses_even_a_bearer_token(read_only: Dash) -> None:
    ids = seed(read_only)
    before = snapshot(read_only)
    response = read_only.post(
        f"/dead-letters/{ids['id']}/delete",
        csrf=None,
        headers={"authorization": f"Bearer {SECRET}"},
    )
    assert response.status_code == 403
    assert snapshot(read_only) == before


# not logged in, wrong CSRF, foreign origin ----------------------------------------------------


def test_every_post_without_a_token_is_refused_and_changes_nothing(dash: Dash) -> None:
    ids = seed(dash)
    before = snapshot(dash)
    for path, form in endpoints(ids):
        if path == "/login":
            continue  # logging in is how one gets a token
        response = dash.post(path, form, csrf="")
        assert response.status_code == 403, path
        assert "Log in" in response.text or "log in" in response.text
    assert snapshot(dash) == before
    # pages offer no action forms, only a way to log in
    html = dash.get(f"/dead-letters/{ids['id']}").text
    assert 'method="post"' not in html
    assert "Log in</a> with a token" in html


def test_a_wrong_or_missing_csrf_token_is_refused(dash: Dash) -> None:
    ids = seed(dash)
    dash.login()
    before = snapshot(dash)
    good = dash.csrf()
    for csrf in (None, "", "0" * 64, good[:-1] + ("0" if good[-1] != "0" else "1")):
        for path, form in endpoints(ids):
            if path == "/login":
                continue
            response = dash.post(path, form, csrf=csrf)
            assert response.status_code == 403, (path, csrf)
            assert "CSRF" in response.text
    assert snapshot(dash) == before


def test_the_csrf_token_of_another_session_is_refused(dash: Dash) -> None:
    ids = seed(dash)
    dash.login(BOB_SECRET)
    bobs = dash.csrf()
    dash.client.cookies.clear()
    dash.login(SECRET)
    before = snapshot(dash)
    response = dash.post(f"/dead-letters/{ids['id']}/delete", csrf=bobs)
    assert response.status_code == 403
    assert snapshot(dash) == before


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "http://testserver.evil.example"},
        {"origin": "null"},
        {"origin": "", "referer": "https://evil.example/page"},
    ],
)
def test_a_foreign_origin_is_refused_even_with_a_valid_session(
    dash: Dash, headers: dict[str, str]
) -> None:
    ids = seed(dash)
    dash.login()
    before = snapshot(dash)
    sent = {k: v for k, v in headers.items() if v}
    if "origin" not in sent:
        # no Origin header at all: the client must not add one
        csrf = dash.csrf()
        response = dash.client.post(
            f"/dead-letters/{ids['id']}/delete",
            data={"csrf": csrf},
            headers=sent,
            follow_redirects=False,
        )
    else:
        response = dash.post(f"/dead-letters/{ids['id']}/delete", headers=sent)
    assert response.status_code == 403
    assert "origin" in response.text
    assert snapshot(dash) == before


def test_a_request_without_origin_or_referer_is_judged_by_its_csrf_token(dash: Dash) -> None:
    ids = seed(dash)
    dash.login()
    csrf = dash.csrf()
    response = dash.client.post(
        f"/dead-letters/{ids['id']}/delete", data={"csrf": csrf}, follow_redirects=False
    )
    assert response.status_code == 303
    assert dash.count() == 1


def test_a_trusted_origin_may_post(tmp_path: Path) -> None:
    with running(
        open_test_store("memory", tmp_path), trusted_origins=["https://ops.example.com"]
    ) as dash:
        letter = dash.run(dead, dash.bus, 1)
        dash.login()
        response = dash.post(
            f"/dead-letters/{letter.id}/delete", headers={"origin": "https://ops.example.com"}
        )
        assert response.status_code == 303
        assert dash.count() == 0


# logging in and out --------------------------------------------------------------------------


def test_log_in_sets_a_strict_http_only_session_cookie(dash: Dash) -> None:
    page = dash.get("/login")
    assert 'type="password"' in page.text
    response = dash.client.post(
        "/login",
        data={"token": SECRET, "csrf": form_csrf(page.text), "next": "/groups"},
        headers={"origin": BASE},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/groups"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
    )
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert "Path=/" in cookie
    assert SECRET not in cookie
    html = dash.get("/").text
    assert 'title="Signed in with the token alice">alice<' in html
    assert "Logged in as alice." in html


def test_a_wrong_token_does_not_log_in(dash: Dash) -> None:
    page = dash.get("/login")
    response = dash.client.post(
        "/login",
        data={"token": "not-a-token", "csrf": form_csrf(page.text)},
        headers={"origin": BASE},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert "not one of the configured tokens" in response.text
    assert SESSION_COOKIE not in dash.client.cookies


def test_the_login_form_has_its_own_csrf_check(dash: Dash) -> None:
    dash.get("/login")
    for csrf in ("", "f" * 64):
        response = dash.client.post(
            "/login",
            data={"token": SECRET, "csrf": csrf},
            headers={"origin": BASE},
            follow_redirects=False,
        )
        assert response.status_code == 403
    page = dash.get("/login")
    foreign = dash.client.post(
        "/login",
        data={"token": SECRET, "csrf": form_csrf(page.text)},
        headers={"origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert foreign.status_code == 403
    assert SESSION_COOKIE not in dash.client.cookies


def test_log_in_never_redirects_to_another_site(dash: Dash) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        page = dash.get("/login")
        response = dash.client.post(
            "/login",
            data={"token": SECRET, "csrf": form_csrf(page.text), "next": target},
            headers={"origin": BASE},
            follow_redirects=False,
        )
        assert response.headers["location"] == "/", target


def test_log_out_ends_the_session(dash: Dash) -> None:
    ids = seed(dash)
    dash.login()
    response = dash.post("/logout")
    assert response.status_code == 303
    assert SESSION_COOKIE not in dash.client.cookies
    assert dash.post(f"/dead-letters/{ids['id']}/delete", csrf="").status_code == 403


# sessions ------------------------------------------------------------------------------------


def test_a_session_survives_a_restart_and_ends_with_its_token(tmp_path: Path) -> None:
    auth = Auth(TOKENS)
    cookie = auth.new_session("alice")
    assert Auth(TOKENS).session_name(cookie) == "alice"  # another process, same tokens
    assert Auth(f"bob:{BOB_SECRET},alice:{SECRET}").session_name(cookie) == "alice"
    assert Auth(f"alice:rotated-secret,bob:{BOB_SECRET}").session_name(cookie) is None
    assert Auth(f"bob:{BOB_SECRET}").session_name(cookie) is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c.replace("alice", "bob"),
        lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),
        lambda c: "v1:alice:1:" + c.rsplit(":", 1)[1],
        lambda c: c.rsplit(":", 1)[0],
        lambda c: "garbage",
        lambda c: "v1:alice:notanumber:" + c.rsplit(":", 1)[1],
    ],
)
def test_a_forged_session_cookie_is_worthless(tamper: object) -> None:
    auth = Auth(TOKENS)
    cookie = auth.new_session("alice")
    assert callable(tamper)
    assert auth.session_name(tamper(cookie)) is None


def test_sessions_expire(tmp_path: Path) -> None:
    auth = Auth(TOKENS, session_max_age=3600)
    cookie = auth.new_session("alice", now=1_000_000)
    assert auth.session_name(cookie, now=1_000_000 + 3599) == "alice"
    assert auth.session_name(cookie, now=1_000_000 + 3601) is None
    assert auth.session_name(cookie, now=1_000_000 - 3600) is None  # issued in the future


def test_a_cookie_from_a_restarted_dashboard_still_logs_in(tmp_path: Path) -> None:
    store = open_test_store("memory", tmp_path)
    cookie = Auth(TOKENS).new_session("bob")
    with running(store) as dash:
        dash.client.cookies.set(SESSION_COOKIE, cookie)
        assert 'title="Signed in with the token bob">bob<' in dash.get("/").text


# bearer tokens --------------------------------------------------------------------------------


def test_a_bearer_token_acts_without_a_cookie_or_csrf(dash: Dash) -> None:
    ids = seed(dash)
    response = dash.post(
        f"/dead-letters/{ids['id']}/requeue",
        csrf=None,
        headers={"authorization": f"Bearer {BOB_SECRET}"},
    )
    assert response.status_code == 303
    (queued,) = dash.run(dash.bus.retry_queue.list, kind="retry")
    assert queued.metadata["requeued_by"] == "bob"


@pytest.mark.parametrize("header", ["Bearer wrong-secret", f"Basic {SECRET}", "Bearer "])
def test_a_bad_bearer_token_is_refused(dash: Dash, header: str) -> None:
    ids = seed(dash)
    before = snapshot(dash)
    response = dash.post(
        f"/dead-letters/{ids['id']}/delete", csrf=None, headers={"authorization": header}
    )
    assert response.status_code == 403
    assert snapshot(dash) == before


def test_create_app_refuses_malformed_tokens(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'bad name'"):
        create_app(open_test_store("memory", tmp_path), tokens="bad name:secret")


def test_the_log_in_form_takes_the_secret_or_the_whole_entry(dash: Dash) -> None:
    for pasted, ok in ((f"alice:{SECRET}", True), (f"bob:{SECRET}", False), (f"x:{SECRET}", False)):
        dash.client.cookies.clear()
        page = dash.get("/login")
        response = dash.client.post(
            "/login",
            data={"token": pasted, "csrf": form_csrf(page.text), "next": "/groups"},
            headers={"origin": BASE},
            follow_redirects=False,
        )
        assert (response.status_code == 303) is ok, pasted
        if not ok:
            assert 'name="next" value="/groups"' in response.text  # kept for the next try
