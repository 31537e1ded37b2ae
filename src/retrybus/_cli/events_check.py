"""What ``retrybus events check`` checks: each registered type's upcaster chain
and schema, and sample payloads of each version run through the chain and the
current schema, as a delivery reads them.

Samples live in a directory, one folder per type (its name or an alias):
``DIR/<type>/v<N>.json`` holds one payload of version N, or a JSON list of
payloads; ``DIR/<type>/v<N>/*.json`` one payload (or list) per file. Nothing
here imports Typer or Rich.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import VersionError
from .._event import Event
from .._event_types import VERSION_EXTENSION, EventType

__all__ = ["EventsCheck", "SampleResult", "TypeCheck", "check_event_types"]

_VERSION_NAME = re.compile(r"v([0-9]+)")
#: the source of the events samples are read as (an upcaster may ask for the event)
SAMPLE_SOURCE = "retrybus events check"


@dataclass(frozen=True, slots=True)
class TypeCheck:
    """One registered type: the versions its chain reads (``oldest`` to
    ``current``), and what building its pydantic schema's JSON schema said
    (``schema_error``; ``schema_checked`` False when it has no pydantic schema)."""

    event_type: str
    oldest: int
    current: int
    schema: str | None
    schema_checked: bool
    schema_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.schema_error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.event_type,
            "oldest_version": self.oldest,
            "version": self.current,
            "versions": list(range(self.oldest, self.current + 1)),
            "schema": self.schema,
            "schema_checked": self.schema_checked,
            "ok": self.ok,
            "error": self.schema_error,
        }


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One sample payload (its ``path`` within the samples directory, its ``index``
    within the file when the file holds a list)
    of ``event_type`` at ``version``, and the error that reading it met (None: it
    came out valid at the current version)."""

    path: str
    event_type: str
    version: int | None
    index: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def where(self) -> str:
        return self.path if self.index is None else f"{self.path}[{self.index}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "index": self.index,
            "type": self.event_type,
            "version": self.version,
            "ok": self.ok,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class EventsCheck:
    """Everything ``retrybus events check`` found."""

    types: list[TypeCheck]
    samples: list[SampleResult] = field(default_factory=list)
    samples_dir: str | None = None

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.types) and all(s.ok for s in self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "types": [t.to_dict() for t in self.types],
            "samples_dir": self.samples_dir,
            "samples": [s.to_dict() for s in self.samples],
        }


def check_event_types(types: Iterable[EventType], samples: Path | None = None) -> EventsCheck:
    """Check every type in ``types`` and, with ``samples``, every sample there."""
    types = list(types)
    checked = [_check_type(t) for t in types]
    if samples is None:
        return EventsCheck(checked)
    by_name = {name: t for t in types for name in (t.name, *t.aliases)}
    results = list(_check_samples(samples, by_name))
    return EventsCheck(checked, results, str(samples))


def _check_type(event_type: EventType) -> TypeCheck:
    schema = event_type.schema
    build = getattr(schema, "model_json_schema", None)
    checked = isinstance(schema, type) and callable(build)
    error = None
    if checked:
        assert build is not None
        try:
            json.dumps(build())
        except Exception as exc:
            error = f"its schema {event_type.schema_name} builds no JSON schema: {_text(exc)}"
    return TypeCheck(
        event_type.name,
        event_type.oldest_version,
        event_type.version,
        event_type.schema_name,
        checked,
        error,
    )


def _check_samples(directory: Path, by_name: dict[str, EventType]) -> Iterator[SampleResult]:
    if not directory.is_dir():
        yield SampleResult(str(directory), "", None, error="not a directory")
        return
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
        event_type = by_name.get(folder.name)
        for path, version in _sample_files(folder):
            shown = str(path.relative_to(directory))
            if event_type is None:
                yield SampleResult(
                    shown, folder.name, version, error=f"{folder.name!r} is no registered type"
                )
            elif version is None:
                yield SampleResult(
                    shown, folder.name, None, error="not a sample: name it v<N>.json or v<N>/*.json"
                )
            else:
                yield from _check_file(path, shown, folder.name, version, event_type)


def _sample_files(folder: Path) -> Iterator[tuple[Path, int | None]]:
    """The sample files of one type's folder, with the version each names
    (None: the name says none)."""
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            match = _VERSION_NAME.fullmatch(entry.name)
            for path in sorted(entry.glob("*.json")):
                yield path, int(match.group(1)) if match else None
        elif entry.suffix == ".json":
            match = _VERSION_NAME.fullmatch(entry.stem)
            yield entry, int(match.group(1)) if match else None


def _check_file(
    path: Path, shown: str, name: str, version: int, event_type: EventType
) -> Iterator[SampleResult]:
    try:
        loaded = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        yield SampleResult(shown, name, version, error=f"cannot read it: {_text(exc)}")
        return
    if isinstance(loaded, list):
        for index, payload in enumerate(loaded):
            error = _read_sample(payload, name, version, event_type)
            yield SampleResult(shown, name, version, index, error)
    else:
        yield SampleResult(
            shown, name, version, None, _read_sample(loaded, name, version, event_type)
        )


def _read_sample(data: Any, name: str, version: int, event_type: EventType) -> str | None:
    """Why ``data`` of ``version`` does not come out of the chain valid at the
    current version (None: it does)."""
    if version > event_type.version:
        return (
            f"unknown version {version} of {event_type.name} "
            f"(this code knows up to {event_type.version})"
        )
    event = Event(name, data, source=SAMPLE_SOURCE, extensions={VERSION_EXTENSION: str(version)})
    try:
        current = event_type.upcast(event.copy().data, version, event)
        event_type.validated(current)
    except (VersionError, ValueError) as exc:
        return str(exc)
    return None


def _text(error: BaseException) -> str:
    """``Type: message``, the message's first line only (pydantic adds a link)."""
    message = str(error).strip().split("\n", 1)[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
