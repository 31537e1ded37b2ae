"""Running ``retrybus`` commands in tests through Typer's CliRunner, in a thread:
each command runs its own event loop, away from the test's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from typer.testing import CliRunner, Result

from retrybus._cli.app import app

runner = CliRunner()


async def invoke(*args: object, input: str | None = None) -> Result:
    """``retrybus ARGS`` (``input``: what is typed at its prompts)."""
    return await asyncio.to_thread(runner.invoke, app, [str(arg) for arg in args], input=input)


async def ok(*args: object, input: str | None = None) -> Result:
    """``retrybus ARGS``, which must exit 0."""
    result = await invoke(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


async def json_of(*args: object) -> Any:
    """What ``retrybus ARGS --json`` prints, read back."""
    return json.loads((await ok(*args, "--json")).stdout)


def one_line_error(result: Result, code: int) -> str:
    """The command exited with ``code`` and said why in one ``Error:`` line on stderr."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]
