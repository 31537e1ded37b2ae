"""``OutboxRelay``: publish what was staged in an application database's
``retrybus_outbox`` table, then delete it.

Each turn claims a batch of rows (``OutboxDatabase.claim``: claim-and-delete,
never a "last id seen" mark), publishes them to the bus's carrier (one store
write of every pending delivery of the batch, or one broker message per event),
and deletes them only once that publish has returned. A relay that dies between
the two leaves the rows to the next claim: the events are published again,
which makes no second record of a delivery still pending (its id is derived from
the event) and is what the inbox is for otherwise. It wakes every
``poll_interval`` seconds, at once after a staging commit in its own process,
and straight away again while batches come back full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from .._errors import StoreUnavailable
from .database import OutboxDatabase, OutboxDepth, open_outbox_database

if TYPE_CHECKING:
    from .stage import Outbox

__all__ = ["OutboxRelay"]

logger = logging.getLogger("retrybus.outbox")

_LONGEST_PAUSE = 10.0


class OutboxRelay:
    """Moves staged events from one outbox table to the bus (``bus.outbox.relay()``)."""

    def __init__(
        self,
        outbox: Outbox,
        database: OutboxDatabase | str,
        *,
        poll_interval: float = 0.1,
        batch: int = 500,
        lease: float = 30.0,
    ) -> None:
        if isinstance(poll_interval, bool) or not 0 < poll_interval < float("inf"):
            raise ValueError(
                f"poll_interval must be a number of seconds > 0, got {poll_interval!r}"
            )
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if isinstance(lease, bool) or not 0 < lease < float("inf"):
            raise ValueError(f"lease must be a number of seconds > 0, got {lease!r}")
        self._outbox = outbox
        self.database = open_outbox_database(database) if isinstance(database, str) else database
        self.poll_interval = float(poll_interval)
        self.batch = batch
        self.lease = float(lease)
        #: staged events published since the relay started
        self.relayed = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._failing = False

    async def relay_once(self) -> int:
        """Claim one batch, publish it, delete it; how many rows it relayed.
        Raises ``StoreUnavailable`` when the outbox database or the bus's
        carrier cannot be reached (the rows stay for the next turn)."""
        now = self._outbox.now()
        async with self.database.claim(self.batch, self.lease, now) as rows:
            if rows:
                await self._outbox.publish_staged(rows)
        self.relayed += len(rows)
        return len(rows)

    async def depth(self) -> OutboxDepth:
        """The rows waiting in the table, and the oldest's staging time."""
        return await self.database.depth()

    async def run(self) -> None:
        """Relay until ``stop()``: a full batch goes on at once, otherwise it
        waits for ``poll_interval`` or a staging commit in this process. An
        unreachable database or carrier is logged once and tried again."""
        stop_hearing = self._outbox.on_staged(self._wake.set)
        pause = self.poll_interval
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    relayed = await self.relay_once()
                except Exception as exc:  # StoreUnavailable, or a bug: never stop relaying
                    if not self._failing:
                        logger.warning(
                            "outbox relay cannot relay now, it keeps trying: %s",
                            exc,
                            exc_info=not isinstance(exc, StoreUnavailable),
                        )
                    self._failing = True
                    pause = min(max(pause * 2, 0.5), _LONGEST_PAUSE)
                    await self._sleep(pause)
                    continue
                if self._failing:
                    logger.info("outbox relay relays again from %s", self.database.url)
                    self._failing = False
                pause = self.poll_interval
                if relayed < self.batch:
                    await self._sleep(self.poll_interval)
        finally:
            stop_hearing()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def stop(self) -> None:
        """Let ``run()`` return after the turn it is in (at once when it has not
        begun: a relay runs once)."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        """Release the relay's connections to the outbox database."""
        await self.database.close()
