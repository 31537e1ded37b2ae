"""Load an engine's named queries from the ``.sql`` file beside it."""

from __future__ import annotations

import pkgutil
import re

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(filename: str, package: str | None = None) -> dict[str, str]:
    """Split ``filename`` (in ``package``, by default this one) at its
    ``-- name: X`` comments."""
    package = package or __package__
    # pkgutil rather than importlib.resources, which imports zipfile, tempfile,
    # shutil, bz2 and lzma: half a megabyte in every worker
    data = pkgutil.get_data(package, filename)
    if data is None:  # pragma: no cover - a loader that cannot read package data
        raise FileNotFoundError(f"{filename} is missing from {package}")
    text = data.decode("utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        queries[name] = body.strip()
    return queries


def placeholders(count: int) -> str:
    """``?, ?, ?`` for an ``IN (…)`` list of ``count`` parameters."""
    return ", ".join("?" * count)
