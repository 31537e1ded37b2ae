"""``bus.outbox``: stage an event in the caller's open transaction, so that it is
delivered if and only if that transaction commits.

Two ways, chosen per connection: when the connection is to the database that
holds the bus's store (the same PostgreSQL database, the same SQLite file), the
pending deliveries themselves are written there, one per matching handler of
this service and of every other subscribed service, and workers run them once
the transaction commits: no relay. Otherwise the event goes into the
``retrybus_outbox`` table of the connection's database (created on first use)
and a relay (``OutboxRelay``: in every worker of a bus given ``outbox=URL``, or
``retrybus relay``) publishes it after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from .._appdb import AppConnection, app_connection
from .._errors import RecordRejected
from .._event import Event
from .._ordering import keyed, ordering_key_of
from .._records import DeadLetterItem, RetryItem, dead_letter_id_for, delivery_id
from .._routes import Routes
from .._stores._codec import text_time
from .._stores._url import redact
from .._transports.wire import decode, encode
from .database import OutboxDatabase, OutboxDepth, open_outbox_database
from .table import INSERT, ORDER_LOCK, OutboxRow, create_table, table_exists

if TYPE_CHECKING:
    from .._core import BusCore
    from .._publish import Publisher, Publishing
    from .._stores.base import Store
    from .relay import OutboxRelay

__all__ = ["Outbox", "Staged"]

logger = logging.getLogger("retrybus.outbox")

#: seconds between two looks at whether a staging transaction has ended, at
#: first and at most (doubling in between); then the store wakes its workers
_COMMIT_POLL_FIRST = 0.001
_COMMIT_POLL_MAX = 0.05
#: a transaction still open after this long is left to the workers' own polling
_COMMIT_WAIT_MAX = 60.0


@dataclass(frozen=True, slots=True)
class Staged:
    """What ``stage`` did with an event: ``"store"``, pending deliveries written
    into the store's own tables (``handlers``: ``service/handler`` of each), or
    ``"outbox"``, a row of the ``retrybus_outbox`` table for a relay."""

    event: Event
    into: Literal["store", "outbox"]
    handlers: tuple[str, ...] = ()


class Outbox:
    """The bus's transactional outbox (``bus.outbox``)."""

    def __init__(
        self,
        core: BusCore,
        publisher: Callable[[], Publisher],
        publishing: Callable[[], Publishing],
        url: str | None,
    ) -> None:
        self._core = core
        self._publisher = publisher
        self._publishing = publishing
        if url is not None:
            open_outbox_database(url)  # a ValueError naming a URL of the wrong kind
        # every service's stored subscriptions: a relay publishes rows that any
        # service staged
        self._every_service = Routes(_EveryService(core), core.routes.refresh)
        #: the application database whose ``retrybus_outbox`` this bus's workers relay
        self.url = url
        # what is known of a connection object while it lives: whether it is to
        # the store's database
        self._same: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()
        self._table_ready: set[str] = set()
        self._watching: dict[int, asyncio.Task[None]] = {}
        self._wakers: list[Callable[[], None]] = []
        self._reader: OutboxDatabase | None = None

    def use(self, url: str | None) -> None:
        """Relay the outbox table at ``url`` from this bus's workers from now on
        (None: none); ``ValueError`` naming a URL that is no PostgreSQL or
        SQLite database."""
        if url is not None:
            open_outbox_database(url)
        self.url = url

    async def stage(
        self, event: Event, *, connection: object, ordering_key: str | None = None
    ) -> Staged:
        """Stage ``event`` in the transaction open on ``connection`` (an asyncpg
        connection, a SQLAlchemy ``AsyncConnection`` or ``AsyncSession``, a
        ``sqlite3`` or aiosqlite connection): it is delivered if and only if that
        transaction commits. Nothing commits here; call it inside the
        transaction, after (or before) the rows the event announces.

        ``ordering_key`` (as on ``publish``: a non-empty str of at most 200
        characters, carried as the ``partitionkey`` extension): each handler gets
        the events of one key one at a time, in commit order. On PostgreSQL a
        keyed stage takes a transaction-level advisory lock on the key
        (``pg_advisory_xact_lock``), held until the transaction ends: another
        transaction staging the same key waits for it at its stage.

        Raises ``TypeError`` for another kind of connection, ``ValueError`` for a
        bad key or data that fails its registered type's schema, and what the database raises (the caller's transaction then
        fails with it)."""
        if not isinstance(event, Event):
            raise TypeError(f"stage takes a retrybus.Event, got {event!r}")
        event = keyed(event, ordering_key)
        if self._core.types.active:  # as publish does: stamped, validated
            event = self._core.types.stamp(event)
        key = ordering_key_of(event.extensions)
        app = await app_connection(connection)
        if key is not None and app.dialect == "postgresql":
            await app.execute(ORDER_LOCK, [key])
        core = self._core
        if await self._same_database(app):
            records = await self._publisher().deferred_records(event)
            await core.store.stage_pending(app, records)
            if app.dialect == "postgresql":  # SQLite's watch sees every commit on its own
                self._wake_after_commit(app, core.store.staged)
            return Staged(event, "store", tuple(f"{r.service}/{r.handler_name}" for r in records))
        await self._ensure_table(app)
        now = core.clock.now()
        staged_at = now if app.dialect == "postgresql" else text_time(now)
        await app.execute(
            INSERT[app.dialect], [core.service, encode(event).decode(), key, staged_at]
        )
        if self._wakers:
            self._wake_after_commit(app, self._wake_relays)
        return Staged(event, "outbox")

    async def _same_database(self, app: AppConnection) -> bool:
        try:
            return self._same[app.raw]
        except (KeyError, TypeError):  # TypeError: an object without weak references
            pass
        same = await self._core.store.same_database(app)
        with contextlib.suppress(TypeError):
            self._same[app.raw] = same
        return same

    async def _ensure_table(self, app: AppConnection) -> None:
        if app.dialect in self._table_ready:
            return
        if await table_exists(app):
            self._table_ready.add(app.dialect)
        else:
            # in the caller's transaction: a rollback takes the table back with it,
            # so it counts as there only once a later stage finds it
            await create_table(app)

    # relaying -------------------------------------------------------------

    def relay(self, database: OutboxDatabase | str | None = None, **options: Any) -> OutboxRelay:
        """A relay of the outbox table at ``database`` (a URL, by default the
        bus's ``outbox=``) to this bus's store or transport; ``options`` are
        ``OutboxRelay``'s (``poll_interval``, ``batch``, ``lease``)."""
        from .relay import OutboxRelay

        target = database if database is not None else self.url
        if target is None:
            raise ValueError("no outbox database to relay: give EventBus(outbox=URL) or relay(URL)")
        return OutboxRelay(self, target, **options)

    async def depth(self) -> OutboxDepth | None:
        """How many staged events wait in the bus's outbox table (``outbox=``),
        and since when the oldest (None: the bus has no outbox database).
        Raises ``StoreUnavailable`` when that database cannot be reached."""
        if self.url is None:
            return None
        reader = self._reader
        if reader is None or reader.url != redact(self.url):
            if reader is not None:
                await reader.close()
            reader = self._reader = open_outbox_database(self.url)
        return await reader.depth()

    @property
    def label(self) -> str | None:
        """The outbox database's short name (None: none), as the metrics label it."""
        return None if self.url is None else open_outbox_database(self.url).label

    async def close(self) -> None:
        """Release the connection ``depth`` keeps."""
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()

    def now(self) -> datetime:
        """The bus's clock's time."""
        return self._core.clock.now()

    async def publish_staged(self, rows: Sequence[OutboxRow]) -> None:
        """Publish claimed outbox rows (a relay's batch) to the bus's carrier: one
        store write of every pending delivery (this service's handlers, as a
        deferred publish routes them, for rows this service staged; every
        subscribed service's stored subscriptions for another's), or one broker
        message per event. A row that holds no readable event becomes a dead
        letter keeping its text. Raises ``StoreUnavailable`` when the carrier
        cannot take them."""
        core = self._core
        events: list[tuple[OutboxRow, Event]] = []
        unreadable: list[DeadLetterItem] = []
        for row in rows:
            try:
                events.append((row, decode(row.event.encode())))
            except ValueError as exc:
                unreadable.append(_unreadable_row(row, str(exc), core.clock.now()))
        if unreadable:
            await core.ledger.add_dead_letters(unreadable)
        if core.transport is not None:
            # a keyed event is recorded pending in the store (a broker's
            # competing consumers could not keep its key's order)
            publishing = self._publishing()
            await asyncio.gather(
                *(
                    publishing.publish(event, durable=True, due=None, defer=False)
                    for _row, event in events
                    if ordering_key_of(event.extensions) is None
                )
            )
            events = [(row, event) for row, event in events if ordering_key_of(event.extensions)]
            if not events:
                return
        records = [await self._records(row.service, event) for row, event in events]
        try:
            await core.ledger.record_pending(
                [r for each in records for r in each], f"{len(events)} staged events"
            )
        except RecordRejected:
            # one row the store refuses must not hold up the others for ever: each
            # on its own, and what is still refused becomes a dead letter
            for (row, event), each in zip(events, records, strict=True):
                try:
                    await core.ledger.record_pending(each, _context(event))
                except RecordRejected as exc:
                    await core.ledger.add_dead_letters(
                        [_unreadable_row(row, str(exc), core.clock.now(), "rejected")]
                    )

    async def _records(self, service: str, event: Event) -> list[RetryItem]:
        """The pending records of a staged ``event`` that ``service`` staged."""
        publisher = self._publisher()
        # this bus's own handlers where it has them: a bus that registered none
        # (``retrybus relay``) routes its own service by the stored subscriptions
        if service == self._core.service and self._core.registry.subscriptions():
            return await publisher.deferred_records(event)
        routes = await self._every_service.matching(event.type)
        return await publisher.deferred_records(event, routes, local=False)

    # waking --------------------------------------------------------------

    def on_staged(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` after each transaction that staged into the outbox
        table in this process ends (a relay here then runs at once rather than
        at its next poll); returns the function that stops it."""
        self._wakers.append(wake)
        return lambda: self._wakers.remove(wake)

    async def _wake_relays(self) -> None:
        for wake in list(self._wakers):
            wake()

    def _wake_after_commit(self, app: AppConnection, wake: Callable[[], object]) -> None:
        """Run ``wake`` once the caller's transaction on ``app`` has ended (a
        rollback wakes for nothing, which costs a look). Never a statement on the
        caller's connection: it may be in use again by then."""
        key = id(app.raw)
        if key in self._watching:
            return
        task = asyncio.ensure_future(self._after_commit(app, wake))
        self._watching[key] = task
        task.add_done_callback(lambda _: self._watching.pop(key, None))

    async def _after_commit(self, app: AppConnection, wake: Callable[[], object]) -> None:
        pause = _COMMIT_POLL_FIRST
        waited = 0.0
        while waited < _COMMIT_WAIT_MAX and _in_transaction(app.raw):
            await asyncio.sleep(pause)
            waited += pause
            pause = min(pause * 2, _COMMIT_POLL_MAX)
        try:
            result = wake()
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:  # the workers' own polling finds the records
            logger.debug("could not wake the workers after a staging commit: %s", exc)


class _EveryService:
    """The routes' view of the bus with no service of its own (no service is
    named ""): every stored subscription is a route."""

    service = ""

    def __init__(self, core: BusCore) -> None:
        self._core = core

    @property
    def store(self) -> Store:
        return self._core.store


#: how much of an unreadable row a dead letter keeps
_RAW_KEPT = 64 * 1024


def _unreadable_row(
    row: OutboxRow, problem: str, now: datetime, what: str = "undecodable"
) -> DeadLetterItem:
    """A dead letter for an outbox row that holds no readable event (or one the
    store refuses: ``what`` is ``"rejected"``)."""
    record_id = delivery_id("", f"outbox-{row.id}-{row.staged_at.isoformat()}", "*", row.service)
    return DeadLetterItem(
        id=dead_letter_id_for(record_id),
        event_id="",
        event_type="unknown",
        event_data=None,
        event_source="",
        event_timestamp=row.staged_at,
        handler_name="*",
        error=problem,
        error_type="retrybus.RecordRejected"
        if what == "rejected"
        else "retrybus.UndecodableMessage",
        attempt=0,
        reason=f"{what} outbox row: {problem}",
        created_at=now,
        metadata={"raw_message": row.event[:_RAW_KEPT], "outbox_row": row.id},
        service=row.service,
    )


def _context(event: Event) -> str:
    return f"staged event {event.id} ({event.type})"


def _in_transaction(connection: object) -> bool:
    """Whether the caller still has a transaction open on ``connection`` (False
    once it cannot say: released to a pool, closed)."""
    try:
        probe = getattr(connection, "is_in_transaction", None)  # asyncpg
        if probe is None:
            probe = connection.in_transaction  # type: ignore[attr-defined]
        return bool(probe() if callable(probe) else probe)
    except Exception:
        return False
