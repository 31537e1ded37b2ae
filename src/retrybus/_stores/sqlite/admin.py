"""The SQLite store's admin half: browsing, counting, grouping, changing and
deleting retry items and dead letters, control records and the schema version."""

from __future__ import annotations

import abc
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from ..._event import encode_json
from ..._filters import DeadLetterFilter
from ..._groups import GroupCount
from ..._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from .._codec import parse_text_time, text_time
from .._newest import check_limit, newest_first
from .._queries import placeholders
from ..base import (
    DEAD_LETTER_GROUP_FIELDS,
    RETRY_GROUP_FIELDS,
    AdminStore,
    ControlRecord,
    DeadLetterField,
    RetryField,
    check_retry_kind,
)
from .codec import CODEC
from .migrate import read_version
from .sql import CHUNK, Q, dead_where, dict_rows

__all__ = ["SQLiteAdmin"]

T = TypeVar("T")


def _group_counts(rows: list[tuple[Any, ...]]) -> list[GroupCount]:
    return [
        GroupCount(str(key), int(count), parse_text_time(first), parse_text_time(last), str(sample))
        for key, count, first, last, sample in rows
    ]


def _control_from_row(row: tuple[Any, ...]) -> ControlRecord:
    key, version, value = row
    return ControlRecord(key, int(version), json.loads(value))


class SQLiteAdmin(AdminStore):
    """The ``AdminStore`` methods of ``SQLiteStore``, which inherits them and runs
    their statements (``_read``, ``_write``)."""

    @abc.abstractmethod
    async def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` on the connection."""

    @abc.abstractmethod
    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` in one ``BEGIN IMMEDIATE`` transaction."""

    async def schema_version(self) -> int:
        """The schema version the file records (``PRAGMA user_version``)."""
        return await self._read(read_version)

    # retry queue -----------------------------------------------------------

    async def retry_count(self) -> int:
        return int(await self._read(lambda conn: conn.execute(Q["retry_count"]).fetchone()[0]))

    async def count_due(self, before: datetime) -> int:
        return int(
            await self._read(
                lambda conn: conn.execute(Q["count_due"], (text_time(before),)).fetchone()[0]
            )
        )

    async def get_retry(self, item_id: str) -> RetryItem | None:
        rows = await self._read(lambda conn: dict_rows(conn.execute(Q["get_retry"], (item_id,))))
        return CODEC.retry_item(rows[0]) if rows else None

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
        params: dict[str, Any] = {
            "handler_name": handler_name,
            "event_type": event_type,
            "service": service,
            "limit": limit,
            "offset": offset,
        }
        condition = "TRUE" if kind is None else Q[f"kind_{kind}"]
        if now is not None and ":now" in condition:
            params["now"] = text_time(now)
        sql = Q["list_retry"].format(kind=condition)
        rows = await self._read(lambda conn: dict_rows(conn.execute(sql, params)))
        return [CODEC.retry_item(row) for row in rows]

    async def count_retry_kinds(self, now: datetime) -> dict[RetryKind, int]:
        params = {"now": text_time(now)}
        row = await self._read(lambda conn: conn.execute(Q["count_retry_kinds"], params).fetchone())
        return {kind: int(count) for kind, count in zip(RETRY_KINDS, row, strict=True)}

    async def find_retry_ids(self, prefix: str, *, limit: int) -> list[str]:
        # ids are ASCII: every id with the prefix sorts below prefix + U+FFFF (byte order)
        params = (prefix, prefix + "\uffff", limit)
        rows = await self._read(lambda conn: conn.execute(Q["find_retry_ids"], params).fetchall())
        return [str(row[0]) for row in rows]

    async def cancel_delivery(self, item_id: str, *, now: datetime) -> bool:
        params = {"id": item_id, "now": text_time(now)}
        return bool(
            await self._write(lambda conn: conn.execute(Q["cancel_delivery"], params).rowcount)
        )

    async def delete_retry(self, item_id: str) -> bool:
        return bool(
            await self._write(lambda conn: conn.execute(Q["delete_retry"], (item_id,)).rowcount)
        )

    async def group_retry(self, by: RetryField, *, limit: int) -> list[GroupCount]:
        if by not in RETRY_GROUP_FIELDS:
            raise ValueError(f"cannot group retry items by {by!r}: use {RETRY_GROUP_FIELDS}")
        sql = Q["group_retry"].format(by=by)
        params = {"limit": limit}
        return _group_counts(await self._read(lambda conn: conn.execute(sql, params).fetchall()))

    async def newest_failures(self, *, service: str | None = None, limit: int) -> list[RetryItem]:
        check_limit(limit)
        params = {"service": service, "limit": limit}
        rows = await self._read(lambda conn: dict_rows(conn.execute(Q["newest_failures"], params)))
        return newest_first((CODEC.retry_item(row) for row in rows), limit)

    # dead letter queue -----------------------------------------------------

    async def list_dead(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterItem]:
        condition, params = dead_where(where)
        sql = Q["list_dead"].format(where=condition)
        params.update(limit=limit, offset=offset)
        rows = await self._read(lambda conn: dict_rows(conn.execute(sql, params)))
        return [CODEC.dead_letter(row) for row in rows]

    async def count_dead(self, where: DeadLetterFilter) -> int:
        condition, params = dead_where(where)
        sql = Q["count_dead"].format(where=condition)
        return int(await self._read(lambda conn: conn.execute(sql, params).fetchone()[0]))

    async def group_dead(
        self, by: DeadLetterField, where: DeadLetterFilter, *, limit: int
    ) -> list[GroupCount]:
        if by not in DEAD_LETTER_GROUP_FIELDS:
            raise ValueError(f"cannot group dead letters by {by!r}: use {DEAD_LETTER_GROUP_FIELDS}")
        condition, params = dead_where(where)
        sql = Q["group_dead"].format(by=by, where=condition)
        params["limit"] = limit
        return _group_counts(await self._read(lambda conn: conn.execute(sql, params).fetchall()))

    async def get_dead(self, item_id: str) -> DeadLetterItem | None:
        rows = await self._read(lambda conn: dict_rows(conn.execute(Q["get_dead"], (item_id,))))
        return CODEC.dead_letter(rows[0]) if rows else None

    async def find_dead_ids(self, prefix: str, *, limit: int) -> list[str]:
        # ids are ASCII: every id with the prefix sorts below prefix + U+FFFF (byte order)
        params = (prefix, prefix + "\uffff", limit)
        rows = await self._read(lambda conn: conn.execute(Q["find_dead_ids"], params).fetchall())
        return [str(row[0]) for row in rows]

    async def update_dead(self, item: DeadLetterItem) -> bool:
        params = CODEC.dead_letter_fields(item)
        return bool(await self._write(lambda conn: conn.execute(Q["update_dead"], params).rowcount))

    async def requeue_dead(self, item_id: str, retry_item: RetryItem) -> bool:
        params = CODEC.retry_fields(retry_item)

        def run(conn: sqlite3.Connection) -> bool:
            if not conn.execute(Q["delete_dead"], (item_id,)).rowcount:
                return False
            conn.execute(Q["insert_retry"], params)
            conn.execute(Q["add_counter"], (1, "retry_added"))
            return True

        return await self._write(run)

    async def delete_dead(self, item_id: str) -> bool:
        return bool(
            await self._write(lambda conn: conn.execute(Q["delete_dead"], (item_id,)).rowcount)
        )

    async def delete_dead_many(self, ids: Sequence[str]) -> int:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            deleted = 0
            for start in range(0, len(unique), CHUNK):
                chunk = unique[start : start + CHUNK]
                sql = Q["delete_dead_many"].format(ids=placeholders(len(chunk)))
                deleted += conn.execute(sql, chunk).rowcount
            return deleted

        return await self._write(run)

    # control records -------------------------------------------------------

    async def get_control(self, key: str) -> ControlRecord | None:
        row = await self._read(lambda conn: conn.execute(Q["get_control"], (key,)).fetchone())
        return None if row is None else _control_from_row(row)

    async def put_control(self, key: str, value: Mapping[str, Any], *, version: int) -> int | None:
        params = {
            "key": key,
            "value": encode_json(dict(value), f"control record {key!r}"),
            "version": version,
        }
        # one statement, in a BEGIN IMMEDIATE transaction: the compare-and-set is
        # atomic across processes
        sql = Q["create_control"] if version == 0 else Q["replace_control"]
        written = await self._write(lambda conn: conn.execute(sql, params).rowcount)
        return version + 1 if written else None

    async def list_control(self, prefix: str) -> list[ControlRecord]:
        rows = await self._read(
            lambda conn: conn.execute(Q["list_control"], {"prefix": prefix}).fetchall()
        )
        return [_control_from_row(row) for row in rows]

    async def delete_control(self, key: str) -> bool:
        return bool(
            await self._write(lambda conn: conn.execute(Q["delete_control"], (key,)).rowcount)
        )
