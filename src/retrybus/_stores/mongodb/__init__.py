"""The MongoDB store (``mongodb://host:27017/dbname``), on pymongo's native async client.

The engine's modules:

- ``store``: ``MongoStore``, its client, transactions (or, without them, moves in
  an order that loses nothing; the atomicity rules are documented there), error
  mapping, the hot half of the protocol (publish, the workers, the sweeps) and
  ``watch`` (a change stream, where the server has them);
- ``admin``: the admin half (browsing, grouping, requeueing, control records), a
  mixin that ``MongoStore`` inherits;
- ``services``: the services part (issue 12: stored subscriptions and their
  revision, workers' heartbeats, what waits per service and handler), a mixin
  likewise;
- ``migrate``: the collections and indexes, set up on connect, the layout's
  upgrade (``LAYOUT_VERSION``: retry items count their claims; every record has
  a service) and the back-fill of failure groups;
- ``codec``: records as documents and back (times to the microsecond, JSON values
  that BSON cannot hold), on the record codec the engines share;
- ``queries``: query documents (exact time comparisons, dead letter filters) and
  the grouping pipelines;
- ``common``: the collection names and the document and session types.
"""

from __future__ import annotations

from .store import MongoStore

__all__ = ["MongoStore"]
