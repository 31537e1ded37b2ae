"""``bus.inbox``: make a handler's effect in its own database happen once.

``async with bus.inbox.claim(event, connection=conn):`` inside the handler's
transaction inserts the delivery's claim (``INSERT … ON CONFLICT DO NOTHING
RETURNING``) into the ``retrybus_inbox`` table of that database: the claim
commits or rolls back with the effect. A delivery whose claim is already there
(an earlier delivery's effect committed) raises ``AlreadyHandled`` on entry:
the body is skipped, and the delivery core counts it as a skipped success.
Two deliveries at once in two transactions: the second waits on the first's
row (PostgreSQL's unique index, SQLite's write lock) and finds it once the
first commits, or claims it itself if the first rolls back.
"""

from __future__ import annotations

import contextlib
import random
import weakref
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._appdb import AppConnection, app_connection
from .._current import current_handler
from .._errors import AlreadyHandled
from .._event import Event
from .._records import delivery_id
from .._stores._codec import text_time
from .table import CLAIM, PRUNE, PRUNE_EVERY, create_table, table_exists

if TYPE_CHECKING:
    from .._core import BusCore

__all__ = ["Claim", "Inbox"]


class Inbox:
    """The bus's idempotent inbox (``bus.inbox``)."""

    def __init__(self, core: BusCore) -> None:
        self._core = core
        # the connections (the objects callers gave) whose database is known
        # to have the table, committed: no look before each claim
        self._has_table: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._random = random.Random()

    def claim(self, event: Event, *, connection: object, handler: str | None = None) -> Claim:
        """An ``async with`` block that runs once per delivery of ``event`` to
        ``handler`` of this bus's service, inside the caller's open transaction
        on ``connection`` (asyncpg, SQLAlchemy ``AsyncConnection`` or
        ``AsyncSession``, ``sqlite3`` or aiosqlite): entering it writes the claim
        there, so that it commits or rolls back with the block's effect.
        Entering raises ``AlreadyHandled`` when the claim was committed before;
        let it propagate out of the handler (the delivery then counts as a
        skipped success). ``handler`` defaults to the handler being called
        (``ValueError`` outside a handler call without it)."""
        if not isinstance(event, Event):
            raise TypeError(f"inbox.claim takes a retrybus.Event, got {event!r}")
        if handler is None:
            handler = current_handler.get()
            if handler is None:
                raise ValueError(
                    "inbox.claim outside a handler call needs handler= (the name of the "
                    "handler whose effect it claims)"
                )
        elif not isinstance(handler, str) or not handler:
            raise ValueError(f"handler must be a non-empty string, got {handler!r}")
        return Claim(self, event, connection, handler)

    async def prune(self, connection: object) -> None:
        """Delete (up to a batch of) claims older than the bus's ``inbox_retention``
        on ``connection``, in its open transaction if any. Claims do it now and
        then on their own; call it from a maintenance job to keep up with a
        large backlog."""
        app = await app_connection(connection)
        if await self._ensure_table(app):
            await self._prune(app)

    async def _ensure_table(self, app: AppConnection) -> bool:
        """Make sure the table exists; whether it existed before."""
        with contextlib.suppress(TypeError):  # an object that cannot be weakly referenced
            if self._has_table.get(app.raw):
                return True
        if await table_exists(app):
            with contextlib.suppress(TypeError):
                self._has_table[app.raw] = True
            return True
        # created in the caller's transaction: not remembered (it may roll back)
        await create_table(app)
        return False

    async def _prune(self, app: AppConnection) -> None:
        retention = self._core.inbox_retention
        if retention is None:
            return
        before = self._core.clock.now() - timedelta(seconds=retention)
        await app.execute(
            PRUNE[app.dialect], (before if app.dialect == "postgresql" else text_time(before),)
        )

    async def _claim(self, app: AppConnection, event: Event, handler: str) -> bool:
        core = self._core
        existed = await self._ensure_table(app)
        if existed and self._random.randrange(PRUNE_EVERY) == 0:
            await self._prune(app)
        service = core.service
        now = core.clock.now()
        rows = await app.fetch(
            CLAIM[app.dialect],
            (
                delivery_id(event.source, event.id, handler, service),
                service,
                handler,
                event.id,
                event.source,
                now if app.dialect == "postgresql" else text_time(now),
            ),
        )
        return bool(rows)


class Claim:
    """One ``bus.inbox.claim(...)`` block (see ``Inbox.claim``)."""

    __slots__ = ("_connection", "_event", "_handler", "_inbox")

    def __init__(self, inbox: Inbox, event: Event, connection: object, handler: str) -> None:
        self._inbox = inbox
        self._event = event
        self._connection = connection
        self._handler = handler

    async def __aenter__(self) -> Claim:
        inbox = self._inbox
        app = await app_connection(self._connection)
        if not await inbox._claim(app, self._event, self._handler):
            core = inbox._core
            core.inbox_skipped(self._handler, self._event)
            raise AlreadyHandled(core.service, self._handler, self._event.id)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
