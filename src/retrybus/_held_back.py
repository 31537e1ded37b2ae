"""First deliveries a circuit breaker holds back, or a rate leaves to the
workers: instead of a call, the delivery's pending record (attempt 0, no
claim), due when the breaker half-opens (now, for a rate-limited handler: the
workers claim its records as its token bucket allows), which a worker's claim
(a half-open breaker's probes first) takes as any other. The record has the delivery's own id, the one a failure of the
same delivery would get, so that a delivery recorded twice (a broker's
redelivery after a crash before the ack) finds it there and adds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._records import RetryItem

if TYPE_CHECKING:
    from datetime import datetime

    from ._core import BusCore
    from ._event import Event
    from ._handlers import Subscription

__all__ = ["pending_record", "split_held_back"]


def split_held_back(
    core: BusCore,
    event: Event,
    subscriptions: Sequence[Subscription],
    metadata: Mapping[str, Any] | None,
) -> tuple[tuple[Subscription, ...], list[RetryItem]]:
    """The ``subscriptions`` to call now, and a pending record for each of the
    others: those whose breaker holds deliveries back (as the cached state says:
    the caller refreshes it when due), due when that breaker half-opens, and
    those with a rate (``rate=``), due now for the workers."""
    breakers = core.breakers
    run: list[Subscription] = []
    records: list[RetryItem] = []
    now = core.clock.now()
    for subscription in subscriptions:
        due = breakers.held_until(subscription.name)
        if due is None and subscription.rate is not None:
            due = now
        if due is None:
            run.append(subscription)
            continue
        records.append(pending_record(core, event, subscription, due=due, metadata=metadata))
    return tuple(run), records


def pending_record(
    core: BusCore,
    event: Event,
    subscription: Subscription,
    *,
    due: datetime,
    metadata: Mapping[str, Any] | None,
    claims: int = 0,
) -> RetryItem:
    """The pending record of ``event``'s first delivery to ``subscription``
    (attempt 0, the delivery's own id), due at ``due``, counting ``claims``."""
    return RetryItem.pending(
        event,
        subscription.name,
        max_retries=(subscription.policy or core.default_policy).max_retries,
        due=due,
        now=core.clock.now(),
        metadata=metadata,
        service=core.service,
        claims=claims,
    )
