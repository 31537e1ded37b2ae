"""retrybus: an event bus whose failing handlers are retried under a policy from a
durable retry queue, and end, when retries are spent, in a dead letter queue
that a person can browse, reprocess and clean.

>>> import retrybus
>>> bus = retrybus.EventBus(retrybus.open_store("sqlite:///retrybus.db"))
"""

import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._breaker import CircuitBreaker
from ._breakers import BreakerInfo, Breakers
from ._budget import RetryBudget
from ._bus import EventBus, PublishResult
from ._clock import Clock, ManualClock, SystemClock
from ._dead_letters import BulkResult, DeadLetterQueue
from ._errors import (
    AlreadyHandled,
    AmbiguousId,
    AppNotFound,
    InvalidEventData,
    ItemBusy,
    ItemNotFound,
    NotCancellable,
    OtherService,
    PermanentError,
    RecordRejected,
    RedriveConflict,
    RetryAfter,
    RetrybusError,
    StoreUnavailable,
    StoreUnusable,
    SubscriptionInUse,
    TransportUnavailable,
    TransportUnusable,
    UnknownHandler,
    UnknownSubscription,
    UnknownVersion,
    UpcastFailed,
    VersionError,
)
from ._event import Event
from ._event_types import EventType
from ._filters import DeadLetterFilter
from ._groups import FailureGroup, GroupCount, failure_group_key, message_shape
from ._handlers import Subscription
from ._history import DepthHistory, DepthSample
from ._inbox import Inbox
from ._observe import Metrics, Tracing, reason_kind
from ._policy import ExponentialBackoff, FixedDelay, LinearBackoff, RetryPolicy
from ._queues import RetryQueue
from ._rate import Rate
from ._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from ._service_admin import ServiceRemoval, Services
from ._services import (
    HandlerLoad,
    HandlerSummary,
    Registration,
    ServiceSummary,
    StoredSubscription,
    WorkerBeat,
)
from ._stats import Stats
from ._stores import Store, open_store
from ._transports import Transport, open_transport
from ._versions_view import TypeVersions
from ._worker import RetryWorker

if _TYPE_CHECKING:
    from ._redrive import Redrive
    from ._redrives import Redrives

__version__ = "0.1.0"

# A library leaves output to the application: without its own logging set-up,
# retrybus prints nothing (the standard library's advice).
_logging.getLogger("retrybus").addHandler(_logging.NullHandler())

__all__ = [
    "RETRY_KINDS",
    "AlreadyHandled",
    "AmbiguousId",
    "AppNotFound",
    "BreakerInfo",
    "Breakers",
    "BulkResult",
    "CircuitBreaker",
    "Clock",
    "DeadLetterFilter",
    "DeadLetterItem",
    "DeadLetterQueue",
    "DepthHistory",
    "DepthSample",
    "Event",
    "EventBus",
    "EventType",
    "ExponentialBackoff",
    "FailureGroup",
    "FixedDelay",
    "GroupCount",
    "HandlerLoad",
    "HandlerSummary",
    "Inbox",
    "InvalidEventData",
    "ItemBusy",
    "ItemNotFound",
    "LinearBackoff",
    "ManualClock",
    "Metrics",
    "NotCancellable",
    "OtherService",
    "PermanentError",
    "PublishResult",
    "Rate",
    "RecordRejected",
    "Redrive",
    "RedriveConflict",
    "Redrives",
    "Registration",
    "RetryAfter",
    "RetryBudget",
    "RetryItem",
    "RetryKind",
    "RetryPolicy",
    "RetryQueue",
    "RetryWorker",
    "RetrybusError",
    "ServiceRemoval",
    "ServiceSummary",
    "Services",
    "Stats",
    "Store",
    "StoreUnavailable",
    "StoreUnusable",
    "StoredSubscription",
    "Subscription",
    "SubscriptionInUse",
    "SystemClock",
    "Tracing",
    "Transport",
    "TransportUnavailable",
    "TransportUnusable",
    "TypeVersions",
    "UnknownHandler",
    "UnknownSubscription",
    "UnknownVersion",
    "UpcastFailed",
    "VersionError",
    "WorkerBeat",
    "__version__",
    "failure_group_key",
    "message_shape",
    "open_store",
    "open_transport",
    "reason_kind",
]


def __getattr__(name: str) -> object:
    # redrives are for operators' tools; a worker process never loads them
    if name == "Redrive":
        from ._redrive import Redrive

        return Redrive
    if name == "Redrives":
        from ._redrives import Redrives

        return Redrives
    raise AttributeError(f"module 'retrybus' has no attribute {name!r}")
