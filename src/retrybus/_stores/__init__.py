"""Store engines and ``open_store(url)``."""

from __future__ import annotations

import importlib
from urllib.parse import parse_qsl

from ._url import redact, split
from .base import Store

__all__ = ["Store", "open_store"]

_KNOWN = "memory://, sqlite:///path/to.db, postgresql://…, redis://…, mongodb://…/db"

# server engines: scheme -> (module in this package, store class, pip extra)
_SERVER_ENGINES = {
    "postgresql": ("postgresql", "PostgresStore", "postgres"),
    "postgres": ("postgresql", "PostgresStore", "postgres"),
    "redis": ("redis", "RedisStore", "redis"),
    "rediss": ("redis", "RedisStore", "redis"),
    "mongodb": ("mongodb", "MongoStore", "mongodb"),
    "mongodb+srv": ("mongodb", "MongoStore", "mongodb"),
}


def open_store(url: str) -> Store:
    """The store a URL names, not yet connected (it connects on first use).

    ``memory://`` keeps everything in this process; ``sqlite:///path/to.db``
    (relative) or ``sqlite:////abs/path/to.db`` keeps it in one SQLite file;
    its options ``?synchronous=normal|full`` and ``?busy_timeout=30`` (seconds)
    tune durability and how long a writer waits for a lock.
    ``postgresql://user@host/db?schema=NAME`` (``pip install "retrybus[postgres]"``),
    ``redis://host:6379/0?prefix=NAME`` (``retrybus[redis]``) and
    ``mongodb://host:27017/dbname`` (``retrybus[mongodb]``) keep them on a server.

    >>> async with open_store("sqlite:///retrybus.db") as store:
    ...     bus = EventBus(store)

    Raises ``ValueError`` naming the URL when the scheme is unknown or the URL malformed.
    """
    parts = split(url)
    scheme = parts.scheme.lower()
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme == "memory":
        if parts.netloc or parts.path or options:
            raise ValueError(f"malformed memory store URL {url!r}: use exactly 'memory://'")
        from .memory import MemoryStore

        return MemoryStore(url)
    if scheme == "sqlite":
        return _open_sqlite(url, parts.netloc, parts.path, options)
    if scheme in _SERVER_ENGINES:
        return _open_server(url, *_SERVER_ENGINES[scheme])
    raise ValueError(f"unknown store URL scheme {parts.scheme!r} in {redact(url)!r}: use {_KNOWN}")


def _open_sqlite(url: str, netloc: str, path: str, options: dict[str, str]) -> Store:
    from .sqlite import SQLiteStore

    if netloc:
        raise ValueError(
            f"malformed SQLite store URL {url!r}: a SQLite URL has no host; "
            "use sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    file_path = path[1:] if path.startswith("/") else path
    if not file_path:
        raise ValueError(f"malformed SQLite store URL {url!r}: no file path (sqlite:///path/to.db)")
    unknown = set(options) - {"synchronous", "busy_timeout"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in SQLite store URL {url!r}")
    try:
        busy_timeout = float(options.get("busy_timeout", "30"))
    except ValueError:
        raise ValueError(f"busy_timeout in {url!r} must be a number of seconds") from None
    try:
        return SQLiteStore(
            file_path,
            url=url,
            synchronous=options.get("synchronous", "normal"),
            busy_timeout=busy_timeout,
        )
    except ValueError as exc:
        raise ValueError(f"bad SQLite store URL {url!r}: {exc}") from None


def _open_server(url: str, module_name: str, class_name: str, extra: str) -> Store:
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        raise ValueError(
            f"the store for {redact(url)!r} needs an optional dependency that is not "
            f"installed ({exc.name}): pip install 'retrybus[{extra}]'"
        ) from None
    store: Store = getattr(module, class_name).from_url(url)
    return store
