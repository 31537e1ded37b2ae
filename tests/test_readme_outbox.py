"""The README's outbox and inbox examples run as pasted, each against a fresh
PostgreSQL database of its own (``DATABASE_URL``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appdb import fresh_database

README = Path(__file__).parent.parent / "README.md"


def example(marker: str) -> str:
    """The README's Python block that starts with ``# <marker>``."""
    text = README.read_text(encoding="utf-8")
    for block in text.split("```python\n")[1:]:
        code = block.split("```", 1)[0]
        if code.startswith(f"# {marker}\n"):
            return code
    raise AssertionError(f"no README example marked {marker!r}")


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def run(code: str, database: str, directory: Path) -> str:
    script = directory / "example.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"DATABASE_URL": database, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ("outbox example: asyncpg", "confirming order 1"),
        ("outbox example: sqlalchemy", "confirming order 2"),
        ("inbox example: asyncpg", "shipments: 1"),
    ],
)
async def test_the_readme_example_runs_as_pasted(
    marker: str, expected: str, database: str, tmp_path: Path
) -> None:
    output = run(example(marker), database, tmp_path)
    assert output.splitlines() == [expected]
