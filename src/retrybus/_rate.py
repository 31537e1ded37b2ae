"""Rate limits, the pure part: a handler's rate (``Rate``, parsed from text such
as ``"200/s"``), the token bucket's arithmetic every store applies to its shared
record, and the tokens a process was granted but has not used yet
(``TokenAllowance``).

The bucket of a handler is shared by every process of its service (one record
in the store, ``rate:<service>:<handler>``): it holds up to ``burst`` tokens,
refills at ``per_second`` tokens a second, and each call of the handler spends
one. Nothing here reads a store (see ``Store.take_tokens``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Rate",
    "TokenAllowance",
    "bucket_key",
    "parse_rate",
    "take_from_bucket",
]

PREFIX = "rate:"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*")


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` calls every ``per_seconds`` seconds, across every worker of the
    service, with up to ``burst`` calls at once after a quiet spell (default: one
    second's worth, at least 1, as Guava's ``SmoothBursty`` does).

    >>> Rate(200, 1)            # the same as "200/s"
    >>> Rate(10, 60, burst=1)   # "10/m", never two calls closer than 6 s
    """

    count: float
    per_seconds: float = 1.0
    burst: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "count", _positive("a rate's count", self.count))
        object.__setattr__(self, "per_seconds", _positive("a rate's per_seconds", self.per_seconds))
        if self.burst is not None:
            burst = _positive("a rate's burst", self.burst)
            if burst < 1:
                raise ValueError(f"a rate's burst must be at least 1 call, got {self.burst!r}")
            object.__setattr__(self, "burst", burst)

    @property
    def per_second(self) -> float:
        """Tokens the bucket gains a second."""
        return self.count / self.per_seconds

    @property
    def capacity(self) -> float:
        """Tokens the bucket holds at most (``burst``, else one second's worth, at least 1)."""
        return self.burst if self.burst is not None else max(1.0, self.per_second)

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.per_seconds)
        text = f"{self.count:g}/{unit}" if unit else f"{self.count:g} per {self.per_seconds:g}s"
        return text if self.burst is None else f"{text} (burst {self.burst:g})"


def parse_rate(value: str | Rate) -> Rate:
    """A ``Rate`` from ``"N/s"``, ``"N/m"`` or ``"N/h"`` (N > 0, a whole or decimal
    number), or the ``Rate`` given; ``ValueError`` naming anything else."""
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise TypeError(f'rate must be text such as "200/s" or a Rate, got {value!r}')
    found = _TEXT.fullmatch(value)
    if found is None:
        raise ValueError(
            f'rate must be "N/s", "N/m" or "N/h" (calls a second, minute or hour), got {value!r}'
        )
    count = float(found.group(1))
    if count <= 0:
        raise ValueError(f"a rate must allow more than 0 calls, got {value!r}")
    return Rate(count, _UNITS[found.group(2)])


def bucket_key(service: str, handler: str) -> str:
    """The control record that holds ``handler``'s token bucket in ``service``."""
    return f"{PREFIX}{service}:{handler}"


def check_take(want: int, rate: float, burst: float) -> None:
    """Refuse (``ValueError``) what no bucket can answer."""
    if isinstance(want, bool) or not isinstance(want, int) or want < 0:
        raise ValueError(f"want must be an int >= 0, got {want!r}")
    _positive("rate", rate)
    if _positive("burst", burst) < 1:
        raise ValueError(f"burst must be at least 1, got {burst!r}")


def take_from_bucket(
    stored: Mapping[str, Any] | None, *, want: int, rate: float, burst: float, now: float
) -> tuple[int, dict[str, float]]:
    """Take up to ``want`` whole tokens from the bucket ``stored`` (``{"tokens",
    "at"}``, ``at`` in epoch seconds; None or unreadable: a full bucket) refilled
    at ``rate`` a second up to ``burst`` since ``at``: how many were granted, and
    the bucket to store. A ``now`` before ``at`` (another process's clock ahead of
    this one's) refills nothing and keeps ``at``, so that clocks apart never mint
    tokens."""
    tokens, at = burst, now
    if stored is not None:
        known_tokens, known_at = stored.get("tokens"), stored.get("at")
        if isinstance(known_tokens, int | float) and isinstance(known_at, int | float):
            tokens, at = float(known_tokens), float(known_at)
            if now > at:
                tokens, at = tokens + (now - at) * rate, now
            tokens = min(tokens, burst)
    granted = max(0, min(want, math.floor(tokens)))
    return granted, {"tokens": tokens - granted, "at": at}


class TokenAllowance:
    """Tokens this process took from a shared bucket and has not spent yet, good
    until ``until`` (a ``time.monotonic()`` reading): what a worker took for a
    claim that found fewer records than tokens, kept briefly for its next claim
    rather than given back (one store round trip saved; unused ones lapse, which
    only ever lowers the rate)."""

    __slots__ = ("tokens", "until")

    def __init__(self) -> None:
        self.tokens = 0
        self.until = 0.0

    def add(self, count: int, until: float) -> None:
        """Keep ``count`` more tokens, all good until ``until``."""
        if count > 0:
            self.tokens += count
            self.until = until

    def take(self, want: int, now: float) -> int:
        """Spend up to ``want`` of the tokens still good at ``now``; how many."""
        if now >= self.until:
            self.tokens = 0
            return 0
        taken = min(want, self.tokens)
        self.tokens -= taken
        return taken
