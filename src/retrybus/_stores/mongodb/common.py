"""What the MongoDB store's modules share: the collection names and the types of
documents and sessions."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

__all__ = ["CONTROL", "COUNTERS", "DEAD", "RETRY", "Doc", "Session"]

RETRY = "retry_queue"
DEAD = "dead_letter_queue"
COUNTERS = "retrybus_counters"
CONTROL = "retrybus_control"

Doc = dict[str, Any]
#: the transaction an operation runs in (None: the server has no transactions)
Session = AsyncClientSession | None
