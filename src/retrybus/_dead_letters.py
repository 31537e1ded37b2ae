"""The dead letter queue as users see it: ``bus.dead_letters``."""

from __future__ import annotations

import builtins
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Unpack

from ._delivery import call_observed
from ._errors import AmbiguousId, ItemBusy, ItemNotFound, OtherService, UnknownHandler
from ._event import check_text, encode_json, printable
from ._event_types import SCHEMA_EXTENSION, VERSION_EXTENSION, Reading, stored_version
from ._filters import DeadLetterFilter, FilterFields, FilterFieldsExceptProcessed, filter_from
from ._groups import FailureGroup, GroupCount, message_shape
from ._observe import last_failed_attempt, log_fields, with_failed_attempt
from ._observers import Delivery
from ._queues import _check_page
from ._records import DeadLetterItem, ErrorInfo, RetryItem
from ._stores.base import DEAD_LETTER_GROUP_FIELDS

if TYPE_CHECKING:
    from ._core import BusCore
    from ._handlers import Subscription

__all__ = ["BulkResult", "DeadLetterQueue"]

logger = logging.getLogger("retrybus")

# how many dead letters a bulk delete reads and deletes at a time
DELETE_PAGE = 500
# a reprocess holds its dead letter (a control record) for at most this long, so
# that a second reprocess, a requeue or a delete does not run at the same time
REPROCESS_CLAIM = 300.0
CLAIM_PREFIX = "reprocessing:"


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What became of a bulk action on a list of ids: the ids it succeeded for,
    those it failed for (with the error), and those that no longer existed."""

    succeeded: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "succeeded": list(self.succeeded),
            "failed": dict(self.failed),
            "missing": list(self.missing),
        }


def _check_actor(actor: str | None) -> None:
    if actor is not None:
        if not isinstance(actor, str):
            raise TypeError(f"actor must be a string or None, got {actor!r}")
        check_text(actor, "actor")


class DeadLetterQueue:
    """Deliveries that will not be retried again, for a person to browse,
    reprocess, requeue and clean.

    Listing, counting, grouping and the bulk actions take the same filter: either
    keyword arguments (``event_type=``, ``handler_name=``, ``processed=`` …) or a
    ``DeadLetterFilter`` as ``where=``.
    """

    def __init__(self, core: BusCore) -> None:
        self._core = core

    async def add(
        self,
        item: RetryItem,
        *,
        reason: str,
        error: BaseException | str | None = None,
    ) -> DeadLetterItem:
        """Record ``item`` as a dead letter (it is not removed from the retry queue:
        ``bus.retry_queue.mark_failed`` moves it)."""
        if not isinstance(item, RetryItem):
            raise TypeError(f"expected a RetryItem, got {item!r}")
        if not reason:
            raise ValueError("a dead letter needs a reason")
        dead = item.to_dead_letter(
            reason=printable(reason),
            now=self._core.clock.now(),
            error=None if error is None else ErrorInfo.coerce(error),
            copy=True,
        )
        await self._core.ledger.add_dead_letters([dead])
        return dead

    # browsing --------------------------------------------------------------

    async def list(
        self,
        limit: int = 100,
        offset: int = 0,
        *,
        where: DeadLetterFilter | None = None,
        **fields: Unpack[FilterFields],
    ) -> list[DeadLetterItem]:
        """Dead letters, newest first, optionally filtered (``where=`` and/or the
        filter's fields as keyword arguments: ``event_type=``, ``processed=`` …)."""
        _check_page(limit, offset)
        selected = filter_from(where, fields)
        return await self._core.store.list_dead(selected, limit=limit, offset=offset)

    async def get(self, item_id: str) -> DeadLetterItem:
        """The dead letter with this id; raises ``ItemNotFound``."""
        item = await self._core.store.get_dead(item_id)
        if item is None:
            raise ItemNotFound(item_id)
        return item

    async def resolve_id(self, prefix: str) -> str:
        """The id of the one dead letter whose id is ``prefix`` or starts with it
        (for people who copy a shortened id); raises ``ItemNotFound`` when none
        does and ``AmbiguousId``, listing them, when several do."""
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"a dead letter id must be a non-empty string, got {prefix!r}")
        if await self._core.store.get_dead(prefix) is not None:
            return prefix
        found = await self._core.store.find_dead_ids(prefix, limit=11)
        if not found:
            raise ItemNotFound(prefix)
        if len(found) > 1:
            raise AmbiguousId(prefix, found)
        return found[0]

    async def count(
        self,
        processed: bool | None = None,
        *,
        where: DeadLetterFilter | None = None,
        **fields: Unpack[FilterFieldsExceptProcessed],
    ) -> int:
        """How many dead letters there are (optionally only processed or
        unprocessed ones, or those matching ``where`` and the filter fields given
        as keyword arguments)."""
        return await self._core.store.count_dead(
            filter_from(where, {**fields, "processed": processed})
        )

    async def counts_by(
        self,
        field: str,
        where: DeadLetterFilter | None = None,
        *,
        limit: int = 50,
        **fields: Unpack[FilterFields],
    ) -> builtins.list[GroupCount]:
        """How many dead letters (matching ``where`` and the filter fields given as
        keyword arguments) there are per ``handler_name``, ``event_type``,
        ``reason``, ``failure_group`` or ``service``, largest first."""
        if field not in DEAD_LETTER_GROUP_FIELDS:
            raise ValueError(
                f"cannot count dead letters by {field!r}: use {DEAD_LETTER_GROUP_FIELDS}"
            )
        _check_page(limit, 0)
        selected = filter_from(where, fields)
        return await self._core.store.group_dead(field, selected, limit=limit)  # type: ignore[arg-type]

    async def groups(
        self,
        where: DeadLetterFilter | None = None,
        *,
        limit: int = 50,
        **fields: Unpack[FilterFields],
    ) -> builtins.list[FailureGroup]:
        """Failure groups, largest first: dead letters of one handler, error type and
        message shape (see ``retrybus.message_shape``), each with a sample. A group's
        ``key`` filters its dead letters: ``list(failure_group=group.key)``."""
        where = filter_from(where, fields)
        counted = await self.counts_by("failure_group", where, limit=limit)
        groups: builtins.list[FailureGroup] = []
        for group in counted:
            sample = await self._core.store.get_dead(group.sample_id)
            if sample is None:  # deleted since it was counted: take any other
                others = await self._core.store.list_dead(
                    filter_from(where, {"failure_group": group.key}), limit=1, offset=0
                )
                if not others:
                    continue
                sample = others[0]
            groups.append(
                FailureGroup(
                    key=group.key,
                    handler_name=sample.handler_name,
                    error_type=sample.error_type,
                    shape=message_shape(sample.error, sample.error_type),
                    count=group.count,
                    first_at=group.first_at,
                    last_at=group.last_at,
                    sample_id=sample.id,
                    sample_error=sample.error,
                    sample_reason=sample.reason,
                )
            )
        return groups

    # acting on one ---------------------------------------------------------

    async def reprocess(self, item_id: str, *, actor: str | None = None) -> DeadLetterItem:
        """Call the item's handler now. On success the item is marked ``processed``
        (with ``processed_at``); on failure it stays, carrying the new error.
        Returns the item as stored afterwards.

        Raises ``ItemNotFound``, ``OtherService`` for a dead letter of another
        service (whose app has its handler: requeue it, or reprocess it there),
        or ``UnknownHandler`` when no handler of its name is subscribed on this bus.
        """
        item, _ok = await self.attempt_reprocess(item_id, actor=actor)
        return item

    async def attempt_reprocess(
        self, item_id: str, *, actor: str | None = None
    ) -> tuple[DeadLetterItem, bool]:
        """``reprocess``, saying also whether the handler succeeded: the item as
        stored afterwards, and True on success (an item processed before stays
        processed when the handler fails again)."""
        _check_actor(actor)
        item = await self.get(item_id)
        if item.service != self._core.service:
            raise OtherService(item.id, item.service)
        subscription = self._core.subscription(item.handler_name)
        if subscription is None:
            raise UnknownHandler(item.handler_name)
        claim = await self._claim(item_id, actor)
        try:
            return await self._call_and_record(item, subscription, actor)
        finally:
            await self._release(item_id, claim)

    async def _call_and_record(
        self, item: DeadLetterItem, subscription: Subscription, actor: str | None
    ) -> tuple[DeadLetterItem, bool]:
        now = self._core.clock.now()
        metadata: dict[str, Any] = dict(item.metadata)
        metadata["reprocess_count"] = int(metadata.get("reprocess_count", 0)) + 1
        metadata["last_reprocessed_at"] = now.isoformat()
        if actor is not None:
            metadata["last_reprocessed_by"] = actor
        event = item.to_event()
        delivery = Delivery("reprocess", event, item.handler_name, item.attempt, item.metadata)
        await call_observed(subscription, delivery, self._core.observers, event)
        updated = self._after_reprocess(item, delivery.error, metadata, delivery.traceparent)
        if not await self._core.ledger.record_reprocess(delivery, updated):
            raise ItemNotFound(item.id)
        return updated, delivery.error is None

    def _after_reprocess(
        self,
        item: DeadLetterItem,
        error: BaseException | None,
        metadata: dict[str, Any],
        traceparent: str | None,
    ) -> DeadLetterItem:
        """The dead letter after a reprocess: processed, or with the new error
        (and the failed call's trace context); logged either way."""
        if error is None:
            logger.info(
                "reprocessed dead letter %s: handler %s, event %s (%s)",
                item.id,
                item.handler_name,
                item.event_id,
                item.event_type,
                extra=_log_fields(item),
            )
            return replace(
                item, processed=True, processed_at=self._core.clock.now(), metadata=metadata
            )
        info = ErrorInfo.from_exception(error)
        logger.warning(
            "reprocess of dead letter %s failed: handler %s, event %s (%s): %s",
            item.id,
            item.handler_name,
            item.event_id,
            item.event_type,
            info.message,
            extra=_log_fields(item, traceparent),
        )
        return replace(
            item,
            error=info.message,
            error_type=info.type,
            traceback=info.traceback,
            metadata=with_failed_attempt(metadata, traceparent),
        )

    async def _claim(self, item_id: str, actor: str | None) -> str:
        """Hold ``item_id`` for a reprocess (a control record, taken by compare-and-set;
        one left by a crashed process is taken over once it has run out)."""
        key = CLAIM_PREFIX + item_id
        now = self._core.clock.now()
        record = await self._core.store.get_control(key)
        if record is not None and _live(record.value, now):
            raise ItemBusy(
                item_id, f"being reprocessed by {record.value.get('by') or 'another process'}"
            )
        token = uuid.uuid4().hex
        claim = {
            "token": token,
            "by": actor or "",
            "until": (now + timedelta(seconds=REPROCESS_CLAIM)).isoformat(),
        }
        version = record.version if record is not None else 0
        if await self._core.store.put_control(key, claim, version=version) is None:
            raise ItemBusy(item_id, "being reprocessed by another process")
        return token

    async def _release(self, item_id: str, token: str) -> None:
        key = CLAIM_PREFIX + item_id
        record = await self._core.store.get_control(key)
        if record is not None and record.value.get("token") == token:
            await self._core.store.delete_control(key)

    async def _check_free(self, item_id: str) -> None:
        """Raise ``ItemBusy`` while a reprocess holds ``item_id``."""
        record = await self._core.store.get_control(CLAIM_PREFIX + item_id)
        if record is not None and _live(record.value, self._core.clock.now()):
            raise ItemBusy(
                item_id, f"being reprocessed by {record.value.get('by') or 'another process'}"
            )

    async def _busy_ids(self) -> set[str]:
        now = self._core.clock.now()
        return {
            record.key.removeprefix(CLAIM_PREFIX)
            for record in await self._core.store.list_control(CLAIM_PREFIX)
            if _live(record.value, now)
        }

    async def requeue(
        self,
        item_id: str,
        *,
        data: Any = UNSET,
        actor: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> RetryItem:
        """Move the dead letter back into the retry queue, due now, with all its
        retries ahead of it (the handler's current policy). Returns the new item.
        A dead letter of another service keeps its service: that service's
        workers run it (with the ``max_retries`` its stored subscription says).

        With ``data`` the event's payload is replaced first (edit and requeue): it
        must be JSON, and the item's ``metadata["edits"]`` keeps the original
        payload, the new one, who (``actor``) and when, as an audit trail that
        follows the item through later failures. When this bus registers the
        event's type, ``data`` is the payload at the type's current version
        (what ``reading`` shows, upcast): it is validated against the type's
        schema (``ValueError`` naming the field, nothing changed), stored as the
        current version (``dataversion``, and ``dataschema`` when the type has
        one; the type name stays as stored), and the edit also records the
        ``original_version`` and the new ``version``. Without ``data`` the
        stored payload and version are kept: the next delivery upcasts them.
        ``metadata`` is added to the new item's (a redrive marks its probe items).
        """
        _check_actor(actor)
        item = await self.get(item_id)
        await self._check_free(item_id)
        now = self._core.clock.now()
        if data is not UNSET:
            item = self._edited(item, data, actor, now)
        retry_item = item.to_retry_item(max_retries=await self._max_retries(item), now=now)
        if actor is not None:
            retry_item = replace(retry_item, metadata={**retry_item.metadata, "requeued_by": actor})
        if metadata:
            retry_item = replace(retry_item, metadata={**retry_item.metadata, **metadata})
        if not await self._core.ledger.requeue(item, retry_item):
            raise ItemNotFound(item_id)
        logger.info(
            "requeued dead letter %s as %s: handler %s, event %s (%s)",
            item_id,
            retry_item.id,
            item.handler_name,
            item.event_id,
            item.event_type,
            extra=_log_fields(item),
        )
        return retry_item

    def _edited(
        self, item: DeadLetterItem, data: Any, actor: str | None, now: datetime
    ) -> DeadLetterItem:
        """``item`` with ``data`` as its payload (at the current version of its
        type, when this bus registers it) and the edit recorded in its metadata."""
        edited = json.loads(encode_json(data, f"the new payload of dead letter {item.id!r}"))
        edit: dict[str, Any] = {
            "at": now.isoformat(),
            "by": actor or "unknown",
            "original_data": item.event_data,
            "data": edited,
        }
        extensions = item.event_extensions
        event_type = self._core.types.get(item.event_type)
        if event_type is not None:
            event_type.validated(edited)
            extensions = {**extensions, VERSION_EXTENSION: str(event_type.version)}
            if event_type.dataschema is not None:
                extensions[SCHEMA_EXTENSION] = event_type.dataschema
            edit["original_version"] = stored_version(item.to_event())
            edit["version"] = event_type.version
        metadata = dict(item.metadata)
        metadata["edits"] = [*list(metadata.get("edits", [])), edit]
        return replace(item, event_data=edited, event_extensions=extensions, metadata=metadata)

    async def reading(self, item: str | DeadLetterItem | RetryItem) -> Reading:
        """How this bus reads a dead letter (its id, or the item; a retry item
        too): the type's stored and current versions, and the data a handler
        would get (upcast, on a copy) or the reason it would be dead-lettered.
        What ``retrybus dlq show``, the dashboard and edit-and-requeue show and
        prefill. Raises ``ItemNotFound`` for an unknown id."""
        if isinstance(item, str):
            item = await self.get(item)
        return self._core.types.preview(item.to_event())

    async def _max_retries(self, item: DeadLetterItem) -> int:
        """The ``max_retries`` of the handler a requeued dead letter goes back to:
        its policy's on this bus, or for a dead letter of another service, what
        that service's stored subscription says (the dead letter's own when it
        has none)."""
        if item.service == self._core.service:
            return self._core.policy_for(item.handler_name).max_retries
        for subscription in await self._core.store.list_subscriptions(item.service):
            if subscription.handler_name == item.handler_name:
                return subscription.max_retries
        return item.max_retries

    async def delete(self, item_id: str) -> None:
        """Delete one dead letter; raises ``ItemNotFound``, or ``ItemBusy`` while it is
        being reprocessed."""
        await self._check_free(item_id)
        if not await self._core.store.delete_dead(item_id):
            raise ItemNotFound(item_id)

    # acting on many --------------------------------------------------------

    async def delete_many(self, ids: Sequence[str]) -> int:
        """Delete these dead letters (ids that are gone already are skipped);
        returns how many were deleted."""
        ids = _ids(ids)
        busy = await self._busy_ids() if ids else set()
        ids = [item_id for item_id in ids if item_id not in busy]
        return await self._core.store.delete_dead_many(ids) if ids else 0

    async def delete_matching(
        self, where: DeadLetterFilter | None = None, **fields: Unpack[FilterFields]
    ) -> int:
        """Delete every dead letter matching ``where`` and the filter fields given
        as keyword arguments that exists now (those created from now on are kept,
        even when they match; so are those being reprocessed); returns how many."""
        selected = filter_from(where, fields).narrowed(
            created_before=self._core.clock.now() + _TICK
        )
        busy = await self._busy_ids()
        deleted = 0
        while True:
            page = await self._core.store.list_dead(selected, limit=DELETE_PAGE, offset=0)
            if not page:
                return deleted
            last = page[-1]
            selected = selected.narrowed(cursor=(last.created_at, last.id))
            ids = [item.id for item in page if item.id not in busy]
            deleted += await self._core.store.delete_dead_many(ids) if ids else 0

    async def requeue_many(self, ids: Sequence[str], *, actor: str | None = None) -> BulkResult:
        """``requeue`` each of these dead letters, now (no rate limit: for a
        selection; ``bus.redrives`` requeues many at a bounded rate)."""
        succeeded: list[str] = []
        failed: dict[str, str] = {}
        missing: list[str] = []
        for item_id in _ids(ids):
            try:
                await self.requeue(item_id, actor=actor)
            except ItemNotFound:
                missing.append(item_id)
            except ItemBusy as exc:
                failed[item_id] = str(exc)
            else:
                succeeded.append(item_id)
        return BulkResult(tuple(succeeded), failed, tuple(missing))

    async def reprocess_many(self, ids: Sequence[str], *, actor: str | None = None) -> BulkResult:
        """``reprocess`` each of these dead letters, one after another."""
        succeeded: list[str] = []
        failed: dict[str, str] = {}
        missing: list[str] = []
        for item_id in _ids(ids):
            try:
                item, ok = await self.attempt_reprocess(item_id, actor=actor)
            except ItemNotFound:
                missing.append(item_id)
            except (LookupError, ItemBusy, OtherService) as exc:  # UnknownHandler, held elsewhere
                failed[item_id] = str(exc)
            else:
                if ok:
                    succeeded.append(item_id)
                else:
                    failed[item_id] = f"{item.error_type}: {item.error}"
        return BulkResult(tuple(succeeded), failed, tuple(missing))

    # housekeeping ----------------------------------------------------------

    async def cleanup(self, before: datetime | None = None) -> int:
        """Delete dead letters created before ``before`` (default: older than the
        bus's ``dead_letter_retention``); returns how many. Also forgets reprocess
        claims left behind by crashed processes."""
        await self._forget_stale_claims()
        if before is None:
            if self._core.dead_letter_retention is None:
                return 0
            before = self._core.clock.now() - timedelta(seconds=self._core.dead_letter_retention)
        return await self._core.store.cleanup_dead(before)

    async def health(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""
        await self._core.store.health()

    async def _forget_stale_claims(self) -> None:
        now = self._core.clock.now()
        for record in await self._core.store.list_control(CLAIM_PREFIX):
            if not _live(record.value, now):
                await self._core.store.delete_control(record.key)


# created_before is exclusive: what was created in this very microsecond still counts
_TICK = timedelta(microseconds=1)


def _log_fields(item: DeadLetterItem, traceparent: str | None = None) -> dict[str, Any]:
    fields = log_fields(
        item.event_id,
        item.event_type,
        item.handler_name,
        item.attempt,
        traceparent or last_failed_attempt(item.metadata),
    )
    fields["dead_letter_id"] = item.id
    return fields


def _live(claim: Any, now: datetime) -> bool:
    """Whether a reprocess claim still holds (a damaged one does not)."""
    try:
        until = datetime.fromisoformat(str(claim.get("until")))
    except (AttributeError, TypeError, ValueError):
        return False
    return until.tzinfo is not None and until > now


def _ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise TypeError(f"expected a list of ids, got the string {ids!r}")
    unique = list(dict.fromkeys(ids))
    for item_id in unique:
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(f"ids must be non-empty strings, got {item_id!r}")
    return unique
