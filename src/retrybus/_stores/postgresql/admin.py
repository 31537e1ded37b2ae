"""The PostgreSQL store's admin half (``AdminStore``): browsing, counting and
grouping retry items and dead letters, acting on single dead letters and many,
control records, and the schema version.

``PostgresAdmin`` is a mixin that ``PostgresStore`` inherits; it reaches the
database only through the store's ``_run`` (a pooled connection, errors mapped).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ..._event import encode_json
from ..._filters import DeadLetterFilter
from ..._groups import GroupCount
from ..._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from .._fields import json_object
from .._newest import check_limit, newest_first
from ..base import (
    DEAD_LETTER_GROUP_FIELDS,
    RETRY_GROUP_FIELDS,
    AdminStore,
    ControlRecord,
    DeadLetterField,
    RetryField,
    check_retry_kind,
)
from .codec import CODEC, retry_values
from .migrate import fill_failure_groups
from .sql import Q, affected, aware, aware_or_none

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

__all__ = ["PostgresAdmin"]

T = TypeVar("T")
_MICROSECOND = timedelta(microseconds=1)


def _filter_args(where: DeadLetterFilter) -> tuple[Any, ...]:
    """``$1..$11`` of list_dead, count_dead and group_dead."""
    cursor = where.cursor
    return (
        where.event_type,
        where.handler_name,
        where.reason,
        where.processed,
        aware_or_none(where.created_after),
        aware_or_none(where.created_before),
        where.event_id,
        where.failure_group,
        None if cursor is None else aware_or_none(cursor[0]),
        None if cursor is None else cursor[1],
        where.service,
    )


def _group_from_row(row: Mapping[str, Any]) -> GroupCount:
    return GroupCount(
        key=row["key"],
        count=int(row["n"]),
        first_at=row["first_at"],
        last_at=row["last_at"],
        sample_id=row["sample_id"],
    )


def _control_from_row(row: Mapping[str, Any]) -> ControlRecord:
    return ControlRecord(
        key=row["key"], version=int(row["version"]), value=json_object(row["value"])
    )


class PostgresAdmin(AdminStore):
    """The ``AdminStore`` methods of ``PostgresStore``, which provides ``_run``,
    ``connect`` and ``channel``."""

    #: the NOTIFY channel of the store's schema
    channel: str

    @abc.abstractmethod
    async def _run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``operation`` on a pooled connection (``PostgresStore._run``)."""

    # schema ------------------------------------------------------------------

    async def migrate(self) -> int:
        """Run the migration now (it runs on first use anyway); returns the schema version."""
        await self.connect()
        return await self.schema_version()

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""
        return int(await self._run(lambda conn: conn.fetchval(Q["current_version"])))

    # retry queue -------------------------------------------------------------

    async def retry_count(self) -> int:
        return int(await self._run(lambda conn: conn.fetchval(Q["retry_count"])))

    async def count_due(self, before: datetime) -> int:
        at = aware(before)
        return int(await self._run(lambda conn: conn.fetchval(Q["count_due"], at)))

    async def get_retry(self, item_id: str) -> RetryItem | None:
        row = await self._run(lambda conn: conn.fetchrow(Q["get_retry"], item_id))
        return None if row is None else CODEC.retry_item(row)

    async def list_retry(
        self,
        *,
        limit: int,
        offset: int,
        handler_name: str | None = None,
        event_type: str | None = None,
        kind: RetryKind | None = None,
        now: datetime | None = None,
        service: str | None = None,
    ) -> list[RetryItem]:
        check_retry_kind(kind, now)
        earliest = latest = first = None
        if kind == "retry":
            first = False
        elif kind is not None and now is not None:
            first = True
            if kind == "pending":
                latest = aware(now)
            else:  # scheduled: after now (times are whole microseconds)
                earliest = aware(now) + _MICROSECOND
        args = (handler_name, event_type, limit, offset, earliest, latest, first, service)
        rows = await self._run(lambda conn: conn.fetch(Q["list_retry"], *args))
        return [CODEC.retry_item(row) for row in rows]

    async def count_retry_kinds(self, now: datetime) -> dict[RetryKind, int]:
        at = aware(now)
        row = await self._run(lambda conn: conn.fetchrow(Q["count_retry_kinds"], at))
        assert row is not None
        return {kind: int(count) for kind, count in zip(RETRY_KINDS, row, strict=True)}

    async def find_retry_ids(self, prefix: str, *, limit: int) -> list[str]:
        rows = await self._run(lambda conn: conn.fetch(Q["find_retry_ids"], prefix, limit))
        return [str(row[0]) for row in rows]

    async def cancel_delivery(self, item_id: str, *, now: datetime) -> bool:
        at = aware(now)
        return bool(
            affected(await self._run(lambda conn: conn.execute(Q["cancel_delivery"], item_id, at)))
        )

    async def delete_retry(self, item_id: str) -> bool:
        return bool(
            affected(await self._run(lambda conn: conn.execute(Q["delete_retry"], item_id)))
        )

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        if by not in RETRY_GROUP_FIELDS:
            raise ValueError(f"cannot group retry items by {by!r}: use {RETRY_GROUP_FIELDS}")
        rows = await self._run(lambda conn: conn.fetch(Q["group_retry"], by, limit))
        return [_group_from_row(row) for row in rows]

    async def newest_failures(self, *, service: str | None = None, limit: int) -> list[RetryItem]:
        check_limit(limit)
        rows = await self._run(lambda conn: conn.fetch(Q["newest_failures"], service, limit))
        return newest_first((CODEC.retry_item(row) for row in rows), limit)

    # dead letter queue -------------------------------------------------------

    async def _fetch_dead(
        self, query: str, where: DeadLetterFilter, *extra: Any, by_group: bool = False
    ) -> list[asyncpg.Record]:
        """Run a query taking the filter as ``$1..$11``; when it reads failure groups,
        first fill those an older retrybus left out (one quick look when there are none)."""
        args = (*_filter_args(where), *extra)
        needs_groups = by_group or where.failure_group is not None

        async def run(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            if needs_groups:
                await fill_failure_groups(conn)
            return cast("list[asyncpg.Record]", await conn.fetch(Q[query], *args))

        return await self._run(run)

    async def list_dead(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterItem]:
        rows = await self._fetch_dead("list_dead", where, limit, offset)
        return [CODEC.dead_letter(row) for row in rows]

    async def count_dead(self, where: DeadLetterFilter) -> int:
        rows = await self._fetch_dead("count_dead", where)
        return int(rows[0][0])

    async def group_dead(
        self, by: DeadLetterField, where: DeadLetterFilter, *, limit: int
    ) -> list[GroupCount]:
        if by not in DEAD_LETTER_GROUP_FIELDS:
            raise ValueError(f"cannot group dead letters by {by!r}: use {DEAD_LETTER_GROUP_FIELDS}")
        rows = await self._fetch_dead(
            "group_dead", where, by, limit, by_group=by == "failure_group"
        )
        return [_group_from_row(row) for row in rows]

    async def get_dead(self, item_id: str) -> DeadLetterItem | None:
        row = await self._run(lambda conn: conn.fetchrow(Q["get_dead"], item_id))
        return None if row is None else CODEC.dead_letter(row)

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        rows = await self._run(lambda conn: conn.fetch(Q["find_dead_ids"], prefix, limit))
        return [str(row[0]) for row in rows]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        args = (
            item.id,
            item.error,
            item.error_type,
            item.traceback,
            item.attempt,
            CODEC.write_flag(item.processed),
            aware_or_none(item.processed_at),
            CODEC.write_json(dict(item.metadata)),
            CODEC.write_json(item.event_data),
            item.reason,
            item.failure_group,
        )
        return bool(affected(await self._run(lambda conn: conn.execute(Q["update_dead"], *args))))

    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        args = (item_id, *retry_values(retry_item), self.channel)
        row = await self._run(lambda conn: conn.fetchrow(Q["requeue_dead"], *args))
        assert row is not None
        return bool(row[0])

    async def delete_dead(self, item_id: str) -> bool:
        return bool(affected(await self._run(lambda conn: conn.execute(Q["delete_dead"], item_id))))

    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        unique = list(set(ids))
        return affected(await self._run(lambda conn: conn.execute(Q["delete_dead_many"], unique)))

    # control records ---------------------------------------------------------

    async def get_control(self, key: str) -> ControlRecord | None:
        row = await self._run(lambda conn: conn.fetchrow(Q["get_control"], key))
        return None if row is None else _control_from_row(row)

    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        text = encode_json(dict(value), f"control record {key!r}")
        if version == 0:
            written = await self._run(lambda conn: conn.fetchval(Q["create_control"], key, text))
        else:
            written = await self._run(
                lambda conn: conn.fetchval(Q["update_control"], key, version, text)
            )
        return None if written is None else int(written)

    async def list_control(self, prefix: str) -> list[ControlRecord]:
        rows = await self._run(lambda conn: conn.fetch(Q["list_control"], prefix))
        return [_control_from_row(row) for row in rows]

    async def delete_control(self, key: str) -> bool:
        return bool(affected(await self._run(lambda conn: conn.execute(Q["delete_control"], key))))
