"""The stored records: a failed delivery waiting in the retry queue, and a dead letter."""

from __future__ import annotations

import hashlib
import json
import linecache
import os
import time
import traceback as traceback_module
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from ._event import Event, compact_json, printable
from ._groups import failure_group_key
from ._ordering import ordering_key_of
from ._services import DEFAULT_SERVICE

__all__ = ["RETRY_KINDS", "DeadLetterItem", "ErrorInfo", "RetryItem", "RetryKind"]

#: What a record of the retry queue is: a ``retry`` (``attempt >= 1``: a delivery
#: that failed and waits for its next try), a ``pending`` first delivery
#: (``attempt == 0`` and due: a durable publish's record while its handler runs, or
#: a deferred one waiting for a worker) or a ``scheduled`` first delivery
#: (``attempt == 0``, due later: published with ``deliver_at``/``deliver_in``).
RetryKind = Literal["retry", "pending", "scheduled"]
#: every ``RetryKind``, in the order the CLI and the dashboard show them
RETRY_KINDS: tuple[RetryKind, ...] = ("retry", "pending", "scheduled")

MAX_TRACEBACK_CHARS = 8_000
MAX_ERROR_CHARS = 2_000


def _time_ordered_hex() -> str:
    """32 hex digits like uuid4().hex, but led by the time in ms (as UUIDv7 is), so
    ids created together sit together in the primary key index: inserts append,
    and a batch claimed and deleted together touches a few index pages, not one each."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def new_retry_id() -> str:
    return f"retry_{_time_ordered_hex()}"


def delivery_id(
    event_source: str, event_id: str, handler_name: str, service: str = DEFAULT_SERVICE
) -> str:
    """The id of the record of one delivery (one event to one handler of one
    service): derived from the event's ``source`` and ``id`` (which together name
    an event, as in CloudEvents), the handler's name and its service, so that
    recording the same delivery twice (a redelivery after a crash, the same event
    published twice) finds the record already there instead of making a second
    one. A default-service delivery's id is that of the stores before services
    (the service is not in it); another service's hashes four fields, so that
    the two can never collide (no field holds NUL, which joins them)."""
    fields = (
        (event_source, event_id, handler_name)
        if service == DEFAULT_SERVICE
        else (service, event_source, event_id, handler_name)
    )
    key = "\x00".join(fields).encode("utf-8", "surrogatepass")
    return f"retry_{hashlib.sha256(key).hexdigest()[:32]}"


def _event_fields(event: Event, handler_name: str) -> dict[str, Any]:
    """The fields of a record of ``event``'s delivery to ``handler_name``: the
    event as it was published, its data a copy of its own."""
    return {
        "event_id": event.id,
        "event_type": event.type,
        "event_data": json.loads(event.data_json),
        "event_source": event.source,
        "event_timestamp": event.time,
        "event_subject": event.subject,
        "event_extensions": dict(event.extensions),
        "handler_name": handler_name,
    }


def new_dead_letter_id() -> str:
    return f"dlq_{_time_ordered_hex()}"


def dead_letter_id_for(retry_id: str) -> str:
    """A dead letter made from a retry item takes an id derived from it, so that
    moving an item twice (after a crash between the two writes) is a no-op."""
    return "dlq_" + retry_id.removeprefix("retry_")


def format_traceback(error: BaseException, limit: int = 20) -> str:
    """The traceback as Python prints it, chained causes included, but without the
    ``^^^^`` markers: placing them parses each frame's source, which costs more
    than the rest of recording a failure."""
    seen: set[int] = set()
    chunks: list[str] = []
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines = ["Traceback (most recent call last):\n"]
        frames = list(traceback_module.walk_tb(current.__traceback__))[-limit:]
        for frame, lineno in frames:
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}\n')
            # getline without checkcache: no stat() of every source file on each failure
            source = linecache.getline(code.co_filename, lineno, frame.f_globals).strip()
            if source:
                lines.append(f"    {source}\n")
        lines.extend(traceback_module.format_exception_only(type(current), current))
        chunks.append("".join(lines) if current.__traceback__ else lines[-1])
        if current.__cause__ is not None:
            chunks.append(_CAUSE)
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            chunks.append(_CONTEXT)
            current = current.__context__
        else:
            current = None
    return "".join(reversed(chunks))


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What is kept of a handler's exception: its message, class and a bounded traceback."""

    message: str
    type: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, error: BaseException) -> ErrorInfo:
        kind = type(error)
        name = (
            kind.__qualname__
            if kind.__module__ in ("builtins", "__main__")
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        try:
            message = str(error) or kind.__name__
        except Exception:  # an exception whose __str__ fails still gets recorded
            message = f"<unprintable {kind.__name__}>"
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 1] + "…"
        try:
            text = format_traceback(error)
        except Exception:
            text = ""
        if len(text) > MAX_TRACEBACK_CHARS:
            text = "…" + text[-(MAX_TRACEBACK_CHARS - 1) :]
        return cls(printable(message), name, printable(text))

    @classmethod
    def coerce(cls, error: BaseException | str | ErrorInfo | None) -> ErrorInfo:
        if isinstance(error, ErrorInfo):
            return error
        if isinstance(error, BaseException):
            return cls.from_exception(error)
        if error is None:
            return cls("", "")
        return cls(printable(str(error)), "")

    @property
    def short_type(self) -> str:
        """The class name without its module (``TimeoutError``)."""
        return self.type.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryItem:
    """One failed delivery (one event × one handler) waiting for its next retry.

    ``attempt`` is the number of the retry it is waiting for (1 after the first
    failure; 0 for a first delivery not yet made: a durable publish's record, a
    deferred or scheduled one); ``next_retry`` is when it falls due. While a
    worker (or the publishing process) holds it, ``lease_owner`` and
    ``lease_until`` say who and until when. ``claims`` counts the claims made
    since its last outcome was written: a delivery whose handler keeps killing
    or hanging its worker is claimed again and again without one. ``service``
    is the service whose handler it is for (``"default"`` unless named).
    """

    id: str
    event_id: str
    event_type: str
    event_data: Any
    event_source: str
    event_timestamp: datetime
    event_subject: str | None = None
    event_extensions: Mapping[str, str] = field(default_factory=dict)
    handler_name: str
    error: str
    error_type: str = ""
    traceback: str = ""
    attempt: int
    max_retries: int
    next_retry: datetime
    created_at: datetime
    updated_at: datetime
    lease_owner: str | None = None
    lease_until: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    claims: int = 0
    service: str = DEFAULT_SERVICE

    @property
    def ordering_key(self) -> str | None:
        """The event's ordering key (its ``partitionkey`` extension; None: none):
        a store claims this record only once no record of the same service,
        handler and key written before it is left in the retry queue."""
        return ordering_key_of(self.event_extensions)

    @property
    def first_delivery(self) -> bool:
        """No handler call of this delivery has an outcome yet (``attempt == 0``)."""
        return self.attempt == 0

    def kind(self, now: datetime) -> RetryKind:
        """What this record is at ``now`` (``RetryKind``): a ``retry`` unless it is a
        first delivery, which is ``pending`` once due (``next_retry <= now``) and
        ``scheduled`` before."""
        if self.attempt != 0:
            return "retry"
        return "pending" if self.next_retry <= now else "scheduled"

    def leased_at(self, now: datetime) -> bool:
        """A live lease holds it at ``now``: a worker (or the publishing process) is
        running its handler."""
        return self.lease_until is not None and self.lease_until > now

    @classmethod
    def for_failure(
        cls,
        event: Event,
        handler_name: str,
        error: ErrorInfo,
        *,
        attempt: int,
        max_retries: int,
        next_retry: datetime,
        now: datetime,
        metadata: Mapping[str, Any] | None = None,
        service: str = DEFAULT_SERVICE,
        id: str | None = None,
    ) -> RetryItem:
        """A new retry item for ``event`` whose ``handler_name`` (of ``service``) just
        failed; its id is ``id`` (None: a new one)."""
        return cls(
            **_event_fields(event, handler_name),
            id=new_retry_id() if id is None else id,
            error=error.message,
            error_type=error.type,
            traceback=error.traceback,
            attempt=attempt,
            max_retries=max_retries,
            next_retry=next_retry,
            created_at=now,
            updated_at=now,
            metadata=dict(metadata or {}),
            service=service,
        )

    @classmethod
    def pending(
        cls,
        event: Event,
        handler_name: str,
        *,
        max_retries: int,
        due: datetime,
        now: datetime,
        lease_owner: str | None = None,
        lease_until: datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
        service: str = DEFAULT_SERVICE,
        claims: int | None = None,
    ) -> RetryItem:
        """The record of ``event``'s first delivery to ``handler_name`` of ``service`` (attempt 0),
        due at ``due``: leased to ``lease_owner`` until ``lease_until`` (a durable
        publish about to run it here, counted as one claim) or left for a worker.
        ``claims`` counts the deliveries made already without an outcome (None: 1
        when leased, else 0), which ``max_claims`` bounds.
        Its id is ``delivery_id``'s; its age (retention, a failure's time budget)
        counts from ``due``: a scheduled delivery's from its time, not its publish."""
        return cls(
            **_event_fields(event, handler_name),
            id=delivery_id(event.source, event.id, handler_name, service),
            error="",
            attempt=0,
            max_retries=max_retries,
            next_retry=due,
            created_at=due,
            updated_at=now,
            lease_owner=lease_owner,
            lease_until=lease_until,
            metadata=dict(metadata or {}),
            claims=(0 if lease_owner is None else 1) if claims is None else claims,
            service=service,
        )

    def to_event(self) -> Event:
        """The event as it was published, rebuilt exactly, with a payload of its own
        (a handler that changes it changes nothing stored)."""
        return Event.from_stored(
            type=self.event_type,
            data=json.loads(compact_json(self.event_data)),
            source=self.event_source,
            id=self.event_id,
            time=self.event_timestamp,
            subject=self.event_subject,
            extensions=self.event_extensions,
        )

    def rescheduled(
        self,
        *,
        attempt: int,
        next_retry: datetime,
        error: ErrorInfo,
        now: datetime,
        metadata: Mapping[str, Any] | None = None,
    ) -> RetryItem:
        """This item after another failure, due again at ``next_retry`` (with
        ``metadata`` in place of its own, when given)."""
        return replace(
            self,
            metadata=self.metadata if metadata is None else dict(metadata),
            attempt=attempt,
            next_retry=next_retry,
            error=error.message,
            error_type=error.type,
            traceback=error.traceback,
            updated_at=now,
            lease_owner=None,
            lease_until=None,
            claims=0,
        )

    def to_dead_letter(
        self,
        *,
        reason: str,
        now: datetime,
        error: ErrorInfo | None = None,
        attempt: int | None = None,
        copy: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> DeadLetterItem:
        """The dead letter this item becomes when retries end (with ``copy``, a
        dead letter of its own id, recorded while the item stays queued; with
        ``metadata``, that in place of the item's)."""
        return DeadLetterItem(
            id=new_dead_letter_id() if copy else dead_letter_id_for(self.id),
            event_id=self.event_id,
            event_type=self.event_type,
            event_data=self.event_data,
            event_source=self.event_source,
            event_timestamp=self.event_timestamp,
            event_subject=self.event_subject,
            event_extensions=self.event_extensions,
            handler_name=self.handler_name,
            error=error.message if error else self.error,
            error_type=error.type if error else self.error_type,
            traceback=error.traceback if error else self.traceback,
            attempt=self.attempt if attempt is None else attempt,
            max_retries=self.max_retries,
            reason=reason,
            processed=False,
            created_at=now,
            processed_at=None,
            first_failed_at=self.created_at,
            metadata=dict(self.metadata if metadata is None else metadata),
            service=self.service,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterItem:
    """A delivery that will not be retried again, kept for a person to look at.

    ``attempt`` is how many retries were made; ``reason`` says why it stopped
    ("failed after 3 retries", "non-retryable: ValueError", "expired in retry
    queue", "unknown handler …", "undecodable record …", "subscription removed:
    …"). ``service`` is the service whose handler it was for.
    """

    id: str
    event_id: str
    event_type: str
    event_data: Any
    event_source: str
    event_timestamp: datetime
    event_subject: str | None = None
    event_extensions: Mapping[str, str] = field(default_factory=dict)
    handler_name: str
    error: str
    error_type: str = ""
    traceback: str = ""
    attempt: int
    max_retries: int = 0
    reason: str
    processed: bool = False
    created_at: datetime
    processed_at: datetime | None = None
    first_failed_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    service: str = DEFAULT_SERVICE

    @classmethod
    def for_failure(
        cls,
        event: Event,
        handler_name: str,
        error: ErrorInfo,
        *,
        reason: str,
        attempt: int,
        max_retries: int,
        now: datetime,
        metadata: Mapping[str, Any] | None = None,
        service: str = DEFAULT_SERVICE,
    ) -> DeadLetterItem:
        """A dead letter for a delivery (to ``handler_name`` of ``service``) that
        failed on publish and will not be retried."""
        return cls(
            id=new_dead_letter_id(),
            **_event_fields(event, handler_name),
            error=error.message,
            error_type=error.type,
            traceback=error.traceback,
            attempt=attempt,
            max_retries=max_retries,
            reason=reason,
            created_at=now,
            first_failed_at=now,
            metadata=dict(metadata or {}),
            service=service,
        )

    def to_event(self) -> Event:
        """The event as it was published, rebuilt exactly, with a payload of its own
        (a handler that changes it changes nothing stored)."""
        return Event.from_stored(
            type=self.event_type,
            data=json.loads(compact_json(self.event_data)),
            source=self.event_source,
            id=self.event_id,
            time=self.event_timestamp,
            subject=self.event_subject,
            extensions=self.event_extensions,
        )

    @property
    def failure_group(self) -> str:
        """The failure group key (``grp_…``): same service, handler, error type and
        message shape."""
        return failure_group_key(self.handler_name, self.error_type, self.error, self.service)

    def to_retry_item(self, *, max_retries: int, now: datetime) -> RetryItem:
        """A fresh retry item for this dead letter (of its service), due now, with all
        its retries ahead."""
        metadata = dict(self.metadata)
        metadata["requeued_from"] = self.id
        return RetryItem(
            id=new_retry_id(),
            event_id=self.event_id,
            event_type=self.event_type,
            event_data=self.event_data,
            event_source=self.event_source,
            event_timestamp=self.event_timestamp,
            event_subject=self.event_subject,
            event_extensions=self.event_extensions,
            handler_name=self.handler_name,
            error=self.error,
            error_type=self.error_type,
            traceback=self.traceback,
            attempt=1,
            max_retries=max_retries,
            next_retry=now,
            created_at=now,
            updated_at=now,
            metadata=metadata,
            service=self.service,
        )
