"""The README's outbox and inbox examples run as pasted, each against a fresh
PostgreSQL database of its own (``DATABASE_URL``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appdb import fresh_database
from readme_examples import example, run_script


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def run(code: str, database: str, directory: Path) -> str:
    env = {"DATABASE_URL": database, "PATH": "/usr/bin:/bin"}
    return run_script(code, directory, env=env, timeout=120).stdout


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
