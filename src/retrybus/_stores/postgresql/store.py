"""The PostgreSQL store's class: its URL and pool, connection handling and error
mapping (``_run``), LISTEN/NOTIFY (``watch``), and the hot half of the protocol.

The hot half (``RetryStore``) is what publish and the workers use on every
delivery: record failures, claim, extend, release, complete, and the sweeps.
Every operation is one statement (so one round trip and one implicit
transaction) except ``expire_retry``; claiming is ``UPDATE … WHERE id =
ANY(ARRAY(SELECT … FOR UPDATE SKIP LOCKED)) RETURNING *``, so concurrent workers
on any number of machines never receive the same item, and each claim adds one to
the record's ``claims``. A worker claiming only its service's handlers' items
reads each handler's earliest from the ``(service, handler_name, next_retry)``
index (``claim_due_for`` in ``queries.sql``), never the other handlers' or the
other services' items due before them. Writes that
add or release work send a ``NOTIFY`` on a channel of the schema, in their
transaction; ``watch`` LISTENs on it so that an idle worker wakes at once.
A
durable publish's records, leased to the publisher, send none (``record_pending``
notifies only when it adds a deferred record). The admin half is the
``PostgresAdmin`` mixin (``admin.py``), the services part the ``PostgresServices``
mixin (``services.py``), the outbox's same-database staging the
``PostgresStaging`` mixin (``staging.py``); the pool runs the migration (``migrate.py``) when it opens.

Connection trouble (refused, lost, the server shutting down or restarting, too
many connections, a deadlock or serialisation failure) raises ``StoreUnavailable``
naming the URL without its password; the worker logs it and retries. Data the
server refuses (a character it cannot store, a value out of range or too large)
raises ``RecordRejected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import asyncpg  # type: ignore[import-untyped]

from ..._errors import RecordRejected, StoreUnavailable
from ..._outcomes import (
    CorruptRecord,
    Counters,
    DeadLettered,
    Outcome,
    Rescheduled,
    Succeeded,
    corrupt_to_dead_letter,
)
from ..._records import DeadLetterItem, RetryItem
from .._codec import decode_or_corrupt
from .._url import redact, split
from ..base import Store
from .admin import PostgresAdmin
from .codec import CODEC, dead_letter_columns, retry_columns
from .migrate import migrate_schema
from .services import PostgresServices
from .sql import Q, affected, aware, quote
from .staging import PostgresStaging

__all__ = ["PostgresStore"]

logger = logging.getLogger("retrybus.store.postgresql")


class _PoolReconnectWarnings(logging.Filter):
    """asyncpg's pool logs a warning with a traceback each time it fails to reopen
    a connection while the server is down: to stderr, through logging's last
    resort, even in an app that set up no logging. This filter drops those
    records and says it once per outage through retrybus's logger instead (the
    store's next successful query ends the outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.outage = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Failed to restore the pool connection floor"):
            return True
        if not self.outage:
            self.outage = True
            error = record.exc_info[1] if record.exc_info else None
            logger.warning(
                "PostgreSQL connection pool cannot reconnect; it keeps trying: %s",
                _one_line(error) if error is not None else "server unreachable",
            )
        return False


_POOL_WARNINGS = _PoolReconnectWarnings()
logging.getLogger("asyncpg.pool").addFilter(_POOL_WARNINGS)

T = TypeVar("T")
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_OPTIONS = {"schema", "pool_min", "pool_max", "connect_timeout", "synchronous_commit"}
_SYNCHRONOUS_COMMIT = {"on", "off", "local", "remote_write", "remote_apply"}
# passed through to asyncpg as they are
_LIBPQ_OPTIONS = {"sslmode", "sslrootcert", "sslcert", "sslkey", "application_name"}
_LISTEN_BACKOFF_MAX = 10.0

# errors that say the server is (for now) out of reach, or that the transaction
# lost a race and may simply be tried again
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError included
    asyncpg.exceptions.OperatorInterventionError,  # class 57: admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # class 40: deadlock, serialisation failure
    asyncpg.InterfaceError,  # "connection is closed", pool closing
    asyncpg.exceptions.InternalClientError,
)


# errors about what was sent, not about the server: trying again cannot help
_ABOUT_THE_DATA: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # class 22: a character PostgreSQL cannot store, a value out of range
    asyncpg.exceptions.ProgramLimitExceededError,  # class 54: too large
    UnicodeError,
)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _channel(schema: str) -> str:
    """The NOTIFY channel of a schema (a channel name has at most 63 bytes)."""
    name = f"retrybus_{schema}"
    if len(name) <= 63:
        return name
    return "retrybus_" + hashlib.sha256(schema.encode()).hexdigest()[:40]


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's default reset (``RESET ALL``,
    ``UNLISTEN *``, …: one more round trip per call). The store leaves no session
    state behind: no SET, no LISTEN on pooled connections (``watch`` has its own),
    advisory locks only per transaction; asyncpg still rolls back an open transaction."""


class PostgresStore(PostgresAdmin, PostgresServices, PostgresStaging, Store):
    """Both queues in a PostgreSQL schema, shared by any number of processes and
    machines, and what services keep there (``PostgresServices``)."""

    def __init__(
        self,
        dsn: str,
        *,
        url: str | None = None,
        schema: str = "public",
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        synchronous_commit: str | None = None,
    ) -> None:
        if synchronous_commit is not None and synchronous_commit not in _SYNCHRONOUS_COMMIT:
            raise ValueError(
                f"synchronous_commit must be one of {sorted(_SYNCHRONOUS_COMMIT)}, "
                f"got {synchronous_commit!r}"
            )
        if not _SCHEMA_NAME.match(schema) or schema.lower().startswith("pg_"):
            raise ValueError(
                "schema must be a plain identifier (letters, digits, _; at most 63; "
                f"not starting with pg_), got {schema!r}"
            )
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}"
            )
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self.url = redact(url or dsn)
        self.schema = schema
        self.channel = _channel(schema)
        self._dsn = dsn
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._synchronous_commit = synchronous_commit
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None
        self._watchers: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        parts = split(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"not a PostgreSQL store URL: {redact(url)!r}")
        if parts.fragment:
            raise ValueError(f"malformed PostgreSQL store URL {redact(url)!r}: no '#…' allowed")
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        options = dict(pairs)
        unknown = set(options) - _OPTIONS - _LIBPQ_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} in PostgreSQL store URL {redact(url)!r}: "
                f"use {sorted(_OPTIONS | _LIBPQ_OPTIONS)}"
            )
        database = parts.path.lstrip("/")
        if "/" in database:
            raise ValueError(
                f"malformed PostgreSQL store URL {redact(url)!r}: the path must be one database name"
            )
        try:
            pool_min = int(options.get("pool_min", "1"))
            pool_max = int(options.get("pool_max", "10"))
            connect_timeout = float(options.get("connect_timeout", "10"))
        except ValueError:
            raise ValueError(
                f"pool_min, pool_max and connect_timeout in {redact(url)!r} must be numbers"
            ) from None
        schema = options.get("schema", "public")
        passed = [(key, value) for key, value in pairs if key in _LIBPQ_OPTIONS]
        dsn = parts._replace(scheme="postgresql", query=urlencode(passed)).geturl()
        try:
            return cls(
                dsn,
                url=url,
                schema=schema,
                pool_min=pool_min,
                pool_max=pool_max,
                connect_timeout=connect_timeout,
                synchronous_commit=options.get("synchronous_commit"),
            )
        except ValueError as exc:
            raise ValueError(f"bad PostgreSQL store URL {redact(url)!r}: {exc}") from None

    # connection ------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        settings = {"search_path": quote(self.schema)}
        if "application_name=" not in self._dsn:
            settings["application_name"] = "retrybus"
        if self._synchronous_commit is not None:
            settings["synchronous_commit"] = self._synchronous_commit
        return settings

    async def connect(self) -> None:
        await self._get_pool()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                self._pool = await self._open()
        return self._pool

    async def _open(self) -> asyncpg.Pool:
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                timeout=self._connect_timeout,
                server_settings=self._server_settings(),
                reset=_keep_session,
            )
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL store {self.url}: {_one_line(exc)}"
            ) from None
        try:
            async with pool.acquire() as conn:
                await migrate_schema(conn, schema=self.schema, url=self.url)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, (*_TRANSIENT, asyncpg.PostgresError)):
                raise StoreUnavailable(
                    f"cannot prepare PostgreSQL store {self.url}: {_one_line(exc)}"
                ) from None
            raise
        return pool

    async def close(self) -> None:
        watchers, self._watchers = self._watchers, set()
        for task in watchers:
            task.cancel()
        for task in watchers:
            with contextlib.suppress(BaseException):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except Exception:
                pool.terminate()

    async def health(self) -> None:
        await self._run(lambda conn: conn.fetchval("SELECT 1"))

    async def _run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``operation`` on a pooled connection, turning connection trouble into
        ``StoreUnavailable`` and data the server refuses into ``RecordRejected``."""
        pool = await self._get_pool()
        try:
            async with pool.acquire() as conn:
                result = await operation(conn)
        except asyncpg.IntegrityConstraintViolationError:
            raise  # a duplicate id: the caller's mistake, not the store's
        except _ABOUT_THE_DATA as exc:
            raise RecordRejected(
                f"PostgreSQL store {self.url} refused the data: {_one_line(exc)}"
            ) from exc
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"PostgreSQL store {self.url} failed: {_one_line(exc)}") from exc
        _POOL_WARNINGS.outage = False
        return result

    # watching --------------------------------------------------------------

    async def _listen(self, on_change: Callable[[], None]) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn, timeout=self._connect_timeout, server_settings=self._server_settings()
        )
        try:
            await conn.add_listener(self.channel, lambda *_: on_change())
        except BaseException:
            conn.terminate()
            raise
        return conn

    @staticmethod
    async def _until_lost(conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        if conn.is_closed():
            lost.set()
        await lost.wait()

    async def watch(self, on_change: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """LISTEN on the schema's channel on a connection of its own; when that
        connection is lost, reconnect with backoff (and call ``on_change`` once,
        for what may have been missed)."""
        try:
            first = await self._listen(on_change)
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(
                f"cannot listen on PostgreSQL store {self.url}: {_one_line(exc)}"
            ) from None

        async def keep_listening() -> None:
            conn: asyncpg.Connection | None = first
            pause = 0.5
            try:
                while True:
                    if conn is None:
                        try:
                            conn = await self._listen(on_change)
                        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
                            # once per outage; the worker says the rest
                            log = logger.warning if pause == 0.5 else logger.debug
                            log(
                                "cannot listen on %s, trying again with backoff: %s",
                                self.url,
                                _one_line(exc),
                            )
                            await asyncio.sleep(pause)
                            pause = min(pause * 2, _LISTEN_BACKOFF_MAX)
                            continue
                        if pause > 0.5:
                            logger.info("listening on %s again", self.url)
                        pause = 0.5
                        on_change()
                    await self._until_lost(conn)
                    conn = None
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2.0)
                    if not conn.is_closed():
                        conn.terminate()

        task = asyncio.create_task(keep_listening(), name=f"retrybus-listen-{self.channel}")
        self._watchers.add(task)

        async def stop() -> None:
            self._watchers.discard(task)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return stop

    # retry queue -----------------------------------------------------------

    async def record_failures(
        self, retry_items: Sequence[RetryItem], dead_letters: Sequence[DeadLetterItem]
    ) -> None:
        if not retry_items and not dead_letters:
            return
        if not dead_letters:
            args = [*retry_columns(retry_items), self.channel]
            await self._run(lambda conn: conn.fetchrow(Q["record_retries"], *args))
        elif not retry_items:
            dead = dead_letter_columns(dead_letters)
            await self._run(lambda conn: conn.execute(Q["insert_dead"], *dead))
        else:
            args = [*retry_columns(retry_items), *dead_letter_columns(dead_letters), self.channel]
            await self._run(lambda conn: conn.fetchrow(Q["record_failures"], *args))

    async def record_pending(self, items: Sequence[RetryItem]) -> set[str]:
        """One statement for the whole batch: an insert from one array per column,
        skipping ids already stored; it notifies the workers only when it added a
        record without a lease (a deferred one), in the same transaction."""
        if not items:
            return set()
        args = [*retry_columns(items), self.channel]
        row = await self._run(lambda conn: conn.fetchrow(Q["record_pending"], *args))
        assert row is not None
        added: list[str] | None = row["added"]
        return set(added or ())

    async def claim_due(
        self,
        *,
        now: datetime,
        limit: int,
        owner: str,
        lease_until: datetime,
        service: str | None = None,
        handlers: Collection[str] | None = None,
    ) -> list[RetryItem | CorruptRecord]:
        """Without ``handlers``, the earliest due items of any handler (of
        ``service``); with them, claim_due_for: each handler's earliest from the
        (service, handler_name, next_retry) index, so that other handlers' and
        other services' items due before them are never read (for any service,
        claim_due_for_any_service: the same for each service the queue holds)."""
        if handlers is None:
            args: tuple[Any, ...] = (owner, aware(lease_until), aware(now), limit)
            if service is None:
                query = Q["claim_due"]
            else:
                query = Q["claim_due_of_service"]
                args = (*args, service)
        else:
            names = sorted(set(handlers))
            if not names or limit <= 0:
                return []
            args = (owner, aware(lease_until), aware(now), limit, names)
            if service is None:
                query = Q["claim_due_for_any_service"]
            else:
                query = Q["claim_due_for"]
                args = (*args, service)
        rows = await self._run(lambda conn: conn.fetch(query, *args))
        rows.sort(key=lambda row: (row["next_retry"], row["id"]))
        return [decode_or_corrupt(row, CODEC.retry_item) for row in rows]

    async def extend_leases(self, ids: Sequence[str], owner: str, lease_until: datetime) -> int:
        if not ids:
            return 0
        args = (aware(lease_until), owner, list(ids))
        return affected(await self._run(lambda conn: conn.execute(Q["extend_leases"], *args)))

    async def release(self, ids: Sequence[str], owner: str) -> int:
        if not ids:
            return 0
        args = (owner, list(ids), self.channel)
        row = await self._run(lambda conn: conn.fetchrow(Q["release"], *args))
        assert row is not None
        return int(row[0])

    async def complete(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> set[str]:
        if not outcomes:
            return set()
        args = self._completion_args(outcomes, owner, now)
        rows = await self._run(lambda conn: conn.fetch(Q["complete"], *args))
        return {row[0] for row in rows if row[0] is not None}

    def _completion_args(
        self, outcomes: Sequence[Outcome], owner: str | None, now: datetime
    ) -> list[Any]:
        """The parameters of the ``complete`` query for ``outcomes``."""
        succeeded = [o.item.id for o in outcomes if isinstance(o, Succeeded)]
        rescheduled: list[list[Any]] = [[] for _ in range(9)]
        dead_ids: list[str] = []
        dead_first: list[bool] = []
        dead_letters: list[DeadLetterItem] = []
        for outcome in outcomes:
            if isinstance(outcome, Rescheduled):
                item = outcome.item
                row = (
                    item.id,
                    item.attempt,
                    CODEC.write_time(item.next_retry),
                    item.error,
                    item.error_type,
                    item.traceback,
                    CODEC.write_time(item.updated_at),
                    CODEC.write_json(dict(item.metadata)),
                    outcome.first_delivery,
                )
                for column, value in zip(rescheduled, row, strict=True):
                    column.append(value)
            elif isinstance(outcome, DeadLettered):
                dead_ids.append(outcome.item_id)
                dead_first.append(outcome.first_delivery)
                dead_letters.append(outcome.dead_letter)
        return [
            owner,
            aware(now),
            self.channel,
            succeeded,
            *rescheduled,
            dead_ids,
            dead_first,
            *dead_letter_columns(dead_letters),
        ]

    async def complete_remembering(
        self,
        outcomes: Sequence[Outcome],
        owner: str | None,
        now: datetime,
        remember: Sequence[str],
        until: datetime,
    ) -> set[str]:
        if not remember or not outcomes:
            return await super().complete_remembering(outcomes, owner, now, remember, until)
        args = self._completion_args(outcomes, owner, now)
        remembered = (list(dict.fromkeys(remember)), aware(until))

        async def run(conn: asyncpg.Connection) -> set[str]:
            async with conn.transaction():  # one commit for both
                await conn.execute(Q["remember_successes"], *remembered)
                rows = await conn.fetch(Q["complete"], *args)
            return {row[0] for row in rows if row[0] is not None}

        return await self._run(run)

    async def next_due(
        self, handlers: Collection[str] | None = None, *, service: str | None = None
    ) -> datetime | None:
        query = Q["next_due"] if service is None else Q["next_due_of_service"]
        args: tuple[Any, ...] = () if service is None else (service,)
        if handlers is not None:
            names = sorted(set(handlers))
            if not names:
                return None
            if service is None:
                query = Q["next_due_for_any_service"]
                args = (names,)
            else:
                query = Q["next_due_for"]
                args = (names, service)
        due: datetime | None = await self._run(lambda conn: conn.fetchval(query, *args))
        return due

    async def expire_retry(
        self, *, before: datetime, now: datetime, reason: str
    ) -> list[DeadLetterItem]:
        args = (aware(before), aware(now))

        async def run(conn: asyncpg.Connection) -> list[DeadLetterItem]:
            moved: list[DeadLetterItem] = []
            async with conn.transaction():
                while True:
                    rows = await conn.fetch(Q["take_expired"], *args)
                    if not rows:
                        break
                    batch: list[DeadLetterItem] = []
                    for row in rows:
                        record = decode_or_corrupt(row, CODEC.retry_item)
                        batch.append(
                            corrupt_to_dead_letter(record, now, reason)
                            if isinstance(record, CorruptRecord)
                            else record.to_dead_letter(
                                # a pending record (attempt 0) made no retry
                                reason=reason,
                                now=now,
                                attempt=max(record.attempt - 1, 0),
                            )
                        )
                    await conn.execute(Q["insert_dead"], *dead_letter_columns(batch))
                    moved.extend(batch)
                if moved:
                    await conn.execute(Q["add_dead_lettered"], len(moved))
            return moved

        return await self._run(run)

    async def cleanup_dead(self, before: datetime) -> int:
        at = aware(before)
        return affected(await self._run(lambda conn: conn.execute(Q["cleanup_dead"], at)))

    async def remember_successes(self, ids: Sequence[str], until: datetime) -> None:
        if not ids:
            return
        args = (list(dict.fromkeys(ids)), aware(until))
        await self._run(lambda conn: conn.execute(Q["remember_successes"], *args))

    async def remembered(self, ids: Collection[str], now: datetime) -> set[str]:
        if not ids:
            return set()
        args = (list(ids), aware(now))
        rows = await self._run(lambda conn: conn.fetch(Q["remembered"], *args))
        return {row[0] for row in rows}

    async def forget_successes(self, before: datetime) -> int:
        at = aware(before)
        return affected(await self._run(lambda conn: conn.execute(Q["forget_successes"], at)))

    async def counters(self) -> Counters:
        row = await self._run(lambda conn: conn.fetchrow(Q["counters"]))
        if row is None:
            return Counters()
        return Counters(**{name: int(row[name]) for name in Counters.__dataclass_fields__})
