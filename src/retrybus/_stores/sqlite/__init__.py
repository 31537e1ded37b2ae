"""The SQLite store (``sqlite:///path/to.db``): ``SQLiteStore`` and its schema version."""

from __future__ import annotations

from .migrate import SCHEMA_VERSION
from .store import SQLiteStore

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]
