"""Dashboard sessions end everywhere: logging out revokes the session in the store
(a copy of its cookie, in another browser or before another dashboard process on
the same store, stops working), and removing or rotating a token ends its
sessions at once. Revocations expire when their session would have."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import retrybus
from dashboard_support import BOB_SECRET, SECRET, TOKENS, Dash, dead, open_test_store, running
from engines._common import unique_name
from engines.postgresql import drop_schema, url_with_schema
from retrybus import Store
from retrybus.dashboard._auth import SESSION_COOKIE
from retrybus.dashboard._sessions import PREFIX, Revocations


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path)) as opened:
        yield opened


def signed_in_as(dash: Dash) -> str | None:
    html = dash.get("/").text
    for name in ("alice", "bob"):
        if f'title="Signed in with the token {name}">{name}<' in html:
            return name
    return None


def session_cookie(dash: Dash) -> str:
    value = dash.client.cookies.get(SESSION_COOKIE)
    assert value
    return value


def use_cookie(dash: Dash, cookie: str) -> None:
    """Another browser holding a copy of the cookie."""
    dash.client.cookies.clear()
    dash.client.cookies.set(SESSION_COOKIE, cookie)


def delete_one(dash: Dash) -> int:
    """POST a delete of a new dead letter with this session; returns the status."""
    letter = dash.run(dead, dash.bus, 1)
    return int(dash.post(f"/dead-letters/{letter.id}/delete").status_code)


# one dashboard -----------------------------------------------------------------------


def test_logging_out_ends_a_copy_of_the_session_cookie(dash: Dash) -> None:
    dash.login()
    copied = session_cookie(dash)
    csrf = dash.csrf()
    assert dash.post("/logout").status_code == 303
    use_cookie(dash, copied)
    assert signed_in_as(dash) is None
    letter = dash.run(dead, dash.bus, 1)
    refused = dash.post(f"/dead-letters/{letter.id}/delete", csrf=csrf)
    assert refused.status_code == 403
    assert "logged out" in refused.text or "log in" in refused.text
    assert dash.count() == 1


def test_a_new_session_of_the_same_token_works_after_a_log_out(dash: Dash) -> None:
    dash.login()
    dash.post("/logout")
    dash.login()
    assert signed_in_as(dash) == "alice"
    assert delete_one(dash) == 303


def test_logging_in_with_another_token_ends_the_session_it_replaces(dash: Dash) -> None:
    dash.login(SECRET)
    alices = session_cookie(dash)
    dash.login(BOB_SECRET)
    assert signed_in_as(dash) == "bob"
    use_cookie(dash, alices)
    assert signed_in_as(dash) is None


def test_a_bearer_token_logs_out_nothing_and_keeps_working(dash: Dash) -> None:
    bearer = {"authorization": f"Bearer {SECRET}"}
    assert dash.post("/logout", csrf=None, headers=bearer).status_code == 303
    letter = dash.run(dead, dash.bus, 1)
    response = dash.post(f"/dead-letters/{letter.id}/delete", csrf=None, headers=bearer)
    assert response.status_code == 303
    assert dash.run(dash.bus.store.list_control, PREFIX) == []


# two dashboard processes on one store --------------------------------------------------


@contextmanager
def two_dashboards(
    url: str, tokens_a: str = TOKENS, tokens_b: str = TOKENS
) -> Iterator[tuple[Dash, Dash]]:
    """Two dashboards, each with its own store object and loop, on one store."""
    with (
        running(retrybus.open_store(url), tokens=tokens_a) as first,
        running(retrybus.open_store(url), tokens=tokens_b) as second,
    ):
        yield first, second


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    schema = unique_name()
    try:
        yield url_with_schema(schema)
    finally:
        asyncio.run(drop_schema(schema))


def test_a_log_out_on_one_dashboard_ends_the_session_on_another(shared_url: str) -> None:
    with two_dashboards(shared_url) as (first, second):
        first.login()
        use_cookie(second, session_cookie(first))
        assert signed_in_as(second) == "alice"  # the same tokens: the cookie works there
        csrf = second.csrf()
        assert delete_one(second) == 303
        assert first.post("/logout").status_code == 303
        # the next data-changing request asks the store: refused at once, no waiting
        letter = second.run(dead, second.bus, 1)
        refused = second.post(f"/dead-letters/{letter.id}/delete", csrf=csrf)
        assert refused.status_code == 403
        assert second.count() == 1
        assert signed_in_as(second) is None  # and its pages know it from then on
        # other sessions of the token are untouched
        second.client.cookies.clear()
        second.login()
        assert delete_one(second) == 303


def test_removing_a_token_ends_its_sessions_on_every_dashboard(shared_url: str) -> None:
    # the second dashboard was restarted without alice's token, or with it rotated
    for tokens_b in (f"bob:{BOB_SECRET}", f"alice:rotated-{SECRET},bob:{BOB_SECRET}"):
        with two_dashboards(shared_url, tokens_b=tokens_b) as (first, second):
            first.login()
            copied = session_cookie(first)
            csrf = first.csrf()
            use_cookie(second, copied)
            assert signed_in_as(second) is None, tokens_b
            letter = second.run(dead, second.bus, 1)
            before = second.count()
            refused = second.post(f"/dead-letters/{letter.id}/delete", csrf=csrf)
            assert refused.status_code == 403, tokens_b
            assert second.count() == before


# the revocation records ----------------------------------------------------------------


FAR_AWAY = 2**40  # a session's end no real clock reaches


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.monotonic = 50.0


async def test_revocations_expire_with_their_session(tmp_path: Path) -> None:
    store = open_test_store("sqlite", tmp_path)
    clocks = Clocks()
    revocations = Revocations(store, wall_clock=lambda: clocks.wall)
    await store.connect()
    try:
        await revocations.revoke("s1", int(clocks.wall) + 100, "alice")
        await revocations.revoke("s2", int(clocks.wall) + 500, "bob")
        keys = [r.key for r in await store.list_control(PREFIX)]
        assert keys == [PREFIX + "s1", PREFIX + "s2"]
        assert (await store.get_control(PREFIX + "s1")) is not None
        clocks.wall += 101
        assert await revocations.prune() == 1
        assert [r.key for r in await store.list_control(PREFIX)] == [PREFIX + "s2"]
        assert not revocations.known_revoked("s1")
        assert revocations.known_revoked("s2")
        await revocations.revoke("s2", int(clocks.wall) + 399, "bob")  # twice: no error
        assert await revocations.is_revoked("s2")
    finally:
        await store.close()


async def test_page_views_read_a_cached_answer_and_posts_a_fresh_one(tmp_path: Path) -> None:
    store: Store = open_test_store("sqlite", tmp_path)
    clocks = Clocks()
    viewer = Revocations(store, fresh_for=5.0, monotonic=lambda: clocks.monotonic)
    other = Revocations(store)  # another dashboard process
    await store.connect()
    try:
        assert not await viewer.refresh("s1")
        await other.revoke("s1", FAR_AWAY, "alice")
        assert not await viewer.refresh("s1")  # within 5 s: the cached answer
        assert not viewer.known_revoked("s1")
        clocks.monotonic += 5.0
        assert await viewer.refresh("s1")
        assert viewer.known_revoked("s1")
        # a data-changing request never waits for the cache
        assert not await viewer.refresh("s2")
        await other.revoke("s2", FAR_AWAY, "alice")
        assert await viewer.is_revoked("s2")
    finally:
        await store.close()
