"""How many times a client may fail to log in: ``LIMIT`` failed attempts per
``WINDOW`` seconds per client address, counted in memory by each process. A
successful log-in clears the client's count."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

__all__ = ["LIMIT", "WINDOW", "LoginLimiter"]

LIMIT = 10
WINDOW = 60.0
# past this many clients, those with no attempt inside the window are forgotten
MAX_CLIENTS = 10_000


class LoginLimiter:
    """Failed log-ins per client within a sliding window."""

    def __init__(
        self, now: Callable[[], float], *, limit: int = LIMIT, window: float = WINDOW
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        if not window > 0:
            raise ValueError(f"window must be a positive number of seconds, got {window!r}")
        self._now = now
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> int | None:
        """None when ``client`` may try to log in now; else in how many whole
        seconds it may try again."""
        failures = self._recent(client)
        if failures is None or len(failures) < self.limit:
            return None
        return max(1, math.ceil(failures[0] + self.window - self._now()))

    def failed(self, client: str) -> None:
        """Count a failed attempt of ``client``."""
        if client not in self._failures and len(self._failures) >= MAX_CLIENTS:
            self._forget_idle()
        failures = self._failures.setdefault(client, deque(maxlen=self.limit))
        failures.append(self._now())

    def succeeded(self, client: str) -> None:
        """A successful log-in: the client's failures no longer count."""
        self._failures.pop(client, None)

    def _recent(self, client: str) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        start = self._now() - self.window
        while failures and failures[0] <= start:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures

    def _forget_idle(self) -> None:
        for client in list(self._failures):
            self._recent(client)
