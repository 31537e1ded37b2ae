"""A handler's per-process concurrency limit (``max_concurrency``): at most N of
its calls at once in this process, whoever makes them (publish, a worker, a
reprocess)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

__all__ = ["ConcurrencyLimit", "check_max_concurrency"]


def check_max_concurrency(value: int | None) -> int | None:
    """``max_concurrency``: an int >= 1, or None for no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_concurrency must be an int >= 1 or None, got {value!r}")
    return value


class ConcurrencyLimit:
    """At most ``limit`` holders at once; the others wait in line (first come,
    first served). Not bound to an event loop (a bus may outlive one).

    The hot path is ``try_enter()`` (no coroutine when a slot is free), then
    ``await wait_enter()`` only when it says no, and ``leave()`` after the call.
    """

    __slots__ = ("_waiters", "limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: holders now
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        """Slots free now."""
        return self.limit - self.running

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if self.running < self.limit and not self._waiters:
            self.running += 1
            return True
        return False

    async def wait_enter(self) -> None:
        """Wait in line for a slot (a leaving holder hands its slot over)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a slot just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        """Give the slot back: to the first in line, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
