"""The order of ``Store.newest_failures``, shared by the engines: each engine finds
every (service, handler)'s newest retry its own way, then orders and cuts them here
(a handful of groups, one per handler)."""

from __future__ import annotations

from collections.abc import Iterable

from .._records import RetryItem

__all__ = ["check_limit", "newest_first"]


def check_limit(limit: int) -> None:
    """``limit`` must be a whole number of at least 0."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number >= 0, got {limit!r}")


def newest_first(items: Iterable[RetryItem], limit: int) -> list[RetryItem]:
    """``items`` by ``updated_at``, newest first, ties by service then handler
    ascending; the first ``limit``."""
    ordered = sorted(items, key=lambda item: (item.service, item.handler_name))
    ordered.sort(key=lambda item: item.updated_at, reverse=True)
    return ordered[:limit]
