"""``retrybus dashboard``: its options, one-line errors, and the real server process
(uvicorn) serving a SQLite store, read-only without a token."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

import retrybus
from dashboard_support import SECRET, dead, serve_cli
from retrybus import EventBus
from retrybus._cli.app import app

runner = CliRunner()


def seeded(tmp_path: Path, letters: int = 2) -> str:
    url = f"sqlite:///{tmp_path / 'served.db'}"

    async def seed() -> None:
        async with EventBus(retrybus.open_store(url)) as bus:
            for n in range(letters):
                await dead(bus, n)

    asyncio.run(seed())
    return url


def test_the_command_is_listed_with_its_options() -> None:
    result = runner.invoke(app, ["dashboard", "--help"])
    assert result.exit_code == 0
    for option in ("--store", "--host", "--port", "--app", "--app-dir", "RETRYBUS_DASHBOARD_TOKEN"):
        assert option in result.output
    assert "dashboard" in runner.invoke(app, ["--help"]).output


@pytest.mark.parametrize(
    ("args", "env", "code", "named"),
    [
        (["--store", "nosuch://x"], {}, 2, "nosuch"),
        (["--store", "sqlite:///{tmp}/missing.db"], {}, 1, "missing.db"),
        (
            ["--store", "memory://"],
            {"RETRYBUS_DASHBOARD_TOKEN": "bad name:secret"},
            2,
            "'bad name'",
        ),
        (["--store", "memory://", "--app", "nomodule_here:bus"], {}, 2, "nomodule_here"),
        ([], {"RETRYBUS_STORE": None, "RETRYBUS_APP": None}, 2, "--store"),
        (["--store", "memory://", "--trusted-origin", "ops.example.com"], {}, 2, "'ops.example"),
    ],
)
def test_bad_arguments_give_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str | None], code: int, named: str
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["dashboard", *args], env=env)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert named in lines[0]
    assert "secret" not in lines[0].replace("name:secret", "")


def test_the_server_serves_the_store_and_says_how_it_runs(tmp_path: Path) -> None:
    url = seeded(tmp_path)
    with serve_cli(url, tmp_path) as served:
        with urllib.request.urlopen(served.url + "/dead-letters") as response:
            html = response.read().decode()
        assert html.count('href="/dead-letters/dlq_') == 4  # two rows, two links each
        assert "Read-only" not in html
        # a script acts with a bearer token, no cookie or CSRF token needed
        letter_id = html.split('href="/dead-letters/')[1].split('"')[0]
        request = urllib.request.Request(
            f"{served.url}/dead-letters/{letter_id}/delete",
            data=b"",
            method="POST",
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        opener = urllib.request.build_opener(_NoRedirect())
        with pytest.raises(urllib.error.HTTPError) as redirected:
            opener.open(request)
        assert redirected.value.code == 303
    output = served.output()
    assert f"retrybus dashboard on {served.url}/" in output
    assert "tokens: alice, bob" in output
    assert SECRET not in output
    assert "reprocess is off" in output

    async def count() -> int:
        async with EventBus(retrybus.open_store(url)) as bus:
            return await bus.dead_letters.count()

    assert asyncio.run(count()) == 1


def test_without_a_token_the_server_is_read_only(tmp_path: Path) -> None:
    url = seeded(tmp_path, letters=1)
    with serve_cli(url, tmp_path, token=None) as served:
        with urllib.request.urlopen(served.url + "/") as response:
            assert "<strong>Read-only.</strong>" in response.read().decode()
        request = urllib.request.Request(
            served.url + "/dead-letters/bulk",
            data=b"action=delete",
            method="POST",
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 403
    assert "read-only: RETRYBUS_DASHBOARD_TOKEN is not set" in served.output()


def test_with_an_app_reprocess_is_on(tmp_path: Path) -> None:
    url = seeded(tmp_path, letters=1)
    apps = Path(__file__).parent / "apps"
    extra = ("--app", "cli_app:bus", "--app-dir", str(apps))
    with serve_cli(url, tmp_path, extra=extra) as served:
        request = urllib.request.Request(
            served.url + "/dead-letters", headers={"Authorization": f"Bearer {SECRET}"}
        )
        with urllib.request.urlopen(request) as response:
            html = response.read().decode()
    assert "reprocess is off" not in served.output()
    assert "Reprocess all…</a>" in html
    assert "start it with --app" not in html


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None
