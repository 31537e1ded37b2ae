"""The PostgreSQL store's part of the outbox: when an application's connection is
to the database that holds the store, the outbox writes pending deliveries
straight into ``retry_queue`` in the caller's transaction (no relay), and the
store wakes its workers once that transaction has ended.

Two connections are to the same database when they report the same database
name, server port and server start time (``database_identity``): the start time
tells two servers apart that share a port on different hosts, and a restarted
server from itself, so the store reads its own answer again when it no longer
matches.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..._appdb import AppConnection
from ..._records import RetryItem
from .codec import retry_columns
from .sql import Q, quote

__all__ = ["PostgresStaging"]

T = TypeVar("T")


class PostgresStaging(abc.ABC):
    """``same_database``, ``stage_pending`` and ``staged`` for ``PostgresStore``."""

    schema: str
    channel: str
    _identity: tuple[Any, ...] | None = None

    @abc.abstractmethod
    async def _run(self, operation: Callable[[Any], Awaitable[T]]) -> T: ...

    async def _own_identity(self, fresh: bool) -> tuple[Any, ...]:
        if self._identity is None or fresh:
            row = await self._run(lambda conn: conn.fetchrow(Q["database_identity"]))
            self._identity = tuple(row)
        return self._identity

    async def same_database(self, connection: AppConnection) -> bool:
        """One round trip on ``connection``: its database's identity, compared
        with the store's."""
        if connection.dialect != "postgresql":
            return False
        (theirs,) = await connection.fetch(Q["database_identity"])
        if theirs == await self._own_identity(fresh=False):
            return True
        # the same database name and port: the server may have restarted since
        # the store read its identity
        return theirs[:2] == self._identity[:2] and theirs == await self._own_identity(True)  # type: ignore[index]

    async def stage_pending(self, connection: AppConnection, items: Sequence[RetryItem]) -> None:
        """One statement on ``connection``: the records, ids already stored skipped."""
        if items:
            query = Q["stage_pending"].replace("{schema}", quote(self.schema))
            await connection.execute(query, retry_columns(items))

    _notifying: bool = False
    _notify_again: bool = False

    async def staged(self) -> None:
        """A NOTIFY on the store's channel, from the store's own connection; while
        one is on its way, the commits that end meanwhile share the next one."""
        if self._notifying:
            self._notify_again = True
            return
        self._notifying = True
        try:
            while True:
                self._notify_again = False
                await self._run(lambda conn: conn.execute(Q["notify"], self.channel))
                if not self._notify_again:
                    return
        finally:
            self._notifying = False
