"""The event: immutable, with CloudEvents 1.0 attribute names, JSON data only."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = ["Event", "check_text", "encode_json", "lifted", "printable", "stamped"]

_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,64}$")
_RESERVED = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "data",
        "subject",
        "datacontenttype",
        "data_base64",
    }
)
_EMPTY: Mapping[str, str] = MappingProxyType({})
# payloads that JSON gives back as they are, and that no handler can change
_IMMUTABLE_JSON = frozenset({str, int, float, bool, type(None)})


#: compact, strict JSON (no NaN), built once: ``json.dumps`` with arguments builds an encoder per call
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

# UTF-8, which every store writes, cannot encode a lone surrogate; PostgreSQL's
# text cannot hold NUL. An event's attributes refuse both (CloudEvents 1.0 rules
# them out of its String type too); its JSON data refuses surrogates only (NUL
# travels in JSON as \u0000, which every store keeps).
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUL_OR_SURROGATE = re.compile("[\x00\ud800-\udfff]")


def _describe(char: str) -> str:
    if char == "\x00":
        return "a NUL character ('\\x00')"
    return f"an unpaired surrogate ({char!r})"


def check_text(value: str, what: str) -> str:
    """``value`` unchanged, or ``ValueError`` naming ``what`` when it holds a
    character no store can keep as text (NUL, an unpaired surrogate)."""
    if not value.isascii() or "\x00" in value:
        found = _NUL_OR_SURROGATE.search(value)
        if found is not None:
            raise ValueError(
                f"{what} holds {_describe(found.group())}, which no store can keep "
                f"as text: {value!r}"
            )
    return value


def printable(text: str) -> str:
    """``text`` with NUL and unpaired surrogates written as escapes (``\\x00``,
    ``\\udc80``): for what retrybus records about a failure (an error message, a
    traceback, a reason), which must never fail to be stored."""
    if text.isascii() and "\x00" not in text:
        return text
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a JSON value the first string holding a surrogate is (``['a'][0]``)."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _SURROGATE.search(key):
                return f"the key {key!r}" + (f" in {path}" if path else "")
            found = _surrogate_path(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _surrogate_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def encode_json(value: Any, what: str) -> str:
    """Encode ``value`` as compact JSON, or raise ``TypeError`` naming ``what``
    (not JSON), ``ValueError`` (a string holding an unpaired surrogate, which
    no store can keep)."""
    try:
        text = compact_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(
            f"{what} must be a JSON value (dict, list, str, number, bool or None): {exc}"
        ) from None
    if not text.isascii() and _SURROGATE.search(text):
        where = _surrogate_path(value) or ""
        raise ValueError(
            f"{what}{' at ' + where if where else ''} holds an unpaired surrogate, "
            "which no store can keep (UTF-8 cannot encode it)"
        )
    return text


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, as CloudEvents' JSON format writes ``time``."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str, what: str = "time") -> datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be an RFC 3339 string, got {text!r}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} is not an RFC 3339 timestamp: {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"{what} must carry a UTC offset: {text!r}")
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True, eq=True, init=False)
class Event:
    """Something that happened, handed to every handler subscribed to its ``type``.

    >>> Event("like.added", {"post_id": 7, "user_id": 3}, source="social-service")

    ``data`` must be a JSON value (it is stored as JSON, never pickled); ``time``
    must be timezone-aware and is kept in UTC; ``extensions`` carry string
    attributes such as ``traceparent`` or a correlation id.
    """

    type: str
    data: Any
    source: str
    id: str
    time: datetime
    subject: str | None
    extensions: Mapping[str, str]
    _data_json: str = field(repr=False, compare=False)

    def __init__(
        self,
        type: str,
        data: Any = None,
        *,
        source: str = "",
        id: str | None = None,
        time: datetime | None = None,
        subject: str | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(type, str) or not type:
            raise ValueError(f"Event type must be a non-empty string, got {type!r}")
        check_text(type, "Event type")
        if not isinstance(source, str):
            raise TypeError(f"Event source must be a string, got {source!r}")
        check_text(source, "Event source")
        if id is None:
            id = str(uuid.uuid4())
        elif not isinstance(id, str) or not id:
            raise ValueError(f"Event id must be a non-empty string, got {id!r}")
        else:
            check_text(id, "Event id")
        if time is None:
            time = datetime.now(UTC)
        elif not isinstance(time, datetime) or time.tzinfo is None:
            raise ValueError(f"Event time must be a timezone-aware datetime, got {time!r}")
        else:
            time = time.astimezone(UTC)
        if subject is not None:
            if not isinstance(subject, str):
                raise TypeError(f"Event subject must be a string or None, got {subject!r}")
            check_text(subject, "Event subject")
        data_json = encode_json(data, f"data of event {type!r}")
        setter = object.__setattr__
        setter(self, "type", type)
        # the event keeps its data as its JSON form, a copy of its own: what the
        # caller changes afterwards is not the event's, and what handlers and the
        # store see (string keys, lists for tuples) is what ``data`` says
        setter(self, "data", _json_form(data, data_json))
        setter(self, "source", source)
        setter(self, "id", id)
        setter(self, "time", time)
        setter(self, "subject", subject)
        setter(self, "extensions", _check_extensions(extensions))
        setter(self, "_data_json", data_json)

    @classmethod
    def from_stored(
        cls,
        *,
        type: str,
        data: Any,
        source: str,
        id: str,
        time: datetime,
        subject: str | None,
        extensions: Mapping[str, str],
    ) -> Event:
        """Rebuild an event read back from a store, skipping the checks it passed
        when it was first built (for store engines and records, not for new events)."""
        event = object.__new__(cls)
        _set_type(event, type)
        _set_data(event, data)
        _set_source(event, source)
        _set_id(event, id)
        _set_time(event, time)
        _set_subject(event, subject)
        _set_extensions(event, MappingProxyType(dict(extensions)) if extensions else _EMPTY)
        _set_data_json(event, "")
        return event

    def __hash__(self) -> int:
        return hash(self.id)

    def with_extensions(self, extensions: Mapping[str, str]) -> Event:
        """This event with ``extensions`` added to (or replacing) its own; the
        rest, id and time included, is unchanged."""
        return self._with_checked_extensions(_check_extensions(extensions))

    def _with_checked_extensions(self, extensions: Mapping[str, str]) -> Event:
        """``with_extensions`` for extensions already known to be valid."""
        return stamped(self, extensions)

    def copy(self) -> Event:
        """This event with a payload of its own (a copy of ``data``, which is
        already in its JSON form): what every handler call receives, the first
        as much as a retry, so that no handler sees another's changes."""
        if type(self.data) in _IMMUTABLE_JSON:
            return self
        event = object.__new__(type(self))
        _set_type(event, self.type)
        _set_data(event, _json_copy(self.data))
        _set_source(event, self.source)
        _set_id(event, self.id)
        _set_time(event, self.time)
        _set_subject(event, self.subject)
        _set_extensions(event, self.extensions)
        _set_data_json(event, self._data_json)
        return event

    @property
    def data_json(self) -> str:
        """``data`` encoded as compact JSON (computed once)."""
        if not self._data_json:
            object.__setattr__(
                self, "_data_json", encode_json(self.data, f"data of event {self.type!r}")
            )
        return self._data_json

    def to_dict(self) -> dict[str, Any]:
        """The CloudEvents 1.0 JSON structured form of this event."""
        out: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": format_time(self.time),
            "datacontenttype": "application/json",
        }
        if self.subject is not None:
            out["subject"] = self.subject
        out.update(self.extensions)
        out["data"] = self.data
        return out

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Event:
        """Read an event from the CloudEvents 1.0 JSON structured form.

        Attributes other than the core ones become extensions (string values only).
        """
        if not isinstance(document, Mapping):
            raise TypeError(f"a CloudEvent must be a JSON object, got {document!r}")
        version = document.get("specversion")
        if version != "1.0":
            raise ValueError(f"unsupported CloudEvents specversion {version!r}; expected '1.0'")
        if "data_base64" in document:
            raise ValueError(
                "binary CloudEvents data (data_base64) is not supported: data must be JSON"
            )
        content_type = document.get("datacontenttype")
        if content_type is not None and "json" not in str(content_type):
            raise ValueError(f"unsupported datacontenttype {content_type!r}: data must be JSON")
        time_text = document.get("time")
        extensions = {key: value for key, value in document.items() if key not in _RESERVED}
        return cls(
            document.get("type"),  # type: ignore[arg-type]  # checked by __init__
            document.get("data"),
            source=document.get("source", ""),
            id=document.get("id"),
            time=parse_time(time_text) if time_text is not None else None,
            subject=document.get("subject"),
            extensions=extensions,
        )


# the slots' own setters: the fast constructors above fill a new event through
# them (a frozen dataclass's fields, without object.__setattr__'s lookup by name)
(
    _set_type,
    _set_data,
    _set_source,
    _set_id,
    _set_time,
    _set_subject,
    _set_extensions,
    _set_data_json,
) = (
    vars(Event)[name].__set__
    for name in ("type", "data", "source", "id", "time", "subject", "extensions", "_data_json")
)


def stamped(event: Event, extensions: Mapping[str, str]) -> Event:
    """``event`` with ``extensions`` added, for extensions retrybus made itself and
    knows to be valid (a registered type's ``dataversion``): no checks. A
    ``MappingProxyType`` given is shared by the events whose own extensions it
    all replaces (the caller must not change what it reads)."""
    return lifted(event, event.type, event.data, extensions)


def lifted(event: Event, name: str, data: Any, extensions: Mapping[str, str]) -> Event:
    """``event`` read as the type ``name`` with ``data`` (what upcasters made of its
    data, or its data itself) and ``extensions`` added, as ``stamped`` adds them."""
    own = event.extensions
    if type(extensions) is MappingProxyType and (not own or own.keys() <= extensions.keys()):
        merged = extensions
    else:
        merged = MappingProxyType({**own, **extensions})
    derived = object.__new__(type(event))
    _set_type(derived, name)
    _set_data(derived, data)
    _set_source(derived, event.source)
    _set_id(derived, event.id)
    _set_time(derived, event.time)
    _set_subject(derived, event.subject)
    _set_extensions(derived, merged)
    _set_data_json(derived, event._data_json if data is event.data else "")
    return derived


class _NotJsonForm(Exception):
    """A value that is not already what JSON decodes to (an int key, a tuple)."""


def _checked_copy(value: Any) -> Any:
    """A deep copy of ``value`` if it is already in JSON form, else ``_NotJsonForm``."""
    kind = type(value)
    if kind is dict:
        copy = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _NotJsonForm
            copy[key] = item if type(item) in _IMMUTABLE_JSON else _checked_copy(item)
        return copy
    if kind is list:
        return [item if type(item) in _IMMUTABLE_JSON else _checked_copy(item) for item in value]
    if kind in _IMMUTABLE_JSON:
        return value
    raise _NotJsonForm


def _json_form(data: Any, data_json: str) -> Any:
    """``data`` as JSON gives it back, a copy of its own: copied directly when it
    already is in that form (most payloads; faster than decoding), else decoded."""
    if type(data) in _IMMUTABLE_JSON:
        return data
    try:
        return _checked_copy(data)
    except (_NotJsonForm, RecursionError):
        return json.loads(data_json)


def _json_copy(value: Any) -> Any:
    """A deep copy of a value in JSON form (dicts, lists and immutable scalars)."""
    if type(value) is dict:
        return {
            key: item if type(item) in _IMMUTABLE_JSON else _json_copy(item)
            for key, item in value.items()
        }
    if type(value) is list:
        return [item if type(item) in _IMMUTABLE_JSON else _json_copy(item) for item in value]
    return value


def _check_extensions(extensions: Mapping[str, str] | None) -> Mapping[str, str]:
    if not extensions:
        return _EMPTY
    if not isinstance(extensions, Mapping):
        raise TypeError(f"Event extensions must be a mapping of str to str, got {extensions!r}")
    for name, value in extensions.items():
        if not isinstance(name, str) or not _EXTENSION_NAME.match(name) or name in _RESERVED:
            raise ValueError(
                f"invalid CloudEvents extension name {name!r}: use lowercase letters and digits, "
                "not a core attribute name"
            )
        if not isinstance(value, str):
            raise TypeError(f"extension {name!r} must be a string, got {value!r}")
        check_text(value, f"extension {name!r}")
    return MappingProxyType(dict(extensions))
