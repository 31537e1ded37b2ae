"""The leases a process holds on the records of its durable publishes while
their handlers run: extended every third of the lease, as a worker's heartbeat
extends its batch's, so that a handler running longer than ``publish_lease``
is not taken over by a worker (handled twice at once)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._errors import StoreUnavailable

if TYPE_CHECKING:
    from ._stores.base import Store

__all__ = ["PublishLeases"]

logger = logging.getLogger("retrybus")


class PublishLeases:
    """Records this process's publishes hold, and the task that keeps their leases."""

    def __init__(
        self,
        store: Callable[[], Store],
        now: Callable[[], datetime],
        owner: str,
        lease: Callable[[], float],
    ) -> None:
        self._store = store
        self._now = now
        self._owner = owner
        self._lease = lease
        # how many running publishes hold each record
        self._held: dict[str, int] = {}
        self._keeper: asyncio.Task[None] | None = None

    @property
    def held(self) -> list[str]:
        """The ids of the records whose handlers are running here."""
        return list(self._held)

    def hold(self, ids: Iterable[str]) -> None:
        """Keep these records' leases until ``drop``."""
        held = self._held
        for record_id in ids:
            held[record_id] = held.get(record_id, 0) + 1
        if self._keeper is None and held:
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep(), name="retrybus-publish-leases"
            )

    def drop(self, ids: Iterable[str]) -> None:
        """Their handlers are done: stop extending these leases."""
        held = self._held
        for record_id in ids:
            count = held.get(record_id, 0) - 1
            if count > 0:
                held[record_id] = count
            else:
                held.pop(record_id, None)

    async def _keep(self) -> None:
        try:
            while self._held:
                interval = self._lease() / 3
                await asyncio.sleep(interval)
                ids = self.held
                if not ids:
                    break
                until = self._now() + timedelta(seconds=self._lease())
                try:
                    await asyncio.wait_for(
                        self._store().extend_leases(ids, self._owner, until), interval
                    )
                except (StoreUnavailable, TimeoutError) as exc:
                    logger.warning(
                        "could not extend the leases of %d running publish handler(s): %s",
                        len(ids),
                        exc or "timed out",
                    )
        finally:
            self._keeper = None
