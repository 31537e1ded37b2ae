"""The named points of a delivery that observers attach to, and the one place
that calls them, guarded.

A delivery goes: ``publish_started`` (a publish only), ``call_started``, the
handler's call, ``call_ended``, then, once the store has written what became of
it, ``recorded``; ``publish_ended`` closes a publish. What the store is told
outside a delivery (a retry scheduled by hand, a sweep's dead letters, a
requeue) is announced with ``retry_scheduled``, ``retry_succeeded``,
``dead_lettered`` and ``requeued``. Metrics, tracing and logging are observers
(``retrybus._reporting``); an observer that raises is logged once per hook and
never keeps a delivery from being recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from ._event import Event
    from ._observe import DeliveryKind, DeliverySpan, PublishSpan
    from ._outcomes import Outcome
    from ._records import DeadLetterItem, RetryItem

__all__ = ["Delivery", "Observer", "Observers", "Publication", "Verdict", "Written"]

logger = logging.getLogger("retrybus")

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})

#: what became of a delivery: ``success``, ``retry``, ``dead_letter``, or
#: ``failure`` (a reprocess that failed: the dead letter stays)
Verdict = Literal["success", "retry", "dead_letter", "failure"]
#: whether the store has it: ``applied``; ``lost`` (another worker had taken the
#: item over); ``error`` (it could not be written)
Written = Literal["applied", "lost", "error"]


class Publication:
    """One ``publish`` as observers see it; tracing may give ``event`` its
    ``traceparent`` and keep its span in ``span``."""

    __slots__ = ("event", "span", "traceparent")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.span: PublishSpan | None = None
        #: the publish span's ``traceparent`` (None: none, or not sampled)
        self.traceparent: str | None = None


class Delivery:
    """One call of one handler with one event, as observers see it."""

    __slots__ = (
        "attempt",
        "due",
        "error",
        "event",
        "handler",
        "kind",
        "metadata",
        "seconds",
        "span",
        "started_at",
        "traceparent",
    )

    def __init__(
        self,
        kind: DeliveryKind,
        event: Event,
        handler: str,
        attempt: int,
        metadata: Mapping[str, Any] = _NO_METADATA,
        due: datetime | None = None,
        started_at: datetime | None = None,
    ) -> None:
        self.kind = kind
        self.event = event
        self.handler = handler
        #: 0 for the first call, n for retry n; a reprocess: the dead letter's attempt
        self.attempt = attempt
        #: the stored record's metadata (its trace context); empty for a first call
        self.metadata = metadata
        #: when a retry fell due, and when its call started (its lag is the difference)
        self.due = due
        self.started_at = started_at
        #: filled in by the call
        self.error: BaseException | None = None
        self.seconds = 0.0
        #: the call's span (tracing), and its ``traceparent`` when sampled
        self.span: DeliverySpan | None = None
        self.traceparent: str | None = None


_HOOKS = (
    "publish_started",
    "publish_ended",
    "call_started",
    "call_ended",
    "recorded",
    "retry_scheduled",
    "retry_succeeded",
    "dead_lettered",
    "requeued",
    "inbox_skipped",
)


class Observer:
    """Hooks at the named points of deliveries; each does nothing unless overridden."""

    #: False for an observer whose ``active`` may change (tracing, once an SDK is set up)
    always_active = True
    #: True for an observer that cannot raise (its hooks are then called unguarded)
    never_raises = False

    @property
    def active(self) -> bool:
        """False while this observer would record nothing (tracing without an SDK):
        its call hooks are then skipped when no other observer needs them."""
        return True

    def publish_started(self, publication: Publication) -> None:
        """A publish begins (before any handler runs)."""

    def publish_ended(self, publication: Publication, error: BaseException | None) -> None:
        """A publish ends: every handler's outcome is written, or ``error`` stopped it."""

    def call_started(self, delivery: Delivery) -> None:
        """A handler is about to be called."""

    def call_ended(self, delivery: Delivery) -> None:
        """A handler call returned (``delivery.error`` set if it failed)."""

    def recorded(
        self,
        delivery: Delivery | None,
        outcome: Outcome | None,
        verdict: Verdict,
        written: Written,
        reason: str | None = None,
    ) -> None:
        """What became of a delivery reached the store (or did not: ``written``).
        ``delivery`` is None when no observer watched the call; ``outcome`` is
        None for a reprocess."""

    def retry_scheduled(self, item: RetryItem) -> None:
        """A retry item was written (a first failure, a reschedule, a requeue)."""

    def retry_succeeded(self, item: RetryItem) -> None:
        """A retry worked and its item left the retry queue."""

    def dead_lettered(self, item: DeadLetterItem) -> None:
        """A dead letter was written."""

    def requeued(self, dead: DeadLetterItem, retry: RetryItem) -> None:
        """A dead letter went back to the retry queue as ``retry``."""

    def inbox_skipped(self, service: str, handler: str, event: Event) -> None:
        """A delivery of ``event`` to ``handler`` of ``service`` was not run (or
        its ``inbox.claim`` block was skipped): it succeeded before."""


def _overrides(observer: Observer, hook: str) -> bool:
    return getattr(type(observer), hook) is not getattr(Observer, hook)


class _RecordedHook(Protocol):
    def __call__(
        self,
        delivery: Delivery | None,
        outcome: Outcome | None,
        verdict: Verdict,
        written: Written,
        reason: str | None = None,
    ) -> None: ...


def _nothing(*args: Any) -> None:
    return None


class Observers:
    """The observers of one bus, called at each named point in turn; one that
    raises is logged (once per observer and hook) and the rest go on. Only the
    observers that implement a hook are called for it."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._all: tuple[Observer, ...] = tuple(observers)
        self._failed: set[tuple[int, str]] = set()
        hooks = {hook: tuple(o for o in self._all if _overrides(o, hook)) for hook in _HOOKS}
        self._retry_scheduled = hooks["retry_scheduled"]
        self._retry_succeeded = hooks["retry_succeeded"]
        self._dead_lettered = hooks["dead_lettered"]
        self._requeued = hooks["requeued"]
        self._inbox_skipped = hooks["inbox_skipped"]
        #: whether any observer implements ``call_started`` (most calls skip it then)
        self.watching_call_starts = bool(hooks["call_started"])
        #: whether any observer implements ``publish_ended``
        self.watching_publish_ends = bool(hooks["publish_ended"])
        # The hooks of every delivery, each made once: nothing when no observer
        # implements it; an observer's own method when it is the only one and
        # never raises (metrics: plain arithmetic); that method guarded when it
        # is the only one; else the guarded loop over all of them.
        self.publish_started: Callable[[Publication], None] = self._hook(
            hooks["publish_started"], "publish_started"
        )
        self.publish_ended: Callable[[Publication, BaseException | None], None] = self._hook(
            hooks["publish_ended"], "publish_ended"
        )
        self.call_started: Callable[[Delivery], None] = self._hook(
            hooks["call_started"], "call_started"
        )
        self.call_ended: Callable[[Delivery], None] = self._hook(hooks["call_ended"], "call_ended")
        #: what became of a delivery reached the store, or did not (see ``Observer``)
        self.recorded: _RecordedHook = self._hook(hooks["recorded"], "recorded")
        watchers = {*hooks["publish_started"], *hooks["call_started"], *hooks["call_ended"]}
        self._always_watched = any(o.always_active for o in watchers)
        self._maybe_watched = tuple(o for o in self._all if o in watchers and not o.always_active)

    def _hook(self, observers: tuple[Observer, ...], hook: str) -> Any:
        """One hook of ``observers`` as a single callable."""
        if not observers:
            return _nothing
        if len(observers) == 1:
            (observer,) = observers
            method = getattr(observer, hook)
            if observer.never_raises:
                return method
            report = self._report

            def guarded(*args: Any) -> None:
                try:
                    method(*args)
                except Exception:
                    report(observer, hook)

            return guarded

        methods = tuple((observer, getattr(observer, hook)) for observer in observers)
        report = self._report

        def each(*args: Any) -> None:
            for observer, method in methods:
                try:
                    method(*args)
                except Exception:
                    report(observer, hook)

        return each

    @property
    def watch_calls(self) -> bool:
        """Whether an active observer watches handler calls (else the plain,
        faster path runs)."""
        if self._always_watched:
            return True
        for observer in self._maybe_watched:
            try:
                if observer.active:
                    return True
            except Exception:
                self._report(observer, "active")
        return False

    def __iter__(self) -> Iterator[Observer]:
        return iter(self._all)

    def _report(self, observer: Observer, hook: str) -> None:
        key = (id(observer), hook)
        if key not in self._failed:
            self._failed.add(key)
            logger.exception(
                "%r failed in %s(); deliveries go on, what it reports may be off", observer, hook
            )

    def _emit(self, observers: tuple[Observer, ...], hook: str, *args: Any) -> None:
        """Call ``hook`` of each of ``observers``; one that raises is reported."""
        for observer in observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                self._report(observer, hook)

    def retry_scheduled(self, items: Sequence[RetryItem]) -> None:
        for item in items:
            self._emit(self._retry_scheduled, "retry_scheduled", item)

    def retry_succeeded(self, items: Sequence[RetryItem]) -> None:
        for item in items:
            self._emit(self._retry_succeeded, "retry_succeeded", item)

    def dead_lettered(self, items: Sequence[DeadLetterItem]) -> None:
        for item in items:
            self._emit(self._dead_lettered, "dead_lettered", item)

    def requeued(self, dead: DeadLetterItem, retry: RetryItem) -> None:
        self._emit(self._requeued, "requeued", dead, retry)

    def inbox_skipped(self, service: str, handler: str, event: Event) -> None:
        self._emit(self._inbox_skipped, "inbox_skipped", service, handler, event)
