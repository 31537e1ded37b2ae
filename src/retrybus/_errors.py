"""Exceptions raised by retrybus, and the two a handler may raise to steer its retries."""

from __future__ import annotations

import math

__all__ = [
    "ItemBusy",
    "ItemNotFound",
    "PermanentError",
    "RetryAfter",
    "RetrybusError",
    "StoreUnavailable",
    "UnknownHandler",
]


class RetrybusError(Exception):
    """Base class of every error retrybus raises itself."""


class StoreUnavailable(RetrybusError):
    """The store could not be reached or did not answer; the message names its URL."""


class UnknownHandler(RetrybusError, LookupError):
    """No handler of that name is subscribed on the bus."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no handler named {name!r} is subscribed on this bus")
        self.name = name


class ItemNotFound(RetrybusError, LookupError):
    """No retry item or dead letter has that id."""

    def __init__(self, item_id: str) -> None:
        super().__init__(f"no item with id {item_id!r}")
        self.item_id = item_id


class ItemBusy(RetrybusError):
    """Another operation holds the item now (a dead letter being reprocessed)."""

    def __init__(self, item_id: str, why: str) -> None:
        super().__init__(f"{item_id} is busy: {why}; try again later")
        self.item_id = item_id


class PermanentError(Exception):
    """Raise from a handler to say the failure will not heal: the delivery is
    dead-lettered at once, never retried.

    >>> raise PermanentError("customer 42 does not exist")
    """


class RetryAfter(Exception):
    """Raise from a handler to retry after exactly ``seconds`` (for example what a
    rate-limited API asked for), instead of the policy's delay. The retry still
    counts against the policy's ``max_retries``.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise TypeError(f"RetryAfter seconds must be a number, got {seconds!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"RetryAfter seconds must be a finite number >= 0, got {seconds!r}")
        super().__init__(message or f"retry after {seconds:g}s")
        self.seconds = float(seconds)
