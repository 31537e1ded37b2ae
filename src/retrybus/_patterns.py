"""Which items an event type matches: items kept under event type patterns,
exact names (``like.added``) or shell-style globs (``like.*``), with the answer
for each type cached. Handlers of this process (``HandlerRegistry``) and other
services' stored subscriptions (``Routes``) are both found through one."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["PatternIndex", "is_glob"]

T = TypeVar("T")

_GLOB_CHARS = frozenset("*?[")
#: cached answers kept at most (one per event type seen): past it the cache starts over
_CACHE_LIMIT = 10_000


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` holds a shell-style wildcard (``*``, ``?``, ``[``)."""
    return not _GLOB_CHARS.isdisjoint(pattern)


class PatternIndex(Generic[T]):
    """Items under a key each and one or more patterns; ``match(event_type)``
    gives the items whose patterns match it, each once, in the order they were
    added."""

    def __init__(self) -> None:
        self._order: dict[Hashable, int] = {}
        self._next = 0
        self._exact: dict[str, list[tuple[Hashable, T]]] = {}
        self._globs: list[tuple[re.Pattern[str], Hashable, T]] = []
        self._cache: dict[str, tuple[T, ...]] = {}

    def add(self, key: Hashable, patterns: Iterable[str], item: T) -> None:
        """Keep ``item`` under ``key`` (unique in the index) for ``patterns``."""
        if key in self._order:
            raise ValueError(f"{key!r} is in the index already")
        self._order[key] = self._next
        self._next += 1
        for pattern in patterns:
            if is_glob(pattern):
                self._globs.append((re.compile(fnmatch.translate(pattern)), key, item))
            else:
                self._exact.setdefault(pattern, []).append((key, item))
        self._cache.clear()

    def remove(self, key: Hashable) -> None:
        """Forget the item kept under ``key`` (nothing happens if there is none)."""
        if self._order.pop(key, None) is None:
            return
        for pattern, entries in list(self._exact.items()):
            kept = [entry for entry in entries if entry[0] != key]
            if kept:
                self._exact[pattern] = kept
            else:
                del self._exact[pattern]
        self._globs = [entry for entry in self._globs if entry[1] != key]
        self._cache.clear()

    def match(self, event_type: str) -> tuple[T, ...]:
        """The items whose patterns match ``event_type``, each once, in the order
        they were added."""
        cached = self._cache.get(event_type)
        if cached is not None:
            return cached
        found: dict[Hashable, T] = dict(self._exact.get(event_type, ()))
        for regex, key, item in self._globs:
            if key not in found and regex.match(event_type):
                found[key] = item
        order = self._order
        result = tuple(found[key] for key in sorted(found, key=order.__getitem__))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[event_type] = result
        return result
