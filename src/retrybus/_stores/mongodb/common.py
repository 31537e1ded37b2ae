"""What the MongoDB store's modules share: the collection names and the types of
documents and sessions."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

__all__ = [
    "CONTROL",
    "COUNTERS",
    "DEAD",
    "INBOX",
    "LAYOUT",
    "RETRY",
    "REVISION",
    "SUBSCRIPTIONS",
    "WORKERS",
    "Doc",
    "Session",
]

RETRY = "retry_queue"
DEAD = "dead_letter_queue"
COUNTERS = "retrybus_counters"
CONTROL = "retrybus_control"
#: the inbox's remembered successes: ``_id`` the delivery id, ``until`` (a BSON
#: date, for the TTL index) and ``until_at`` (microseconds since the epoch, exact)
INBOX = "retrybus_inbox_successes"
#: one document, ``{_id: "layout", version: n}``: the layout version (``migrate``)
LAYOUT = "retrybus_layout"
#: the stored subscriptions: ``_id`` ``"SERVICE/HANDLER"`` (a service name holds no ``/``)
SUBSCRIPTIONS = "retrybus_subscriptions"
#: the workers' heartbeats: ``_id`` the worker's name
WORKERS = "retrybus_workers"
#: the ``_id`` of the subscriptions' revision in ``LAYOUT`` (``{_id, revision}``)
REVISION = "subscriptions"

Doc = dict[str, Any]
#: the transaction an operation runs in (None: the server has no transactions)
Session = AsyncClientSession | None
