"""What a worker claims of its rate-limited and concurrency-limited handlers
(``rate=``, ``max_concurrency=``): each such handler is claimed on its own, no
more records than its free slots in this process and the tokens its shared
bucket grants, so that a claimed record never waits for its handler.

A handler whose bucket came up short is held back (left out of claims and of
the worker's wake-up time) until tokens are due again; one at its concurrency
limit until a call of it ends (a lane that frees wakes the worker).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._handlers import Subscription
from ._rate import Rate, TokenAllowance, bucket_key
from ._records import RetryItem

if TYPE_CHECKING:
    from ._core import BusCore

__all__ = ["HORIZON", "ClaimFlow", "shortfall_wait", "tokens_wanted"]

#: seconds of calls a worker takes tokens for at a time: enough that a take is not
#: one store round trip per call, little enough that takers share the rate evenly
HORIZON = 0.1

#: claims ``limit`` due records of ``handlers`` for this worker
Claim = Callable[[int, list[str]], Awaitable[list[RetryItem]]]


def tokens_wanted(rate: Rate) -> int:
    """Tokens a worker asks for at a time: ``HORIZON`` seconds of calls, at least 1."""
    return max(1, math.ceil(rate.per_second * HORIZON))


def shortfall_wait(rate: Rate) -> float:
    """Seconds a worker leaves a bucket that came up short: until a token is due
    (``1 / rate``), or ``HORIZON`` when tokens come faster, but never longer than
    the bucket takes to fill (tokens past its burst would be lost)."""
    per_second = rate.per_second
    return max(1.0 / per_second, min(HORIZON, rate.capacity / per_second))


@dataclass(slots=True)
class _Bucket:
    """What this worker knows of one handler's shared bucket."""

    allowance: TokenAllowance = field(default_factory=TokenAllowance)
    #: none taken before this (the bucket came up short)
    held_until: datetime | None = None


class ClaimFlow:
    """A worker's claims of its limited handlers (see the module)."""

    def __init__(self, core: BusCore) -> None:
        self._core = core
        self._buckets: dict[str, _Bucket] = {}

    @property
    def active(self) -> bool:
        """Whether any handler of the bus has a rate or a concurrency limit."""
        return self._core.registry.limited > 0

    def split(self, names: Iterable[str]) -> tuple[list[str], list[Subscription]]:
        """Of ``names``, those claimed together (no limit) and the subscriptions
        of those claimed on their own."""
        plain: list[str] = []
        limited: list[Subscription] = []
        subscription_of = self._core.registry.get
        for name in names:
            subscription = subscription_of(name)
            if subscription is None or (subscription.rate is None and subscription.gate is None):
                plain.append(name)
            else:
                limited.append(subscription)
        return plain, limited

    async def claim(
        self,
        claim: Claim,
        limited: Iterable[Subscription],
        room: int,
        waiting: Callable[[], Mapping[str, int]],
    ) -> list[RetryItem]:
        """Claim, with ``claim``, each of the ``limited`` handlers' due records it
        may run now: up to ``room`` in all, each no more than its free slots
        (``waiting``: this worker's claimed records no lane has started yet, by
        handler) and the tokens it holds or its bucket grants."""
        core = self._core
        items: list[RetryItem] = []
        queued: Mapping[str, int] | None = None
        for subscription in limited:
            if room <= 0:
                break
            name, want = subscription.name, room
            gate = subscription.gate
            if gate is not None:
                if queued is None:
                    queued = waiting()
                want = min(want, gate.free - queued.get(name, 0))
                if want <= 0:
                    continue
            rate = subscription.rate
            bucket = None
            if rate is not None:
                bucket = self._buckets.setdefault(name, _Bucket())
                want = await self._take(name, rate, bucket, min(want, tokens_wanted(rate)))
                if want <= 0:
                    continue
            claimed = await claim(want, [name])
            if bucket is not None and len(claimed) < want:
                # fewer due records than tokens: kept for the next claim, briefly
                bucket.allowance.add(want - len(claimed), core.clock.now().timestamp() + HORIZON)
            items += claimed
            room -= len(claimed)
        return items

    async def _take(self, name: str, rate: Rate, bucket: _Bucket, want: int) -> int:
        """Up to ``want`` tokens of ``name``'s: those this worker holds, then the
        shared bucket's; a bucket that comes up short holds the handler back."""
        core = self._core
        now = core.clock.now()
        granted = bucket.allowance.take(want, now.timestamp())
        if granted == want:
            return granted
        if bucket.held_until is not None and now < bucket.held_until:
            return granted
        got = await core.store.take_tokens(
            bucket_key(core.service, name),
            want=want - granted,
            rate=rate.per_second,
            burst=rate.capacity,
            now=now,
        )
        granted += got
        bucket.held_until = (
            now + timedelta(seconds=shortfall_wait(rate)) if granted < want else None
        )
        return granted

    def not_held(self, names: Iterable[str]) -> list[str]:
        """Of ``names``, those not held back now (what the worker's wake-up time
        looks at): a handler waiting for tokens or at its concurrency limit is
        left out."""
        now = self._core.clock.now()
        subscription_of = self._core.registry.get
        kept: list[str] = []
        for name in names:
            subscription = subscription_of(name)
            if subscription is not None:
                gate = subscription.gate
                if gate is not None and gate.free <= 0:
                    continue
                bucket = self._buckets.get(name)
                if bucket is not None and bucket.held_until is not None and now < bucket.held_until:
                    continue
            kept.append(name)
        return kept

    def next_tokens(self) -> datetime | None:
        """When the first handler held back for tokens may take some again (None:
        none is held back)."""
        now = self._core.clock.now()
        times = [
            b.held_until
            for b in self._buckets.values()
            if b.held_until is not None and b.held_until > now
        ]
        return min(times) if times else None
