"""Revoked dashboard sessions, kept in the bus's store so that every dashboard
process sharing the store agrees: logging out ends the session in every browser
its cookie was copied to.

A revocation is a control record ``dashboard-session-revoked:<session id>``
holding when the session would have ended anyway; records past that are
deleted whenever someone logs out. Page views read a cached answer (asked again
after ``FRESH_FOR`` seconds); a data-changing request asks the store every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .._stores import Store

__all__ = ["FRESH_FOR", "PREFIX", "Revocations"]

PREFIX = "dashboard-session-revoked:"
#: how long a page view trusts the last "not revoked" answer of the store
FRESH_FOR = 5.0
# past this many sessions checked, the oldest answers are forgotten (memory stays bounded)
MAX_CHECKED = 10_000


class Revocations:
    """Which sessions were revoked, by any dashboard on this store."""

    def __init__(
        self,
        store: Store,
        *,
        fresh_for: float = FRESH_FOR,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._fresh_for = fresh_for
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._revoked: dict[str, int] = {}  # session id -> when it would have ended
        self._checked: dict[str, float] = {}  # session id -> when the store said "not revoked"

    def known_revoked(self, session_id: str) -> bool:
        """Whether this process knows the session is revoked (no store read)."""
        return session_id in self._revoked

    async def refresh(self, session_id: str, *, fresh_for: float | None = None) -> bool:
        """Ask the store about the session unless the last answer is at most
        ``fresh_for`` seconds old (a revocation, once seen, is never asked again);
        returns whether it is revoked."""
        if session_id in self._revoked:
            return True
        limit = self._fresh_for if fresh_for is None else fresh_for
        checked = self._checked.get(session_id)
        if checked is not None and self._monotonic() - checked < limit:
            return False
        record = await self._store.get_control(PREFIX + session_id)
        if record is not None:
            self._remember(session_id, _expires(record.value))
            self._checked.pop(session_id, None)
            return True
        if len(self._checked) >= MAX_CHECKED:
            self._checked.clear()
        self._checked[session_id] = self._monotonic()
        return False

    async def is_revoked(self, session_id: str) -> bool:
        """Whether the session is revoked, as the store says now."""
        return await self.refresh(session_id, fresh_for=0.0)

    async def revoke(self, session_id: str, expires: int, name: str) -> None:
        """Revoke the session (token ``name``, ending at ``expires``) for every
        dashboard on the store, and delete revocations past their end."""
        await self._store.put_control(
            PREFIX + session_id, {"expires": expires, "name": name}, version=0
        )  # None: already revoked, by another tab or process
        self._remember(session_id, expires)
        self._checked.pop(session_id, None)
        await self.prune()

    async def prune(self) -> int:
        """Delete the revocations of sessions that have ended anyway; returns how many."""
        now = self._wall_clock()
        deleted = 0
        for record in await self._store.list_control(PREFIX):
            if _expires(record.value) <= now and await self._store.delete_control(record.key):
                deleted += 1
        for session_id, expires in list(self._revoked.items()):
            if expires <= now:
                del self._revoked[session_id]
        return deleted

    def _remember(self, session_id: str, expires: int) -> None:
        if len(self._revoked) >= MAX_CHECKED:
            now = self._wall_clock()
            self._revoked = {s: e for s, e in self._revoked.items() if e > now}
        self._revoked[session_id] = expires


def _expires(value: object) -> int:
    # a record this module did not write counts as revoked for good (never prune it blindly)
    found = value.get("expires") if isinstance(value, Mapping) else None
    return found if isinstance(found, int) else 2**62
