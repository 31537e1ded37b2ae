"""The MongoDB store's query documents: exact time comparisons, dead letter
filters and the grouping pipelines.

Times are stored as a BSON datetime ``t`` (milliseconds) plus ``t_us``, the
microseconds within that millisecond (see ``codec``), so every comparison here
is made on the pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ..._filters import DeadLetterFilter
from ..._groups import GroupCount
from ..._records import RetryKind
from ..._services import DEFAULT_SERVICE
from .common import Doc
from .ordering import BLOCKED

__all__ = [
    "DEAD_GROUP_DEFAULTS",
    "RETRY_GROUP_DEFAULTS",
    "before_position",
    "claim_candidates",
    "dead_letter_query",
    "dead_loads_pipeline",
    "earlier",
    "group_counts",
    "group_pipeline",
    "handler_scope",
    "kind_counts_pipeline",
    "kind_query",
    "lease_free",
    "newest_failures_pipeline",
    "not_earlier",
    "read_moment",
    "retry_loads_pipeline",
    "service_scope",
    "split_time",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# filter field -> document field, compared for equality
_EQUAL_FIELDS = (
    ("event_type", "event_type"),
    ("handler_name", "handler_name"),
    ("reason", "reason"),
    ("processed", "processed"),
    ("event_id", "event_id"),
    ("failure_group", "failure_group"),
)

# what a dead letter without the field reads back as (``codec.dead_letter_from_document``)
DEAD_GROUP_DEFAULTS: Mapping[str, str] = {
    "failure_group": "",
    "handler_name": "unknown",
    "event_type": "unknown",
    "reason": "",
    "service": DEFAULT_SERVICE,
}
# likewise, the retry items' fields they are grouped by
RETRY_GROUP_DEFAULTS: Mapping[str, str] = {
    "handler_name": "",
    "event_type": "",
    "service": DEFAULT_SERVICE,
}


def service_scope(service: str) -> Any:
    """The condition on the field ``service`` that selects the records of
    ``service``. The default service's matches a document without the field
    too: written before layout 3, or by a layout-2 process during a rolling
    upgrade (the codec reads it as one of the default service)."""
    return {"$in": [DEFAULT_SERVICE, None]} if service == DEFAULT_SERVICE else service


def split_time(moment: datetime) -> tuple[datetime, int]:
    """The millisecond BSON keeps, and the microseconds within it that it drops."""
    if moment.tzinfo is None:
        raise ValueError(f"stored times must be timezone-aware, got {moment!r}")
    moment = moment.astimezone(UTC)
    extra = moment.microsecond % 1000
    return moment.replace(microsecond=moment.microsecond - extra), extra


def earlier(name: str, moment: datetime, *, or_equal: bool = False) -> Doc:
    """Filter: the time field ``name`` is before ``moment`` (or at it), to the microsecond."""
    ms, extra = split_time(moment)
    if not or_equal and extra == 0:
        return {name: {"$lt": ms}}
    # a missing or null ``_us`` counts as 0: "$not $gt/$gte" matches it
    within = {"$not": {"$gt": extra}} if or_equal else {"$not": {"$gte": extra}}
    return {"$or": [{name: {"$lt": ms}}, {name: ms, f"{name}_us": within}]}


def not_earlier(name: str, moment: datetime) -> Doc:
    """Filter: the time field ``name`` is at ``moment`` or after it, to the microsecond."""
    ms, extra = split_time(moment)
    if extra == 0:
        return {name: {"$gte": ms}}
    return {"$or": [{name: {"$gt": ms}}, {name: ms, f"{name}_us": {"$gte": extra}}]}


def lease_free(now: datetime) -> Doc:
    """Filter: no live lease at ``now`` (none, or one that ran out)."""
    return {"$or": [{"lease_until": None}, earlier("lease_until", now, or_equal=True)]}


_MICROSECOND = timedelta(microseconds=1)


def kind_query(kind: RetryKind, now: datetime | None) -> Doc:
    """Filter: the retry queue records of ``kind`` at ``now`` (``RetryItem.kind``):
    a retry has ``attempt`` other than 0 (or none); a first delivery (``attempt``
    0) is pending when due at ``now``, scheduled after it. ``next_retry`` comes
    first, so that the server narrows the scan by the (next_retry, attempt) index."""
    if kind == "retry":
        return {"attempt": {"$ne": 0}}
    assert now is not None  # check_retry_kind
    due = (
        earlier("next_retry", now, or_equal=True)
        if kind == "pending"
        else not_earlier("next_retry", now + _MICROSECOND)
    )
    return {**due, "attempt": 0}


def _at_or_before(name: str, now: datetime) -> Doc:
    """Expression: the time field ``name`` is at ``now`` or before it, to the
    microsecond (as ``earlier(..., or_equal=True)`` filters)."""
    ms, extra = split_time(now)
    return {
        "$or": [
            {"$lt": [f"${name}", ms]},
            {
                "$and": [
                    {"$eq": [f"${name}", ms]},
                    {"$lte": [{"$ifNull": [f"${name}_us", 0]}, extra]},
                ]
            },
        ]
    }


def _after(name: str, now: datetime) -> Doc:
    """Expression: the time field ``name`` is after ``now``, to the microsecond
    (false for none: null and a missing field sort before every date)."""
    ms, extra = split_time(now)
    return {
        "$or": [
            {"$gt": [f"${name}", ms]},
            {
                "$and": [
                    {"$eq": [f"${name}", ms]},
                    {"$gt": [{"$ifNull": [f"${name}_us", 0]}, extra]},
                ]
            },
        ]
    }


def _count(condition: Doc) -> Doc:
    return {"$sum": {"$cond": [condition, 1, 0]}}


def kind_counts_pipeline(now: datetime) -> list[Doc]:
    """One ``$group`` counting the retries, pending and scheduled deliveries at
    ``now`` (the fields ``retry``, ``pending``, ``scheduled``), comparing
    ``next_retry`` to the microsecond as ``earlier`` does."""
    due = _at_or_before("next_retry", now)
    first: Doc = {"$eq": ["$attempt", 0]}
    return [
        {
            "$group": {
                "_id": None,
                "retry": _count({"$not": [first]}),
                "pending": _count({"$and": [first, due]}),
                "scheduled": _count({"$and": [first, {"$not": [due]}]}),
            }
        }
    ]


def handler_scope(service: str | None, handlers: list[str] | None) -> Doc:
    """Filter: the retry items of ``service``'s ``handlers`` (None: of any service,
    of any handler). A document without a handler name (damaged, or written by
    hand) is every handler's of its service: claimed, it is dead-lettered as
    undecodable instead of lingering. ``handler_name`` comes before
    ``service``: mongod plans on the (service, handler_name, next_retry, …)
    index whatever the order, SecantusDB looks up the first field it has an
    index for (so it reads the named handlers' items, not the whole service's)."""
    scope: Doc = {} if handlers is None else {"handler_name": {"$in": [*handlers, None]}}
    if service is not None:
        scope["service"] = service_scope(service)
    return scope


# what a record of each (service, handler) is grouped under (``HandlerLoad``)
_LOAD_KEY: Doc = {
    "service": {"$ifNull": ["$service", DEFAULT_SERVICE]},
    "handler_name": {"$ifNull": ["$handler_name", "unknown"]},
}


def retry_loads_pipeline(now: datetime) -> list[Doc]:
    """One ``$group`` per (service, handler) of the retry queue at ``now``: its
    records of each kind (``pending``, ``scheduled``, ``retrying``), those a live
    lease holds (``leased``) and the earliest ``next_retry`` of its pending ones
    (``oldest``, a ``{t, us}`` document; null when none is pending)."""
    due = _at_or_before("next_retry", now)
    first: Doc = {"$eq": ["$attempt", 0]}
    pending: Doc = {"$and": [first, due]}
    return [
        {
            "$group": {
                "_id": _LOAD_KEY,
                "pending": _count(pending),
                "scheduled": _count({"$and": [first, {"$not": [due]}]}),
                "retrying": _count({"$not": [first]}),
                "leased": _count(_after("lease_until", now)),
                "oldest": {"$min": {"$cond": [pending, _moment_of("next_retry"), None]}},
            }
        }
    ]


def newest_failures_pipeline(service: str | None) -> list[Doc]:
    """One ``$group`` per (service, handler) of the retries (``attempt != 0``) of
    ``service`` (None: of every service): the greatest ``(updated_at, _id)`` of its
    records (``newest``, a ``{t, us, id}`` document). Its ``$max`` of small
    documents reads each record once and sorts nothing."""
    query: Doc = {"attempt": {"$ne": 0}}
    if service is not None:
        query["service"] = service_scope(service)
    return [
        {"$match": query},
        {
            "$group": {
                "_id": _LOAD_KEY,
                "newest": {"$max": {**_moment_of("updated_at"), "id": "$_id"}},
            }
        },
    ]


def dead_loads_pipeline() -> list[Doc]:
    """One ``$group`` per (service, handler) of the dead letter queue: its dead
    letters processed and not (``processed``, ``unprocessed``)."""
    processed: Doc = {"$eq": ["$processed", True]}
    return [
        {
            "$group": {
                "_id": _LOAD_KEY,
                "processed": _count(processed),
                "unprocessed": _count({"$not": [processed]}),
            }
        }
    ]


def claim_candidates(now: datetime, handlers: list[str] | None, service: str | None = None) -> Doc:
    """Filter: the retry items that may be claimable at ``now`` (of ``service``'s
    ``handlers`` only: ``handler_scope``): due, and no lease or one that ran
    out, both compared to the millisecond. That is a superset, by the items
    whose time falls in the millisecond of ``now`` but after it: the caller
    checks the microseconds of what it reads, and leases with a compare-and-set.
    Every condition is on one field, with no operator at the top level, so that
    the server narrows the scan by index bounds (mongod: the (service,
    handler_name, next_retry, …) index) or by the first indexed field
    (SecantusDB, which scans the collection for a query with a top-level
    ``$and``/``$or``): ``handler_name`` comes first, then ``service``, then
    ``next_retry``."""
    ms, _extra = split_time(now)
    query = handler_scope(service, handlers)
    query["next_retry"] = {"$lte": ms}
    query["lease_until"] = {"$not": {"$gt": ms}}  # none (null or missing), or ran out
    query[BLOCKED] = None  # not held back by an earlier record of its ordering key
    return query


def before_position(name: str, moment: datetime, item_id: str) -> Doc:
    """Filter: the document comes after ``(moment, item_id)`` in newest-first order,
    i.e. ``(name, _id) < (moment, item_id)``, to the microsecond (keyset paging).

    The plain ``name <= ms(moment)`` bound lets the server walk the newest-first
    index from the cursor on; the ``$or`` then decides within that millisecond.
    """
    ms, extra = split_time(moment)
    # a missing or null ``_us`` counts as 0, as in ``earlier``
    same_us: Any = extra if extra else {"$not": {"$gt": 0}}
    tie = {name: ms, f"{name}_us": same_us, "_id": {"$lt": item_id}}
    within = [tie] if not extra else [{name: ms, f"{name}_us": {"$not": {"$gte": extra}}}, tie]
    return {name: {"$lte": ms}, "$or": [{name: {"$lt": ms}}, *within]}


def dead_letter_query(where: DeadLetterFilter) -> Doc:
    """The query document selecting the dead letters ``where`` matches."""
    query: Doc = {}
    for attribute, field in _EQUAL_FIELDS:
        value = getattr(where, attribute)
        if value is not None:
            query[field] = value
    if where.service is not None:
        query["service"] = service_scope(where.service)
    ranges: list[Doc] = []
    if where.created_after is not None:
        ranges.append(not_earlier("created_at", where.created_after))
    if where.created_before is not None:
        ranges.append(earlier("created_at", where.created_before))
    if where.cursor is not None:
        ranges.append(before_position("created_at", *where.cursor))
    if len(ranges) == 1 and "$or" not in ranges[0]:
        query.update(ranges[0])
    elif ranges:
        query["$and"] = ranges
    return query


def _moment_of(name: str) -> Doc:
    # a document, compared field by field: the millisecond, then the microseconds
    return {"t": f"${name}", "us": {"$ifNull": [f"${name}_us", 0]}}


def group_pipeline(
    query: Doc, *, by: str, default: str, moment: str, newest: bool, limit: int
) -> list[Doc]:
    """Count the documents ``query`` matches per value of field ``by`` (``default``
    where it is missing): largest first, ties by key; the earliest and latest of
    the time field ``moment``, and a sample id (the greatest ``(moment, _id)`` when
    ``newest``, else the least). Uses only ``$match``, ``$group`` (``$sum``,
    ``$min``, ``$max`` of small documents), ``$sort`` and ``$limit``."""
    with_id = {**_moment_of(moment), "id": "$_id"}
    first = with_id if not newest else _moment_of(moment)
    last = with_id if newest else _moment_of(moment)
    return [
        {"$match": query},
        {
            "$group": {
                "_id": {"$ifNull": [f"${by}", default]},
                "count": {"$sum": 1},
                "first": {"$min": first},
                "last": {"$max": last},
            }
        },
        {"$sort": {"count": -1, "_id": 1}},
        {"$limit": limit},
    ]


def read_moment(part: Mapping[str, Any]) -> datetime:
    """The time of a ``{t, us}`` document a pipeline made (``_moment_of``)."""
    value = part.get("t")
    if not isinstance(value, datetime):
        return _EPOCH  # a hand-written document without the time reads back so
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    extra = part.get("us")
    if not isinstance(extra, int) or isinstance(extra, bool) or not 0 <= extra < 1000:
        extra = 0
    return value.astimezone(UTC) + timedelta(microseconds=extra)


def group_counts(docs: list[Doc], *, newest: bool) -> list[GroupCount]:
    """The ``GroupCount`` rows of what ``group_pipeline`` returned."""
    counted: list[GroupCount] = []
    for doc in docs:
        sample = doc["last"] if newest else doc["first"]
        counted.append(
            GroupCount(
                key=str(doc["_id"]),
                count=int(doc["count"]),
                first_at=read_moment(doc["first"]),
                last_at=read_moment(doc["last"]),
                sample_id=str(sample["id"]),
            )
        )
    return counted
