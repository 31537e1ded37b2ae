"""``/login`` is rate-limited per client: 10 failed attempts a minute, then a 429
page with ``Retry-After``; a successful log-in clears the count; other clients
are not affected. Time is the bus's ManualClock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from dashboard_support import BASE, SECRET, TOKENS, Dash, form_csrf, open_test_store, running
from retrybus import EventBus, ManualClock
from retrybus.dashboard import create_app
from retrybus.dashboard._auth import SESSION_COOKIE
from retrybus.dashboard._login_limit import LoginLimiter


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path)) as opened:
        yield opened


def attempt(client: TestClient, token: str) -> int:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"token": token, "csrf": form_csrf(page.text)},
        headers={"origin": BASE},
        follow_redirects=False,
    )
    return int(response.status_code)


def test_ten_failed_log_ins_a_minute_then_a_429_with_retry_after(dash: Dash) -> None:
    for _ in range(10):
        assert attempt(dash.client, "wrong-token") == 403
    dash.clock.advance(20)
    page = dash.get("/login")
    refused = dash.client.post(
        "/login",
        data={"token": SECRET, "csrf": form_csrf(page.text)},
        headers={"origin": BASE},
        follow_redirects=False,
    )
    assert refused.status_code == 429  # even with the right token
    assert refused.headers["retry-after"] == "40"
    assert "Too many log-in attempts" in refused.text
    assert "try again in 40 s" in refused.text
    assert SESSION_COOKIE not in dash.client.cookies
    dash.clock.advance(40)  # the first failures leave the window
    assert attempt(dash.client, SECRET) == 303
    assert SESSION_COOKIE in dash.client.cookies


def test_failures_with_a_bad_login_form_count_too(dash: Dash) -> None:
    dash.get("/login")
    for _ in range(10):
        response = dash.client.post(
            "/login", data={"token": SECRET, "csrf": "f" * 64}, headers={"origin": BASE}
        )
        assert response.status_code == 403
    assert attempt(dash.client, SECRET) == 429


def test_a_successful_log_in_clears_the_count(dash: Dash) -> None:
    for _ in range(9):
        assert attempt(dash.client, "wrong-token") == 403
    assert attempt(dash.client, SECRET) == 303
    for _ in range(10):
        assert attempt(dash.client, "wrong-token") == 403
    assert attempt(dash.client, "wrong-token") == 429


def test_each_client_address_is_counted_apart(tmp_path: Path) -> None:
    bus = EventBus(open_test_store("memory", tmp_path), clock=ManualClock())
    app = create_app(bus, tokens=TOKENS, background=False)
    with (
        TestClient(app, base_url=BASE, client=("10.0.0.1", 4000)) as guessing,
        TestClient(app, base_url=BASE, client=("10.0.0.2", 4000)) as other,
    ):
        for _ in range(10):
            assert attempt(guessing, "wrong-token") == 403
        assert attempt(guessing, SECRET) == 429
        assert attempt(other, SECRET) == 303
        assert attempt(guessing, SECRET) == 429  # the other's success clears only its own


def test_the_limiter_forgets_old_failures_and_refuses_bad_settings() -> None:
    now = [0.0]
    limiter = LoginLimiter(lambda: now[0], limit=3, window=10)
    for _ in range(3):
        assert limiter.retry_after("a") is None
        limiter.failed("a")
        now[0] += 1
    assert limiter.retry_after("a") == 7  # the first failure (at 0) leaves at 10
    now[0] = 10.0
    assert limiter.retry_after("a") is None
    limiter.failed("a")
    assert limiter.retry_after("a") == 1  # failures at 1, 2 and 10: the one at 1 leaves at 11
    with pytest.raises(ValueError, match="0"):
        LoginLimiter(lambda: 0.0, limit=0)
    with pytest.raises(ValueError, match="-1"):
        LoginLimiter(lambda: 0.0, window=-1)
