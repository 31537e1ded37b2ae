"""Event types: versions, schemas, upcasters and aliases (``EventBus.event_type``).

A registered type stamps the CloudEvents extension ``dataversion`` on what is
published (``dataschema`` too when given); an event without it is version 1.
Every delivery reads the stored event as the current version: its data lifted
by the upcasters one version at a time, on a copy. The stored payload and
version are never rewritten, so a fixed upcaster and a redrive deliver what a
broken one dead-lettered, and a version newer than this code knows waits in the
dead letter queue for the deploy that knows it.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from ._errors import InvalidEventData, UnknownVersion, UpcastFailed, VersionError
from ._event import Event, check_text, lifted, stamped

__all__ = [
    "SCHEMA_EXTENSION",
    "TYPES_CONTROL_PREFIX",
    "VERSION_EXTENSION",
    "EventType",
    "EventTypes",
    "Reading",
    "Upcaster",
    "Validation",
    "describe_invalid",
    "schema_name",
    "stored_version",
]

#: the CloudEvents extension that carries an event's data version
VERSION_EXTENSION = "dataversion"
#: the CloudEvents attribute naming the schema of an event's data
SCHEMA_EXTENSION = "dataschema"

Validation: TypeAlias = Literal["publish", "deliver", "both"] | None
UnknownVersionAction: TypeAlias = Literal["dead_letter", "deliver"]
#: lifts version n's data to n+1: ``fn(data)`` or ``fn(data, event)``
Upcaster: TypeAlias = Callable[..., Any]

#: the control record of the event types a service registers (``event-types:<service>``)
TYPES_CONTROL_PREFIX = "event-types:"

_EMPTY: Mapping[str, str] = MappingProxyType({})
_VALIDATIONS = ("publish", "deliver", "both", None)
_UNKNOWN_VERSION_ACTIONS = ("dead_letter", "deliver")


def stored_version(event: Event) -> int | str:
    """The data version ``event`` carries (1 when it carries none); the text as
    it is when it is not a version number."""
    text = event.extensions.get(VERSION_EXTENSION)
    if text is None:
        return 1
    if text.isdigit() and text.isascii():
        return int(text)
    return text


def schema_name(schema: object) -> str | None:
    """How a schema is named where people read it (``module.LikeAdded``)."""
    if schema is None:
        return None
    target = getattr(schema, "__wrapped__", schema)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}" if module else str(name)


def describe_invalid(error: BaseException) -> str:
    """A schema's complaint in one line that names the field: pydantic's errors
    as ``post_id: Input should be a valid integer (got 'x')``, others as they say."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            details = errors()
        except Exception:
            details = None
        if isinstance(details, list) and details:
            parts = []
            for detail in details[:5]:
                location = ".".join(str(part) for part in detail.get("loc", ())) or "data"
                got = (
                    f" (got {detail['input']!r})" if "input" in detail and detail.get("loc") else ""
                )
                parts.append(f"{location}: {detail.get('msg', 'invalid')}{got}")
            more = f"; and {len(details) - 5} more" if len(details) > 5 else ""
            return "; ".join(parts) + more
    return f"{type(error).__name__}: {error}"


def _validator(schema: object) -> Callable[[Any], Any] | None:
    """What validates a payload against ``schema``: a pydantic model's
    ``model_validate``, or the callable itself."""
    if schema is None:
        return None
    validate = getattr(schema, "model_validate", None)
    if isinstance(schema, type) and callable(validate):
        return validate  # type: ignore[no-any-return]
    if callable(schema):
        return schema
    raise TypeError(
        f"schema must be a pydantic model or a callable that validates a dict, got {schema!r}"
    )


def _takes_event(upcaster: Upcaster) -> bool:
    """Whether ``upcaster`` asks for the event as well as the data."""
    try:
        signature = inspect.signature(upcaster)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        return True
    return len(positional) >= 2


def _error_text(error: BaseException) -> str:
    message = str(error)
    return f"{type(error).__name__} {message}" if message else type(error).__name__


@dataclass(frozen=True, slots=True, eq=False)
class EventType:
    """One registered event type: its current ``version``, the ``schema`` its data
    follows at that version, the ``upcasters`` that lift each older version's data
    one version up, the old names it is still known by (``aliases``), when its
    data is validated (``validate``), what a newer version than ``version`` meets
    (``unknown_version``) and its ``dataschema`` URI."""

    name: str
    version: int
    schema: object = None
    upcasters: Mapping[int, Upcaster] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    validate: Validation = "publish"
    unknown_version: UnknownVersionAction = "dead_letter"
    dataschema: str | None = None
    _validate: Callable[[Any], Any] | None = field(default=None, repr=False)
    _with_event: frozenset[int] = field(default=frozenset(), repr=False)
    _stamp: Mapping[str, str] = field(default_factory=dict, repr=False)
    # derived in __post_init__, read on every publish and delivery
    _version_text: str = field(default="", init=False, repr=False)
    _on_publish: bool = field(default=False, init=False, repr=False)
    _on_delivery: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        setter = object.__setattr__
        setter(self, "_version_text", str(self.version))
        validates = self._validate is not None
        setter(self, "_on_publish", validates and self.validate in ("publish", "both"))
        setter(self, "_on_delivery", validates and self.validate in ("deliver", "both"))

    @property
    def oldest_version(self) -> int:
        """The oldest version this type's upcasters read (1 when it has none to read)."""
        return min(self.upcasters, default=self.version)

    @property
    def schema_name(self) -> str | None:
        """The schema's name (``module.LikeAdded``), None without one."""
        return schema_name(self.schema)

    @property
    def validates_on_publish(self) -> bool:
        return self._on_publish

    @property
    def validates_on_delivery(self) -> bool:
        return self._on_delivery

    def describe(self) -> dict[str, Any]:
        """This type as a JSON-ready dict (for ``retrybus events --json``)."""
        return {
            "type": self.name,
            "version": self.version,
            "versions": list(range(self.oldest_version, self.version + 1)),
            "schema": self.schema_name,
            "aliases": list(self.aliases),
            "validate": self.validate,
            "unknown_version": self.unknown_version,
            "dataschema": self.dataschema,
        }

    def validated(self, data: Any) -> Any:
        """``data`` as its schema gives it back (a pydantic model), or ``data``
        itself without a schema or when the schema's callable returns None;
        ``ValueError`` naming the field when it does not pass."""
        if self._validate is None:
            return data
        try:
            value = self._validate(data)
        except Exception as exc:
            raise ValueError(
                f"invalid {self.name} v{self.version} data: {describe_invalid(exc)}"
            ) from exc
        return data if value is None else value

    def upcast(self, data: Any, version: int, event: Event) -> Any:
        """``data`` of ``version`` lifted to the current version, one upcaster at a
        time; ``UpcastFailed`` naming the step that raised, ``UnknownVersion``
        for a version no chain starts from."""
        while version < self.version:
            upcaster = self.upcasters.get(version)
            if upcaster is None:
                raise UnknownVersion(
                    f"unknown version {version} of {self.name} (this code reads "
                    f"{self.oldest_version} to {self.version}: no upcaster from v{version})",
                    self.name,
                    version,
                )
            try:
                data = upcaster(data, event) if version in self._with_event else upcaster(data)
            except Exception as exc:
                raise UpcastFailed(
                    f"upcast failed v{version}→v{version + 1}: {_error_text(exc)} ({self.name})",
                    self.name,
                    version,
                ) from exc
            version += 1
        return data


class EventTypes:
    """The event types a bus knows, by name and by alias."""

    def __init__(self) -> None:
        self._types: dict[str, EventType] = {}
        #: every name a type is known by (its own and its aliases) to the type
        self._by_name: dict[str, EventType] = {}
        #: whether any type is registered (read on every delivery: an attribute)
        self.active = False

    def __bool__(self) -> bool:
        return self.active

    def __iter__(self) -> Any:
        return iter(list(self._types.values()))

    def register(
        self,
        name: str,
        *,
        version: int = 1,
        schema: object = None,
        upcasters: Mapping[int, Upcaster] | None = None,
        aliases: Iterable[str] = (),
        validate: Validation = "publish",
        unknown_version: UnknownVersionAction = "dead_letter",
        dataschema: str | None = None,
    ) -> EventType:
        """Register ``name`` (see ``EventBus.event_type``); raises ``ValueError``
        naming the bad argument."""
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "*?["):
            raise ValueError(
                f"an event type must be a non-empty name without wildcards, got {name!r}"
            )
        check_text(name, "event type")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version of {name} must be an int >= 1, got {version!r}")
        chain = dict(upcasters or {})
        for step, upcaster in chain.items():
            if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step < version:
                raise ValueError(
                    f"upcasters of {name} are keyed by the version they lift (1 to "
                    f"{version - 1} for version {version}), got {step!r}"
                )
            if not callable(upcaster):
                raise TypeError(f"upcaster {step} of {name} must be callable, got {upcaster!r}")
        if chain:
            missing = [v for v in range(min(chain), version) if v not in chain]
            if missing:
                raise ValueError(
                    f"upcasters of {name} skip version(s) {', '.join(map(str, missing))}: "
                    f"each version from {min(chain)} to {version - 1} needs one"
                )
        alias_names = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        for alias in alias_names:
            if not isinstance(alias, str) or not alias.strip() or alias == name:
                raise ValueError(f"aliases of {name} must be other type names, got {alias!r}")
            check_text(alias, "event type alias")
        if validate not in _VALIDATIONS:
            raise ValueError(
                f"validate must be 'publish', 'deliver', 'both' or None, got {validate!r}"
            )
        if unknown_version not in _UNKNOWN_VERSION_ACTIONS:
            raise ValueError(
                f"unknown_version must be 'dead_letter' or 'deliver', got {unknown_version!r}"
            )
        if dataschema is not None and (not isinstance(dataschema, str) or not dataschema):
            raise ValueError(f"dataschema must be a URI string or None, got {dataschema!r}")
        for known in (name, *alias_names):
            taken = self._by_name.get(known)
            if taken is not None and taken.name != name:
                raise ValueError(f"{known!r} is already registered, as {taken.name}")
        stamp = {VERSION_EXTENSION: str(version)}
        if dataschema is not None:
            stamp[SCHEMA_EXTENSION] = dataschema
        event_type = EventType(
            name,
            version,
            schema,
            chain,
            alias_names,
            validate,
            unknown_version,
            dataschema,
            _validator(schema),
            frozenset(step for step, fn in chain.items() if _takes_event(fn)),
            MappingProxyType(stamp),
        )
        previous = self._types.pop(name, None)
        if previous is not None:
            for alias in previous.aliases:
                self._by_name.pop(alias, None)
        self._types[name] = event_type
        for known in (name, *alias_names):
            self._by_name[known] = event_type
        self.active = True
        return event_type

    def get(self, name: str) -> EventType | None:
        """The type registered as ``name`` or known by it as an alias."""
        return self._by_name.get(name)

    def canonical(self, name: str) -> str | None:
        """The registered name ``name`` is an alias of (None: it is no alias)."""
        found = self._by_name.get(name)
        return None if found is None or found.name == name else found.name

    def aliases_of(self, name: str) -> tuple[str, ...]:
        """The aliases of the type registered as ``name`` (none if it is not)."""
        found = self._types.get(name)
        return () if found is None else found.aliases

    def stamp(self, event: Event) -> Event:
        """``event`` as it is published: a registered type's version (and
        ``dataschema``) stamped unless it states one, its data validated when
        the type says so. ``ValueError`` naming the field for data that fails
        the schema, or an unreadable version; nothing is recorded then."""
        event_type = self._by_name.get(event.type)
        if event_type is None:
            return event
        stated = event.extensions.get(VERSION_EXTENSION)
        if stated is None:
            if event_type._on_publish:
                event_type.validated(event.data)
            return stamped(event, event_type._stamp)
        if event_type._on_publish:
            version = stored_version(event)
            if isinstance(version, int) and version > event_type.version:
                return event  # a newer version than this code knows: its consumers judge it
            try:
                current = self.read(event.copy())  # upcasters may change what they lift
            except (UpcastFailed, UnknownVersion) as exc:
                raise ValueError(f"cannot publish {event.type}: {exc}") from exc
            event_type.validated(current.data)
        return event

    def read(self, event: Event) -> Event:
        """``event`` as the current version of its type: data upcast (the event
        must own its data: upcasters may change it), ``dataversion`` the current
        one; the event itself when nothing is to be done. ``VersionError`` when
        it cannot be read."""
        event_type = self._by_name.get(event.type)
        if event_type is None:
            return event
        if (
            event.extensions.get(VERSION_EXTENSION) == event_type._version_text
            and event.type == event_type.name
        ):
            return event
        version = stored_version(event)
        if version == event_type.version:
            return (
                event
                if event.type == event_type.name
                else lifted(event, event_type.name, event.data, _EMPTY)
            )
        if not isinstance(version, int) or version < 1:
            raise UnknownVersion(
                f"unknown version {version!r} of {event_type.name} (not a version number)",
                event_type.name,
                version,
            )
        if version > event_type.version:
            if event_type.unknown_version == "deliver":
                return (
                    event
                    if event.type == event_type.name
                    else lifted(event, event_type.name, event.data, _EMPTY)
                )
            raise UnknownVersion(
                f"unknown version {version} of {event_type.name} "
                f"(this code knows up to {event_type.version})",
                event_type.name,
                version,
            )
        data = event_type.upcast(event.data, version, event)
        return lifted(event, event_type.name, data, event_type._stamp)

    def has_schema(self, name: str) -> bool:
        """Whether the type ``name`` (or the one it is an alias of) has a schema."""
        found = self._by_name.get(name)
        return found is not None and found._validate is not None

    def model(self, event: Event) -> Any:
        """The validated data of ``event`` (already read: ``read``) as its type's
        schema gives it back; ``InvalidEventData`` when it does not pass."""
        event_type = self._by_name.get(event.type)
        if event_type is None:
            return event.data
        try:
            return event_type.validated(event.data)
        except ValueError as exc:
            raise InvalidEventData(str(exc), event_type.name, event_type.version) from exc

    def check_delivery(self, event: Event) -> None:
        """``InvalidEventData`` when ``event`` (already read) fails a schema its type
        validates on delivery."""
        event_type = self._by_name.get(event.type)
        if event_type is not None and event_type._on_delivery:
            self.model(event)

    def delivered(self, event: Event) -> Event:
        """``event`` as a handler call receives it: ``read``, then checked as
        ``check_delivery`` does (one lookup of its type for both)."""
        event_type = self._by_name.get(event.type)
        if event_type is None:
            return event
        if (
            event.extensions.get(VERSION_EXTENSION) != event_type._version_text
            or event.type != event_type.name
        ):
            event = self.read(event)
        if event_type._on_delivery:
            self.model(event)
        return event

    def describe(self) -> list[dict[str, Any]]:
        """Every registered type as ``EventType.describe`` gives it."""
        return [event_type.describe() for event_type in self._types.values()]

    def stored_terms(self, patterns: Iterable[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
        """What a service's stored subscription says for a handler subscribed to
        ``patterns``: the patterns with the aliases of each registered type a
        pattern matches (as the handler receives them here: so that a publisher
        of another service routes events published under an old name to it),
        and ``details`` with the version of each registered type it receives
        (``{"versions": {"like.added": 3}}``)."""
        patterns = tuple(patterns)
        if not self.active:
            return patterns, {}
        stored = list(patterns)
        versions: dict[str, int] = {}
        for event_type in self._types.values():
            if any(fnmatch.fnmatchcase(event_type.name, p) for p in patterns):
                versions[event_type.name] = event_type.version
                stored.extend(
                    a
                    for a in event_type.aliases
                    if a not in stored and not any(fnmatch.fnmatchcase(a, p) for p in patterns)
                )
        return tuple(stored), ({"versions": versions} if versions else {})

    def preview(self, event: Event) -> Reading:
        """How this code reads ``event`` (a stored one, untouched: the preview
        works on a copy): its stored and current versions, and the data a
        handler would get, or the reason it would be dead-lettered. For the
        dashboard's detail page, ``retrybus dlq show`` and edit-and-requeue."""
        event_type = self._by_name.get(event.type)
        stored = stored_version(event)
        if event_type is None:
            return Reading(event.type, stored, None, event.data, None)
        try:
            current = self.read(event.copy())
            self.check_delivery(current)
        except VersionError as exc:
            return Reading(event_type.name, stored, event_type.version, None, str(exc))
        return Reading(event_type.name, stored, event_type.version, current.data, None)


@dataclass(frozen=True, slots=True)
class Reading:
    """How this code reads one stored event (``EventTypes.preview``): its type
    (the registered name when it came by an alias), the ``stored_version`` it
    carries, the ``current_version`` this code knows (None: the type is not
    registered), and the ``data`` a handler gets, or the ``error`` that would
    dead-letter it."""

    event_type: str
    stored_version: int | str
    current_version: int | None
    data: Any
    error: str | None

    @property
    def upcast(self) -> bool:
        """Whether the data a handler gets is lifted from an older version."""
        return (
            self.current_version is not None
            and isinstance(self.stored_version, int)
            and self.stored_version < self.current_version
        )
