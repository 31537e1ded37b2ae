"""The dashboard against hostile or odd requests: other Host names (DNS rebinding),
bodies from strangers, paging and time values at the edges, JSON nested too deep."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashboard_support import BASE, SECRET, Dash, dead, open_test_store, running
from retrybus._cli.dashboard import _allowed_hosts
from retrybus.dashboard import create_app


@pytest.fixture(params=["memory", "sqlite"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    with running(open_test_store(request.param, tmp_path), handlers=True) as opened:
        yield opened


def test_allowed_hosts_refuse_a_request_for_another_host(tmp_path: Path) -> None:
    store = open_test_store("memory", tmp_path)
    with running(store, allowed_hosts=["testserver", "127.0.0.1"]) as guarded:
        assert guarded.get("/").status_code == 200
        rebound = guarded.get("/", headers={"host": "rebind.attacker.example:8000"})
        assert rebound.status_code == 400


def test_the_cli_answers_to_the_address_it_listens_on() -> None:
    assert _allowed_hosts("127.0.0.1", []) == ["127.0.0.1", "localhost", "::1", "[::1]"]
    assert _allowed_hosts("10.1.2.3", []) == ["10.1.2.3"]
    assert _allowed_hosts("0.0.0.0", []) == ["*"]
    assert _allowed_hosts("0.0.0.0", ["ops.example.com"]) == ["ops.example.com"]


def test_a_strangers_body_is_refused_before_it_is_read(dash: Dash) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(64):  # 64 MiB, chunked: no Content-Length to judge it by
            yield b"x" * (1024 * 1024)

    response = dash.client.post(
        "/dead-letters/selected", content=body(), headers={"origin": "https://evil.example"}
    )
    assert response.status_code == 403


def test_a_chunked_body_over_the_limit_is_refused(dash: Dash) -> None:
    dash.login()
    csrf = dash.csrf()

    def body() -> Iterator[bytes]:
        yield f"csrf={csrf}&ids=".encode()
        for _ in range(3):
            yield b"x" * (1024 * 1024)

    response = dash.client.post(
        "/dead-letters/selected",
        content=body(),
        headers={"origin": BASE, "content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "query",
    [
        "limit=%C2%B2",
        "offset=%C2%B2",
        "offset=9999999999999999999",
        "offset=" + "9" * 5000,
        "until=9999-12-31T23:59:59-14:00",
        "since=0001-01-01T00:00:00%2B14:00",
    ],
)
def test_odd_paging_and_time_values_are_a_400_naming_them(dash: Dash, query: str) -> None:
    paging = query.startswith(("limit", "offset"))
    # the retry queue pages but takes no time filter; failure groups the reverse
    for path in ("/dead-letters", "/retry-queue" if paging else "/groups"):
        response = dash.get(f"{path}?{query}")
        assert response.status_code == 400, (path, query, response.status_code)


def test_a_probe_size_in_other_digits_is_a_400(dash: Dash) -> None:
    dash.run(dead, dash.bus, 1)
    dash.login(SECRET)
    response = dash.post("/dead-letters/bulk", {"action": "requeue", "probe": "\u00b2"})
    assert response.status_code == 400


def test_json_nested_too_deep_is_refused_with_the_edit_form(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    dash.login()
    nested = "[" * 5000 + "]" * 5000
    response = dash.post(f"/dead-letters/{letter.id}/edit", {"data": nested})
    assert response.status_code == 400
    assert "Not valid JSON" in response.text
    assert dash.run(dash.bus.dead_letters.count) == 1


# the Origin check compares the scheme ----------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://testserver", True),
        ("http://testserver:80", True),  # the default port, written out
        ("https://testserver", False),  # same host, another scheme: another origin
        ("http://testserver:8080", False),
        ("https://ops.example.com", True),
        ("https://ops.example.com:443", True),
        ("http://ops.example.com", False),
        ("ops.example.com", False),
    ],
)
def test_the_origin_check_compares_the_scheme_too(
    tmp_path: Path, origin: str, allowed: bool
) -> None:
    with running(
        open_test_store("memory", tmp_path), trusted_origins=["https://ops.example.com"]
    ) as dash:
        letter = dash.run(dead, dash.bus, 1)
        dash.login()
        response = dash.post(f"/dead-letters/{letter.id}/delete", headers={"origin": origin})
        assert response.status_code == (303 if allowed else 403), origin
        assert dash.count() == (0 if allowed else 1)


@pytest.mark.parametrize("origin", ["ops.example.com", "https://", "ftp://ops.example.com"])
def test_a_trusted_origin_without_scheme_and_host_is_refused_naming_it(
    tmp_path: Path, origin: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(origin))):
        create_app(open_test_store("memory", tmp_path), tokens=SECRET, trusted_origins=[origin])


# ids holding a "/" ---------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/dead-letters", "/retry-queue", "/redrives"])
@pytest.mark.parametrize("slash", ["/", "%2F", "%2f"])
@pytest.mark.parametrize("suffix", ["", "/payload.json"])
def test_an_id_holding_a_slash_is_a_404_page(
    dash: Dash, page: str, slash: str, suffix: str
) -> None:
    for word in ("b", "anything"):
        response = dash.get(f"{page}/a{slash}{word}{suffix}")
        assert response.status_code == 404, (page, slash, word, suffix)
        assert "Not found" in response.text or "No such" in response.text


@pytest.mark.parametrize("slash", ["/", "%2F"])
def test_an_action_on_an_id_holding_a_slash_is_a_404_and_changes_nothing(
    dash: Dash, slash: str
) -> None:
    letter = dash.run(dead, dash.bus, 1)
    dash.login()
    for path in (
        f"/dead-letters/{letter.id}{slash}x/delete",
        f"/dead-letters/x{slash}{letter.id}/delete",
        f"/redrives/x{slash}y/cancel",
        f"/retry-queue/x{slash}y/cancel",
    ):
        assert dash.post(path).status_code == 404, path
    assert dash.count() == 1


def test_an_action_url_fetched_with_get_is_still_a_405(dash: Dash) -> None:
    letter = dash.run(dead, dash.bus, 1)
    for action in ("requeue", "reprocess", "delete"):
        assert dash.get(f"/dead-letters/{letter.id}/{action}").status_code == 405
    assert dash.get("/redrives/x/pause").status_code == 405
    assert dash.get(f"/dead-letters/{letter.id}/frobnicate").status_code == 404
