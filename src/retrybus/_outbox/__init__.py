"""The transactional outbox: ``bus.outbox.stage`` in the caller's transaction,
and the relay that publishes what the outbox table holds."""

from .database import OutboxDatabase, OutboxDepth, open_outbox_database
from .relay import OutboxRelay
from .stage import Outbox, Staged

__all__ = [
    "Outbox",
    "OutboxDatabase",
    "OutboxDepth",
    "OutboxRelay",
    "Staged",
    "open_outbox_database",
]
