"""Load an engine's named queries from the ``.sql`` file beside it."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(filename: str) -> dict[str, str]:
    """Split ``filename`` (in this package) at its ``-- name: X`` comments."""
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        queries[name] = body.strip()
    return queries


def placeholders(count: int) -> str:
    """``?, ?, ?`` for an ``IN (…)`` list of ``count`` parameters."""
    return ", ".join("?" * count)
