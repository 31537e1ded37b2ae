"""The operator's side of transports: ``retrybus worker --transport/--prefetch`` and
``retrybus transport check``, against the memory transport (in-process: one
opened by URL is empty, so its reports come through ``check_report`` and
``show_report`` given the transport object) and every other transport of
tests/transports (through its URL, as an operator runs it)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from retrybus import Event, EventBus, open_store
from retrybus._cli.app import app
from retrybus._cli.session import CliError, use_transport_url
from retrybus._cli.transport import check_report, show_report
from retrybus._transports.base import Transport, TransportSettings
from retrybus._transports.memory import MemoryTransport
from transports._common import all_transports

APPS = Path(__file__).parent / "apps"
RETRYBUS = Path(sys.executable).parent / "retrybus"
TRANSPORTS = all_transports()
BROKERS = [kind for kind in TRANSPORTS if kind != "memory"]
SETTINGS = TransportSettings()

runner = CliRunner()


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(arg) for arg in args], env=env)


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[0]


# retrybus worker --transport / --prefetch ---------------------------------------


def _worker(*options: object, env: dict[str, str] | None = None) -> Result:
    return invoke(
        "worker", "cli_app:bus", "--store", "memory://", "--app-dir", APPS, *options, env=env
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("bogus://x", "unknown transport URL scheme 'bogus'"),
        ("nowhere", "a transport URL must look like scheme://"),
        ("memory://somewhere", "malformed memory transport URL 'memory://somewhere'"),
    ],
)
def test_worker_with_a_bad_transport_url_is_a_usage_error_naming_it(url: str, says: str) -> None:
    line = one_line_error(_worker("--transport", url), code=2)
    assert line.startswith("Error: --transport"), line
    assert says in line, line
    assert url in line, line


def test_worker_names_the_variable_a_bad_transport_url_came_from() -> None:
    line = one_line_error(_worker(env={"RETRYBUS_TRANSPORT": "bogus://x"}), code=2)
    assert line.startswith("Error: $RETRYBUS_TRANSPORT: unknown transport URL scheme 'bogus'"), line


def test_worker_hides_the_password_of_a_bad_transport_url() -> None:
    line = one_line_error(_worker("--transport", "bogus://me:s3cret@host/"), code=2)
    assert "s3cret" not in line, line
    assert "me:***@host" in line, line


def test_worker_refuses_a_prefetch_below_one() -> None:
    result = _worker("--transport", "memory://", "--prefetch", "0")
    assert result.exit_code == 2
    assert "--prefetch: must be >= 1, got '0'" in result.output


def test_use_transport_url_puts_the_bus_on_the_broker() -> None:
    bus = EventBus(open_store("memory://"))
    use_transport_url(bus, "memory://")
    assert isinstance(bus.transport, MemoryTransport)
    with pytest.raises(CliError, match=r"^\$RETRYBUS_TRANSPORT: unknown") as raised:
        use_transport_url(bus, "bogus://u:pw@h/0", "$RETRYBUS_TRANSPORT")
    assert raised.value.code == 2
    assert "bogus://u:***@h/0" in str(raised.value)
    assert "pw" not in str(raised.value)


def test_worker_process_consumes_from_the_transport_it_is_given(tmp_path: Path) -> None:
    command = [
        str(RETRYBUS),
        *f"worker cli_app:bus --store memory:// --app-dir {APPS} --check-interval 0.1".split(),
        *("--transport", "memory://", "--prefetch", "4"),
    ]
    worker = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stderr is not None
        seen: list[str] = []
        for line in worker.stderr:  # the start log, line by line, until it consumes
            seen.append(line)
            if "consuming from memory://" in line:
                break
        worker.send_signal(signal.SIGTERM)
        _, rest = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, "".join(seen) + rest
    assert "consuming from memory:// (comment.created, like.added)" in seen[-1], seen


# retrybus transport check, by URL -----------------------------------------------


def test_check_of_an_empty_memory_broker_is_healthy() -> None:
    result = invoke("transport", "check", "memory://")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "transport memory — memory://"
    assert "no services on the broker: none declared, none asked for" in lines
    assert lines[-1] == "healthy"
    report = json.loads(invoke("transport", "check", "memory://", "--json").stdout)
    assert report == {
        "url": "memory://",
        "kind": "memory",
        "healthy": True,
        "services": [],
        "extra": {},
        "warnings": [],
    }


def test_check_fails_for_a_service_the_broker_does_not_hold() -> None:
    result = invoke("transport", "check", "memory://", "--service", "billing")
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "service billing  PROBLEM" in out
    assert "│ problems  │ not declared" in out
    assert out.splitlines()[-1] == "1 service with problems"
    result = invoke("transport", "check", "memory://", "--service", "billing", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["healthy"] is False
    assert report["services"] == [
        {
            "service": "billing",
            "holders": [],
            "lag": None,
            "in_flight": None,
            "consumers": None,
            "problems": ["not declared"],
        }
    ]


def test_check_takes_the_url_from_the_environment() -> None:
    result = invoke("transport", "check", env={"RETRYBUS_TRANSPORT": "memory://"})
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "transport memory — memory://"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bogus://x"], "unknown transport URL scheme 'bogus'"),
        (["memory://?x=1"], "malformed memory transport URL 'memory://?x=1'"),
        (["memory://", "--service", "no way"], "--service 'no way': a service name is"),
    ],
)
def test_check_with_a_bad_argument_is_a_usage_error_naming_it(args: list[str], says: str) -> None:
    assert says in one_line_error(invoke("transport", "check", *args), code=2)


@pytest.mark.parametrize("kind", [k for k in BROKERS if TRANSPORTS[k].UNREACHABLE_URL])
def test_check_of_an_unreachable_broker_is_a_one_line_error(kind: str) -> None:
    url = TRANSPORTS[kind].UNREACHABLE_URL
    result = invoke("transport", "check", url, "--timeout", "20")
    line = one_line_error(result, code=1)
    assert "Traceback" not in result.output, line


@pytest.mark.parametrize("kind", BROKERS)
async def test_check_by_url_shows_a_declared_service_with_its_lag(kind: str) -> None:
    module = TRANSPORTS[kind]
    async with module.open_test_transport() as transport:
        await _declare_with_messages(transport, "billing", 2)
        url = module.namespace_url(transport)
        result = await asyncio.to_thread(
            invoke, "transport", "check", url, "--service", "billing", "--json"
        )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == kind
    assert report["healthy"] is True
    [billing] = [s for s in report["services"] if s["service"] == "billing"]
    assert billing["problems"] == []
    assert billing["holders"]
    assert billing["lag"] in (2, None)


# retrybus transport check, given the transport object ---------------------------


async def _declare_with_messages(transport: Transport, service: str, count: int) -> None:
    await transport.declare(service, ["invoice.*"], SETTINGS)
    await transport.send([Event("invoice.paid", {"n": n}) for n in range(count)])


@pytest.fixture(params=list(TRANSPORTS))
async def transport(request: pytest.FixtureRequest) -> Any:
    async with TRANSPORTS[request.param].open_test_transport() as opened:
        yield opened


async def test_a_report_shows_each_service_its_lag_and_consumers(
    transport: Transport, capsys: pytest.CaptureFixture[str]
) -> None:
    await _declare_with_messages(transport, "billing", 3)
    receiver = await transport.receiver("billing", "w1", SETTINGS)
    try:
        taken = await receiver.receive(1, 5.0)
        assert len(taken) == 1
        report = await check_report(transport, ["billing"])
        assert show_report(report) == 0
    finally:
        await receiver.close()
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"transport {transport.kind} — {transport.url}"
    assert "service billing" in out
    assert "PROBLEM" not in out
    assert out.splitlines()[-1] == "healthy"
    [billing] = [s for s in report.services if s.service == "billing"]
    if transport.kind == "memory":
        assert "│ holders   │ queue billing (invoice.*)" in out
        assert (billing.lag, billing.in_flight, billing.consumers) == (3, 1, 1)
        assert "│ lag       │ 3 " in out
        assert "│ in flight │ 1 " in out
        assert "│ consumers │ 1 " in out


async def test_a_report_of_a_missing_service_exits_1_and_json_says_why(
    transport: Transport, capsys: pytest.CaptureFixture[str]
) -> None:
    await _declare_with_messages(transport, "billing", 1)
    report = await check_report(transport, ["billing", "ghost"])
    assert show_report(report, as_json=True) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["healthy"] is False
    by_name = {s["service"]: s for s in shown["services"]}
    assert by_name["billing"]["problems"] == []
    assert by_name["ghost"]["problems"]


async def test_a_report_shows_the_rest_of_the_topology_and_warnings_without_failing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    transport = MemoryTransport()
    await _declare_with_messages(transport, "billing", 1)
    report = await check_report(transport)
    # what a broker adds to its report (Redis: its streams and persistence)
    report.extra["stream retrybus"] = {"length": 1, "groups": ["billing"]}
    report.extra["persistence"] = "none"
    report.warnings.append("Redis keeps no AOF: messages are lost when it restarts")
    assert show_report(report) == 0
    out = capsys.readouterr().out
    assert '│ stream retrybus │ {"length": 1, "groups": ["billing"]} │' in out
    assert "│ persistence     │ none " in out
    assert "WARNING Redis keeps no AOF: messages are lost when it restarts" in out
    assert out.splitlines()[-1] == "healthy"
    assert show_report(report, as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["extra"]["stream retrybus"] == {"length": 1, "groups": ["billing"]}
    assert shown["warnings"] == ["Redis keeps no AOF: messages are lost when it restarts"]
