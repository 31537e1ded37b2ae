"""The PostgreSQL store (``postgresql://user@host:5432/db?schema=NAME``), on asyncpg.

Both queues live in one schema (``public`` unless ``?schema=`` names another).
The tables are created by a versioned migration on first use (or by
``retrybus migrate``), serialised between processes by an advisory lock.
Claiming uses ``FOR UPDATE SKIP LOCKED``, so concurrent workers on any number
of machines never receive the same item, and writes that add or release work
``NOTIFY`` the workers that ``watch`` the schema.

Dead letters are filtered, counted and grouped by the server (a ``DeadLetterFilter``
is one prepared statement with a nullable parameter per field). Their failure group
is computed in Python when a dead letter is written and kept in an indexed column;
version 2 of the schema added it and back-filled existing rows. Control records are
rows of ``retrybus_control``, written with compare-and-set in one statement.
Version 4 added ``retry_queue.claims`` (how many claims a record has had since its
last outcome; existing rows read 0) and put ``next_retry`` into the handler_name
index, for workers that claim only their own handlers' items. Version 5 dropped
the index of leased items (and the ``next_retry`` index, which ``(next_retry,
attempt)`` covers) and set a fillfactor, so that claims, lease extensions and
releases, which write no indexed column, are HOT updates. Version 6 keeps services
(issue 12): each record's ``service`` (existing rows read "default"), the
handler index led by it (``(service, handler_name, next_retry)``: a worker's
claims read only its service's handlers' items), a dead-letter index by service,
and the tables ``retrybus_subscriptions``, ``retrybus_revisions`` (the
subscriptions' revision) and ``retrybus_workers`` (heartbeats).

URL options: ``schema`` (default public), ``pool_min``/``pool_max`` (connections,
1/10), ``connect_timeout`` (seconds, 10), ``synchronous_commit`` (the server's
setting by default, which waits for the WAL to reach the disk; ``off`` makes a
commit several times faster on slow disks at the risk of losing the last
commits, never consistency, if the server crashes), and libpq's ``sslmode``,
``sslrootcert``, ``sslcert``, ``sslkey`` and ``application_name``.

The package: ``store`` (the class: pool, errors, LISTEN/NOTIFY, the hot half of
the protocol), ``admin`` (the admin half, a mixin of the store), ``services``
(the services part, another mixin), ``migrate`` (the versioned migration),
``codec`` (records as columns and back), ``sql`` (the queries of ``queries.sql``
and the helpers all of them share).
"""

from __future__ import annotations

from .migrate import SCHEMA_VERSION
from .sql import Q
from .store import PostgresStore

__all__ = ["SCHEMA_VERSION", "PostgresStore", "Q"]
