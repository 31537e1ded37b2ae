"""The idempotent inbox: ``bus.inbox.claim`` in a handler's own transaction."""

from .claim import Claim, Inbox
from .table import TABLE, create_table, table_exists

__all__ = ["TABLE", "Claim", "Inbox", "create_table", "table_exists"]
