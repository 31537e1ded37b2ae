"""Exceptions raised by retrybus, and the two a handler may raise to steer its retries."""

from __future__ import annotations

import math

__all__ = [
    "AlreadyHandled",
    "AmbiguousId",
    "AppNotFound",
    "InvalidEventData",
    "ItemBusy",
    "ItemNotFound",
    "NotCancellable",
    "OtherService",
    "PermanentError",
    "RecordRejected",
    "RedriveConflict",
    "RetryAfter",
    "RetrybusError",
    "StoreUnavailable",
    "StoreUnusable",
    "SubscriptionInUse",
    "TransportUnavailable",
    "TransportUnusable",
    "UnknownHandler",
    "UnknownSubscription",
    "UnknownVersion",
    "UpcastFailed",
    "VersionError",
]


class RetrybusError(Exception):
    """Base class of every error retrybus raises itself."""


class AlreadyHandled(RetrybusError):
    """Raised on entering ``bus.inbox.claim(event, ...)`` when the inbox already
    holds the claim of this delivery (the event's handler did its effect in an
    earlier, committed transaction): the ``async with`` body is skipped, and the
    delivery counts as a success (skipped), neither retried nor dead-lettered.
    Let it propagate out of the handler (it rolls back nothing that matters:
    the transaction has written nothing yet)."""

    def __init__(self, service: str, handler: str, event_id: str) -> None:
        super().__init__(
            f"event {event_id} was already handled by {handler!r} of service {service!r}"
        )
        self.service = service
        self.handler = handler
        self.event_id = event_id


class StoreUnavailable(RetrybusError):
    """The store could not be reached or did not answer; the message names its URL."""


class StoreUnusable(RetrybusError):
    """The store answered but cannot be used: its file is not a database or is
    damaged, or its schema is newer than this retrybus knows. Trying again will
    not help; the message says what is wrong."""


class TransportUnavailable(RetrybusError):
    """The broker could not be reached or did not answer; the message names its
    URL (password hidden). The transport reconnects on its next call."""


class TransportUnusable(RetrybusError):
    """The broker answered but refuses what retrybus asks of it (JetStream off,
    a queue declared with other arguments). Trying again will not help; the
    message says what is wrong."""


class RecordRejected(RetrybusError, ValueError):
    """The store refused a record because of what it holds (larger than the
    engine keeps, for example). Trying again will not help; the message names
    the record and the engine's reason."""


class UnknownHandler(RetrybusError, LookupError):
    """No handler of that name is subscribed on the bus."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no handler named {name!r} is subscribed on this bus")
        self.name = name


class UnknownSubscription(RetrybusError, LookupError):
    """The store keeps no subscription (live or removed) of that service and handler."""

    def __init__(self, service: str, handler_name: str | None) -> None:
        what = f"{service}/{handler_name}" if handler_name else f"of service {service}"
        super().__init__(f"no subscription {what} is stored")
        self.service = service
        self.handler_name = handler_name


class SubscriptionInUse(RetrybusError):
    """A subscription was not removed: live workers run its handler (their
    heartbeats list it), and would store it again when they restart. ``workers``
    names them; stop them first, or remove it with ``force``."""

    def __init__(self, service: str, handlers: list[str], workers: list[str]) -> None:
        shown = ", ".join(workers[:10]) + (", …" if len(workers) > 10 else "")
        which = ", ".join(f"{service}/{name}" for name in handlers)
        super().__init__(
            f"cannot remove {which}: live worker(s) run it ({shown}) and would register it "
            "again when they restart; stop them (or deploy code without the handler) first, "
            "or remove it with force"
        )
        self.service = service
        self.handlers = handlers
        self.workers = workers


class OtherService(RetrybusError):
    """A dead letter of another service cannot be reprocessed here: only that
    service's app has its handler. Requeueing it works from anywhere (its
    service's workers run it). ``item_id`` is None for a reprocess redrive of
    another service's dead letters."""

    def __init__(self, item_id: str | None, service: str) -> None:
        super().__init__(
            f"dead letter {item_id} belongs to service {service}: requeue it, or reprocess "
            "it from that service's app"
            if item_id is not None
            else f"those dead letters belong to service {service}: requeue them, or "
            "reprocess them from that service's app"
        )
        self.item_id = item_id
        self.service = service


class ItemNotFound(RetrybusError, LookupError):
    """No retry item or dead letter has that id."""

    def __init__(self, item_id: str) -> None:
        super().__init__(f"no item with id {item_id!r}")
        self.item_id = item_id


class AmbiguousId(RetrybusError, LookupError):
    """A shortened id that starts more than one item's id; ``matches`` lists some."""

    def __init__(self, prefix: str, matches: list[str]) -> None:
        shown = ", ".join(matches[:10]) + (", …" if len(matches) > 10 else "")
        super().__init__(f"{prefix!r} starts more than one id: {shown}; give more of it")
        self.prefix = prefix
        self.matches = matches


class AppNotFound(RetrybusError, ImportError):
    """``module:attribute`` does not name an importable ``EventBus`` (the worker's
    and the dashboard's ``APP``); the message says which part is wrong."""


class RedriveConflict(RetrybusError):
    """The redrive changed under this operation (another process acted on it)."""


class ItemBusy(RetrybusError):
    """Another operation holds the item now (a dead letter being reprocessed)."""

    def __init__(self, item_id: str, why: str) -> None:
        super().__init__(f"{item_id} is busy: {why}; try again later")
        self.item_id = item_id


class NotCancellable(RetrybusError):
    """The retry queue record exists but cannot be cancelled: it is a retry (a
    failed delivery, which is retried or dead-lettered, never dropped unseen), or a
    delivery whose handler runs now (a live lease holds it). ``kind`` is its
    ``RetryKind``; the message names the id and says why."""

    def __init__(self, item_id: str, kind: str, why: str) -> None:
        super().__init__(f"{item_id} cannot be cancelled: {why}")
        self.item_id = item_id
        self.kind = kind


class PermanentError(Exception):
    """Raise from a handler to say the failure will not heal: the delivery is
    dead-lettered at once, never retried.

    >>> raise PermanentError("customer 42 does not exist")
    """


class VersionError(PermanentError):
    """A delivery whose stored event this code cannot read as the current version
    of its type: dead-lettered at once with its message as the reason (never
    retried: the same code would fail the same way). The stored event is kept as
    it was, so that a redrive after the fix, or after the deploy that knows its
    version, delivers it. ``event_type`` is the registered type, ``version`` the
    stored version."""

    def __init__(self, message: str, event_type: str, version: int | str) -> None:
        super().__init__(message)
        self.event_type = event_type
        self.version = version


class UpcastFailed(VersionError):
    """An upcaster raised while lifting the stored data one version up:
    ``upcast failed v1→v2: KeyError 'post' (like.added)``."""


class UnknownVersion(VersionError):
    """The stored event is of a version this code does not know: newer than the
    registered one (a consumer deployed after its producer), older than the
    first upcaster, or not a version number at all."""


class InvalidEventData(VersionError):
    """The current-version data of a delivery does not pass its type's schema
    (``validate="deliver"`` or ``"both"``, or a handler asking for the model)."""


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
