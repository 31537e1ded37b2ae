"""retrybus: an event bus whose failing handlers are retried under a policy from a
durable retry queue, and end, when retries are spent, in a dead letter queue
that a person can browse, reprocess and clean.

>>> import retrybus
>>> bus = retrybus.EventBus(retrybus.open_store("sqlite:///retrybus.db"))
"""

import logging as _logging

from ._bus import EventBus, PublishResult
from ._clock import Clock, ManualClock, SystemClock
from ._errors import (
    ItemNotFound,
    PermanentError,
    RetryAfter,
    RetrybusError,
    StoreUnavailable,
    UnknownHandler,
)
from ._event import Event
from ._handlers import Subscription
from ._policy import ExponentialBackoff, FixedDelay, LinearBackoff, RetryPolicy
from ._queues import DeadLetterQueue, RetryQueue
from ._records import DeadLetterItem, RetryItem
from ._stats import Stats
from ._stores import Store, open_store
from ._worker import RetryWorker

__version__ = "0.1.0"

# A library leaves output to the application: without its own logging set-up,
# retrybus prints nothing (the standard library's advice).
_logging.getLogger("retrybus").addHandler(_logging.NullHandler())

__all__ = [
    "Clock",
    "DeadLetterItem",
    "DeadLetterQueue",
    "Event",
    "EventBus",
    "ExponentialBackoff",
    "FixedDelay",
    "ItemNotFound",
    "LinearBackoff",
    "ManualClock",
    "PermanentError",
    "PublishResult",
    "RetryAfter",
    "RetryItem",
    "RetryPolicy",
    "RetryQueue",
    "RetryWorker",
    "RetrybusError",
    "Stats",
    "Store",
    "StoreUnavailable",
    "Subscription",
    "SystemClock",
    "UnknownHandler",
    "__version__",
    "open_store",
]
