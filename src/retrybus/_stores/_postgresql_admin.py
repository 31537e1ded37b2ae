"""The PostgreSQL store's admin side: browsing, counting, grouping and bulk-deleting
dead letters, grouping retry items, and control records.

A worker never needs these, so ``PostgresStore`` imports this module on first use
(it keeps a worker process small). The queries are those of ``postgresql.sql``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import asyncpg  # type: ignore[import-untyped]

from .._event import encode_json
from .._filters import DeadLetterFilter
from .._groups import GroupCount
from .._records import DeadLetterItem
from ._postgresql_migrate import fill_failure_groups
from .base import (
    DEAD_LETTER_GROUP_FIELDS,
    RETRY_GROUP_FIELDS,
    ControlRecord,
    DeadLetterField,
    RetryField,
)
from .postgresql import Q, _affected, _aware_or_none, _object

if TYPE_CHECKING:
    from .postgresql import PostgresStore


def _dead_from_row(row: Mapping[str, Any]) -> DeadLetterItem:
    metadata: dict[str, Any]
    try:
        data = None if row["event_data"] is None else json.loads(row["event_data"])
        metadata = _object(row["metadata"])
    except ValueError:
        # A damaged dead letter is still shown: its payload as the text that is stored.
        data = row["event_data"]
        metadata = {"undecodable": True}
    return DeadLetterItem(
        id=row["id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        event_data=data,
        event_source=row["event_source"],
        event_timestamp=row["event_timestamp"],
        event_subject=row["event_subject"],
        event_extensions=_object(row["event_extensions"]),
        handler_name=row["handler_name"],
        error=row["error"],
        error_type=row["error_type"],
        traceback=row["traceback"],
        attempt=int(row["attempt"]),
        max_retries=int(row["max_retries"]),
        reason=row["reason"],
        processed=bool(row["processed"]),
        created_at=row["created_at"],
        processed_at=row["processed_at"],
        first_failed_at=row["first_failed_at"],
        metadata=metadata,
    )


def _filter_args(where: DeadLetterFilter) -> tuple[Any, ...]:
    """``$1..$10`` of list_dead, count_dead and group_dead."""
    cursor = where.cursor
    return (
        where.event_type,
        where.handler_name,
        where.reason,
        where.processed,
        _aware_or_none(where.created_after),
        _aware_or_none(where.created_before),
        where.event_id,
        where.failure_group,
        None if cursor is None else _aware_or_none(cursor[0]),
        None if cursor is None else cursor[1],
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
    return ControlRecord(key=row["key"], version=int(row["version"]), value=_object(row["value"]))


# dead letter queue -----------------------------------------------------------


async def _fetch_dead(
    store: PostgresStore, query: str, where: DeadLetterFilter, *extra: Any, by_group: bool = False
) -> list[asyncpg.Record]:
    """Run a query taking the filter as ``$1..$10``; when it reads failure groups,
    first fill those an older retrybus left out (one quick look when there are none)."""
    args = (*_filter_args(where), *extra)
    needs_groups = by_group or where.failure_group is not None

    async def run(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        if needs_groups:
            await fill_failure_groups(conn)
        return cast(list[asyncpg.Record], await conn.fetch(Q[query], *args))

    return await store._run(run)


async def list_dead(
    store: PostgresStore, where: DeadLetterFilter, limit: int, offset: int
) -> list[DeadLetterItem]:
    rows = await _fetch_dead(store, "list_dead", where, limit, offset)
    return [_dead_from_row(row) for row in rows]


async def count_dead(store: PostgresStore, where: DeadLetterFilter) -> int:
    rows = await _fetch_dead(store, "count_dead", where)
    return int(rows[0][0])


async def group_dead(
    store: PostgresStore, by: DeadLetterField, where: DeadLetterFilter, limit: int
) -> list[GroupCount]:
    if by not in DEAD_LETTER_GROUP_FIELDS:
        raise ValueError(f"cannot group dead letters by {by!r}: use {DEAD_LETTER_GROUP_FIELDS}")
    rows = await _fetch_dead(store, "group_dead", where, by, limit, by_group=by == "failure_group")
    return [_group_from_row(row) for row in rows]


async def get_dead(store: PostgresStore, item_id: str) -> DeadLetterItem | None:
    row = await store._run(lambda conn: conn.fetchrow(Q["get_dead"], item_id))
    return None if row is None else _dead_from_row(row)


async def delete_dead_many(store: PostgresStore, ids: Sequence[str]) -> int:
    if not ids:
        return 0
    unique = list(set(ids))
    return _affected(await store._run(lambda conn: conn.execute(Q["delete_dead_many"], unique)))


async def group_retry(store: PostgresStore, by: RetryField, limit: int) -> list[GroupCount]:
    if by not in RETRY_GROUP_FIELDS:
        raise ValueError(f"cannot group retry items by {by!r}: use {RETRY_GROUP_FIELDS}")
    rows = await store._run(lambda conn: conn.fetch(Q["group_retry"], by, limit))
    return [_group_from_row(row) for row in rows]


# control records -------------------------------------------------------------


async def get_control(store: PostgresStore, key: str) -> ControlRecord | None:
    row = await store._run(lambda conn: conn.fetchrow(Q["get_control"], key))
    return None if row is None else _control_from_row(row)


async def put_control(
    store: PostgresStore, key: str, value: Mapping[str, Any], version: int
) -> int | None:
    text = encode_json(dict(value), f"control record {key!r}")
    if version == 0:
        written = await store._run(lambda conn: conn.fetchval(Q["create_control"], key, text))
    else:
        written = await store._run(
            lambda conn: conn.fetchval(Q["update_control"], key, version, text)
        )
    return None if written is None else int(written)


async def list_control(store: PostgresStore, prefix: str) -> list[ControlRecord]:
    rows = await store._run(lambda conn: conn.fetch(Q["list_control"], prefix))
    return [_control_from_row(row) for row in rows]


async def delete_control(store: PostgresStore, key: str) -> bool:
    return bool(_affected(await store._run(lambda conn: conn.execute(Q["delete_control"], key))))
