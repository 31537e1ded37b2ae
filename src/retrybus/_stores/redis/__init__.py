"""The Redis store (``redis://host:6379/0``): both queues in a Redis server, for many
workers on many machines.

Every write is one Lua script (``scripts.lua``), so each is atomic and one round trip:
claiming a batch, completing a batch, moving to the dead letter queue, requeueing,
expiring and cleaning up. Records are JSON strings in hashes keyed by id; sorted sets
index them by time (see the top of ``scripts.lua`` for every key). All times come from
the caller's ``now`` (never the server's clock), and nothing is ever expired by Redis:
retention is ``cleanup`` only.

Retry items (and pending first deliveries) are in one due set per lane (a handler of a
service), by the time each can be claimed: a worker's claim reads the front of its
service's handlers' sets only, however many items of other handlers or services are
due before them. Dead letters are indexed per value of each field one filters by
(event type, handler, reason, failure group, service, processed; event id), which the
dead letter queries walk (see ``admin``). Each service's subscriptions and its
workers' heartbeats are kept too (``services``). The key layout has a version
(``P:schema``, ``LAYOUT_VERSION``): what an older one wrote gets the indexes it lacked
on first use (``migrate``).

Options: ``?prefix=NAME`` (default ``retrybus``) puts every key under ``NAME:``, so
several buses share one database.

The modules: ``store`` (``RedisStore``: the client, the scripts, errors, the watch and
the hot half of the protocol), ``admin`` (the admin half, which it inherits),
``services`` (the services half, likewise), ``migrate`` (the layout upgrade),
``codec`` (records, lanes, index entries and scores) and ``common`` (what they share).
"""

from __future__ import annotations

from .migrate import LAYOUT_VERSION
from .store import RedisStore

__all__ = ["LAYOUT_VERSION", "RedisStore"]
