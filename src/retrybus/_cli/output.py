"""JSON output for scripts (``--json``): records as objects with ISO 8601 timestamps.

This module does not import Rich; ``views`` draws the tables people read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import typer

from .._records import DeadLetterItem, RetryItem

__all__ = ["echo_json", "record_to_dict"]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def record_to_dict(record: RetryItem | DeadLetterItem) -> dict[str, Any]:
    """Every field of a retry item or dead letter, JSON-ready (times as ISO 8601 strings)."""
    return {field.name: _plain(getattr(record, field.name)) for field in dataclasses.fields(record)}


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    typer.echo(json.dumps(_plain(value), indent=2, ensure_ascii=False))
