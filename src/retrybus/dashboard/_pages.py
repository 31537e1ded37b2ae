"""The dashboard's pages (GET only: nothing here changes data)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from .._bus import EventBus
from .._errors import ItemNotFound, StoreUnavailable
from .._event_types import Reading
from .._filters import DeadLetterFilter
from .._history import DepthHistory
from .._records import RETRY_KINDS, DeadLetterItem, RetryItem, RetryKind
from .._services import HandlerLoad
from .._stats import Stats
from ._chart import depth_chart, runs
from ._display import preview
from ._scope import chosen_service, render_page, service_loads
from ._versions import group_versions
from ._web import SERVICE_KEY, HTTPError, pretty_json, redirect, root, state

__all__ = [
    "ACTIONS",
    "RETRY_LIST_KEYS",
    "bulk_confirm",
    "dead_letter",
    "dead_letter_payload",
    "dead_letters",
    "favicon",
    "groups",
    "overview",
    "parse_filter",
    "redrive",
    "redrives",
    "retry_item",
    "retry_payload",
    "retry_queue",
]

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
PAGING_KEYS = ("offset", "limit")
ACTIONS = {
    "requeue": "Requeue",
    "reprocess": "Reprocess",
    "delete": "Delete",
}
# created_before is exclusive: this microsecond still counts
TICK = timedelta(microseconds=1)
FAVICON = Path(__file__).parent / "static" / "favicon.svg"
# what a downloaded file's name may hold of an item's id
_UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9_.-]")


def parse_filter(
    request: Request, pairs: Iterable[tuple[str, str]], *, ignore: Iterable[str] = ()
) -> tuple[DeadLetterFilter, dict[str, str]]:
    """The dead letter filter these query (or form) pairs give, and the non-empty
    pairs as typed (for links: an age such as ``since=2h`` stays relative)."""
    skipped = {*PAGING_KEYS, *ignore}
    given = {key: value for key, value in pairs if key not in skipped}
    try:
        where = DeadLetterFilter.parse(given, state(request).bus.clock.now())
    except ValueError as exc:
        raise HTTPError(400, "Bad filter", str(exc)) from None
    return where, {key: value.strip() for key, value in given.items() if value.strip()}


# paging numbers beyond this are refused (a store's integer would overflow)
MAX_DIGITS = 9


def _whole(request: Request, name: str, default: int, maximum: int | None = None) -> int:
    text = request.query_params.get(name, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS:
        raise HTTPError(
            400, "Bad paging", f"{name} must be a whole number from 0 to 10^9, got {text!r}"
        )
    value = int(text)
    if maximum is not None and not 1 <= value <= maximum:
        raise HTTPError(400, "Bad paging", f"{name} must be between 1 and {maximum}, got {text!r}")
    return value


def _paging(request: Request) -> tuple[int, int]:
    return _whole(request, "limit", DEFAULT_LIMIT, MAX_LIMIT), _whole(request, "offset", 0)


def _pages(total: int, offset: int, limit: int, query: dict[str, str]) -> dict[str, Any]:
    """What the pager shows: the range on this page and the links' queries."""
    keep = {k: v for k, v in query.items() if k not in PAGING_KEYS}
    if limit != DEFAULT_LIMIT:
        keep["limit"] = str(limit)
    previous = None if offset == 0 else {**keep, "offset": str(max(0, offset - limit))}
    following = None if offset + limit >= total else {**keep, "offset": str(offset + limit)}
    return {
        "first": offset + 1 if total > offset else 0,
        "last": min(offset + limit, total),
        "total": total,
        "previous": previous,
        "next": following,
    }


def _drop_empty(request: Request) -> Response | None:
    """Redirect ``?type=&handler=X`` (what an empty form field sends) to ``?handler=X``."""
    items = request.query_params.multi_items()
    if any(not value.strip() for _, value in items):
        kept = {key: value.strip() for key, value in items if value.strip()}
        return redirect(request, request.url.path.removeprefix(root(request)), kept)
    return None


# overview ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Waiting:
    """How many records wait for one handler: a row of the retry queue's breakdown
    (``first_at``, ``last_at``: the earliest and latest due, where known)."""

    key: str
    count: int
    first_at: datetime | None = None
    last_at: datetime | None = None


def kinds_of(loads: Iterable[HandlerLoad]) -> dict[RetryKind, int]:
    """The retry queue records of each kind that these loads count together."""
    kinds: dict[RetryKind, int] = {"retry": 0, "pending": 0, "scheduled": 0}
    for load in loads:
        kinds["retry"] += load.retrying
        kinds["pending"] += load.pending
        kinds["scheduled"] += load.scheduled
    return kinds


def busiest(loads: Sequence[HandlerLoad], limit: int) -> list[HandlerLoad]:
    """The loads of the handlers with the most records waiting, most first."""
    waiting = [load for load in loads if load.queued]
    return sorted(waiting, key=lambda load: (-load.queued, load.handler_name))[:limit]


async def overview(request: Request) -> Response:
    """The totals, the depth chart and the largest groups; with ``?service=``, of
    that service's records (the retry success figures are the store's: counted
    for all services together)."""
    dashboard = state(request)
    bus = dashboard.bus
    service = chosen_service(request)
    dead_where = DeadLetterFilter(service=service)
    if service is None:
        stats = await bus.stats()
        retry_by_handler: Sequence[Waiting] = [
            Waiting(g.key, g.count) for g in await bus.store.group_retry("handler_name", limit=10)
        ]
    else:
        loads = await service_loads(bus, service)
        stats = Stats.from_counts(
            retry_queue_size=sum(load.queued for load in loads),
            dead_letter_queue_size=await bus.store.count_dead(dead_where),
            unprocessed_dead_letters=await bus.store.count_dead(
                dead_where.narrowed(processed=False)
            ),
            counters=await bus.store.counters(),
            kinds=kinds_of(loads),
        )
        retry_by_handler = [Waiting(load.handler_name, load.queued) for load in busiest(loads, 10)]
    samples = await DepthHistory(bus).samples(service)
    interval = dashboard.history_interval
    redrives = [
        r for r in await bus.redrives.list() if service is None or r.where.service == service
    ]
    context = {
        "stats": stats,
        "processed": stats.dead_letter_queue_size - stats.unprocessed_dead_letters,
        # the records due soon are counted for all services only
        "due_minute": None if service else await bus.retry_queue.count_due(within=60),
        "due_hour": None if service else await bus.retry_queue.count_due(within=3600),
        "by_handler": await bus.dead_letters.counts_by("handler_name", dead_where, limit=10),
        "by_type": await bus.dead_letters.counts_by("event_type", dead_where, limit=10),
        "retry_by_handler": retry_by_handler,
        "top_groups": await bus.dead_letters.groups(dead_where.narrowed(processed=False), limit=5),
        "chart": depth_chart(samples, interval),
        "samples": samples,
        "gaps": len(runs(samples, interval)) - 1,
        "active_redrives": [r for r in redrives if not r.finished],
        "outbox": await _outbox_card(bus),
    }
    return await render_page(request, "overview.html", context)


async def _outbox_card(bus: EventBus) -> dict[str, Any] | None:
    """The outbox table's depth and oldest age (None: the bus has no outbox
    database); an unreachable database says so instead of failing the page."""
    label = bus.outbox.label
    if label is None:
        return None
    try:
        depth = await bus.outbox.depth()
    except StoreUnavailable as exc:
        return {"label": label, "error": str(exc), "rows": None, "age": 0.0}
    assert depth is not None
    return {"label": label, "error": None, "rows": depth.rows, "age": depth.age(bus.clock.now())}


# dead letters -----------------------------------------------------------------


async def dead_letters(request: Request) -> Response:
    cleaned = _drop_empty(request)
    if cleaned is not None:
        return cleaned
    bus = state(request).bus
    chosen_service(request)  # a bad or unknown service is refused; the filter takes it
    where, query = parse_filter(request, request.query_params.multi_items())
    limit, offset = _paging(request)
    total = await bus.dead_letters.count(where=where)
    items = await bus.dead_letters.list(limit, offset, where=where)
    group = None
    if where.failure_group is not None:
        found = await bus.dead_letters.groups(
            DeadLetterFilter(failure_group=where.failure_group), limit=1
        )
        group = found[0] if found else None
    context = {
        "items": items,
        "where": where,
        "query": query,
        "filter_query": {k: v for k, v in query.items() if k not in PAGING_KEYS},
        "limit": limit,
        "offset": offset,
        "pages": _pages(total, offset, limit, query),
        "group": group,
        "choices": {
            field: [
                g.key
                for g in await bus.dead_letters.counts_by(
                    field, DeadLetterFilter(service=where.service), limit=100
                )
            ]
            for field in ("handler_name", "event_type", "reason")
        },
        "back": request.url.query,
    }
    return await render_page(request, "dead_letters.html", context)


async def _dead_letter(request: Request) -> DeadLetterItem:
    item_id = request.path_params["item_id"]
    try:
        return await state(request).bus.dead_letters.get(item_id)
    except ItemNotFound:
        raise HTTPError(
            404, "No such dead letter", f"no dead letter has the id {item_id!r}"
        ) from None


async def dead_letter(request: Request) -> Response:
    item = await _dead_letter(request)
    reading = await state(request).bus.dead_letters.reading(item)
    return await render_page(request, "dead_letter.html", dead_letter_context(item, reading))


async def dead_letter_payload(request: Request) -> Response:
    """A dead letter's whole payload, as a JSON file to download."""
    item = await _dead_letter(request)
    return json_download(item.event_data, f"{item.id}-payload.json")


def dead_letter_context(
    item: DeadLetterItem,
    reading: Reading | None = None,
    *,
    edit_text: str | None = None,
    edit_error: str = "",
) -> dict[str, Any]:
    """What the detail page shows; ``edit_text`` and ``edit_error`` after a refused edit.

    A payload longer than a preview is shown cut, and not offered for editing: a
    cut text sent back would replace the payload with its start. The payload
    offered for editing is the one a handler gets (upcast to the current
    version, which an edit is stored as) when the ``reading`` says so."""
    payload = pretty_json(item.event_data)
    context = _item_context(item, payload)
    editable = payload
    if reading is not None and reading.upcast and reading.error is None:
        editable = pretty_json(reading.data)
    if edit_text is None and not preview(editable).truncated:
        edit_text = editable
    return {**context, "edit_text": edit_text, "edit_error": edit_error}


def _item_context(item: DeadLetterItem | RetryItem, payload: str) -> dict[str, Any]:
    """What both detail pages show: the payload (``pretty_json`` of it) cut to a
    preview, the metadata and its edits."""
    metadata = dict(item.metadata)
    edits = metadata.get("edits", [])
    return {
        "item": item,
        "payload": preview(payload),
        "edits": edits if isinstance(edits, list) else [],
        "metadata": metadata,
    }


def json_download(data: Any, filename: str) -> Response:
    """``data`` as a pretty JSON file (what the pages show of it is its start)."""
    # a lone surrogate (which JSON allows as an escape) is written back as that escape
    body = pretty_json(data).encode("utf-8", "backslashreplace")
    name = _UNSAFE_IN_FILENAME.sub("_", filename)
    return Response(
        body,
        media_type="application/json",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


# failure groups -----------------------------------------------------------------


async def groups(request: Request) -> Response:
    cleaned = _drop_empty(request)
    if cleaned is not None:
        return cleaned
    bus = state(request).bus
    chosen_service(request)  # a bad or unknown service is refused; the filter takes it
    where, query = parse_filter(request, request.query_params.multi_items())
    found = await bus.dead_letters.groups(where, limit=200)
    context = {
        "groups": found,
        "versions": await group_versions(bus.store, found),
        "where": where,
        "query": query,
        "total": sum(g.count for g in found),
        "largest": max((g.count for g in found), default=0),
    }
    return await render_page(request, "groups.html", context)


# confirmation of a bulk action ------------------------------------------------------


async def bulk_confirm(request: Request) -> Response:
    dashboard = state(request)
    action = request.query_params.get("action", "")
    if action not in ACTIONS:
        raise HTTPError(
            400, "Bad action", f"action must be requeue, reprocess or delete, got {action!r}"
        )
    chosen_service(request)  # a bad or unknown service is refused; the filter takes it
    where, query = parse_filter(request, request.query_params.multi_items(), ignore=("action",))
    now = dashboard.bus.clock.now()
    # what the form acts on: what matches now, however long the page stays open
    pinned = where.narrowed(created_before=now + TICK)
    if action == "reprocess":
        pinned = pinned.narrowed(processed=False)
    count = await dashboard.bus.dead_letters.count(where=pinned)
    context = {
        "action": action,
        "label": ACTIONS[action],
        "where": where,
        "query": query,
        "pinned": pinned.to_query(),
        "count": count,
        "describe": describe(where),
        "blocked": dashboard.reprocess_disabled if action == "reprocess" else "",
    }
    status = 200 if dashboard.auth.identify(request) is not None else 403
    return await render_page(request, "confirm.html", context, status=status)


def describe(where: DeadLetterFilter) -> list[tuple[str, str]]:
    """The filter as (label, value) rows, for people."""
    labels = {
        "event_type": "Event type",
        "handler_name": "Handler",
        "reason": "Reason",
        "processed": "Processed",
        "created_after": "Created at or after",
        "created_before": "Created before",
        "event_id": "Event id",
        "failure_group": "Failure group",
        "service": "Service",
    }
    rows = []
    for name, value in where.to_dict().items():
        if name not in labels:  # a redrive's paging position (cursor) is no filter
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        rows.append((labels[name], str(value)))
    return rows


# retry queue --------------------------------------------------------------------


#: the retry queue page's tabs: each kind (``RetryKind``) and its label
KIND_LABELS: dict[str, str] = {"retry": "Retries", "pending": "Pending", "scheduled": "Scheduled"}
#: what the retry queue page's address may hold (a cancel form's "back" keeps only these)
RETRY_LIST_KEYS = ("handler", "kind", SERVICE_KEY, *PAGING_KEYS)


async def retry_queue(request: Request) -> Response:
    """The retry queue: its records by handler and by kind, and a page of them;
    with ``?service=``, of that service's records (counted from its handlers' loads)."""
    cleaned = _drop_empty(request)
    if cleaned is not None:
        return cleaned
    bus = state(request).bus
    unknown = set(request.query_params) - set(RETRY_LIST_KEYS)
    if unknown:
        raise HTTPError(
            400,
            "Bad filter",
            f"unknown filter {sorted(unknown)[0]!r}: use handler, kind or service",
        )
    service = chosen_service(request)
    handler = request.query_params.get("handler") or None
    kind = request.query_params.get("kind") or None
    if kind is not None and kind not in RETRY_KINDS:
        raise HTTPError(
            400, "Bad filter", f"kind must be one of {', '.join(RETRY_KINDS)}, got {kind!r}"
        )
    wanted: RetryKind | None = kind  # narrowed by the check above
    limit, offset = _paging(request)
    now = bus.clock.now()
    if service is None:
        breakdown, kinds, total = await _whole_queue(request, handler, wanted)
    else:
        breakdown, kinds, total = await _service_queue(request, service, handler, wanted)
    # a total unknown (one handler's items of one kind): one more item says a page follows
    fetch = limit + 1 if total is None else limit
    items = await bus.store.list_retry(
        limit=fetch,
        offset=offset,
        handler_name=handler,
        kind=wanted,
        now=None if wanted is None else now,
        service=service,
    )
    more = len(items) > limit
    items = items[:limit]
    query = {
        key: value
        for key, value in (("handler", handler), ("kind", kind), (SERVICE_KEY, service))
        if value
    }
    pages = _pages(offset + len(items) + more if total is None else total, offset, limit, query)
    if total is None:
        pages["total"] = None
    context = {
        "items": [(item, item.kind(now), item.leased_at(now)) for item in items],
        "handler": handler,
        "kind": kind,
        "kinds": kinds,
        "kind_labels": KIND_LABELS,
        "back": request.url.query,
        "breakdown": breakdown,
        "largest": max((g.count for g, _ in breakdown), default=0),
        "pages": pages,
        # the records due soon are counted for all services only
        "due_minute": None if service else await bus.retry_queue.count_due(within=60),
        "due_now": None if service else await bus.retry_queue.count_due(within=0),
    }
    return await render_page(request, "retry_queue.html", context)


Breakdown = list[tuple[Waiting, RetryItem | None]]


#: (service, handler) pairs whose last error the retry-queue page reads
MAX_LAST_ERRORS = 1000


async def _last_errors(request: Request, service: str | None) -> dict[str, RetryItem]:
    """Per handler (of ``service``; None: of any), its newest failure: the retry
    written last (``Store.newest_failures``), of whichever service failed last."""
    found = await state(request).bus.store.newest_failures(service=service, limit=MAX_LAST_ERRORS)
    newest: dict[str, RetryItem] = {}
    for item in found:  # newest first: the first of each handler is its newest
        newest.setdefault(item.handler_name, item)
    return newest


async def _whole_queue(
    request: Request, handler: str | None, kind: RetryKind | None
) -> tuple[Breakdown, dict[RetryKind, int], int | None]:
    """The whole retry queue's breakdown by handler (each with its last error: its
    newest failure, None when it has only first deliveries), its counts by kind (of
    every handler), and how many records the page lists (None: not counted)."""
    store = state(request).bus.store
    groups = await store.group_retry("handler_name", limit=100)
    last_errors = await _last_errors(request, None)
    breakdown: Breakdown = [
        (Waiting(g.key, g.count, g.first_at, g.last_at), last_errors.get(g.key)) for g in groups
    ]
    kinds = await state(request).bus.retry_queue.count_kinds()
    total: int | None
    if handler is None:
        total = sum(kinds.values()) if kind is None else kinds[kind]
    elif kind is None:
        total = next((g.count for g in groups if g.key == handler), 0)
    else:
        total = None
    return breakdown, kinds, total


async def _service_queue(
    request: Request, service: str, handler: str | None, kind: RetryKind | None
) -> tuple[Breakdown, dict[RetryKind, int], int]:
    """``_whole_queue`` for one service's records, from its handlers' loads: the
    counts by kind are of the handler shown (of all the service's without one);
    the latest due of each handler is not known."""
    bus = state(request).bus
    loads = await service_loads(bus, service)
    last_errors = await _last_errors(request, service)
    breakdown: Breakdown = []
    for load in busiest(loads, 100):
        first = await bus.store.list_retry(
            limit=1, offset=0, handler_name=load.handler_name, service=service
        )
        due = first[0].next_retry if first else None
        waiting = Waiting(load.handler_name, load.queued, due)
        breakdown.append((waiting, last_errors.get(load.handler_name)))
    shown = loads if handler is None else [load for load in loads if load.handler_name == handler]
    kinds = kinds_of(shown)
    return breakdown, kinds, sum(kinds.values()) if kind is None else kinds[kind]


async def _retry_item(request: Request) -> RetryItem:
    item_id = request.path_params["item_id"]
    try:
        return await state(request).bus.retry_queue.get(item_id)
    except ItemNotFound:
        raise HTTPError(
            404, "No such retry item", f"no item in the retry queue has the id {item_id!r}"
        ) from None


async def retry_item(request: Request) -> Response:
    item = await _retry_item(request)
    now = state(request).bus.clock.now()
    context = {
        **_item_context(item, pretty_json(item.event_data)),
        "kind": item.kind(now),
        "running": item.leased_at(now),
    }
    return await render_page(request, "retry_item.html", context)


async def retry_payload(request: Request) -> Response:
    """A retry item's whole payload, as a JSON file to download."""
    item = await _retry_item(request)
    return json_download(item.event_data, f"{item.id}-payload.json")


# redrives -----------------------------------------------------------------------


async def redrives(request: Request) -> Response:
    """The redrives, newest first; with ``?service=``, those of that service's dead
    letters (their filter names it)."""
    service = chosen_service(request)
    found = [
        r
        for r in await state(request).bus.redrives.list()
        if service is None or r.where.service == service
    ]
    context = {"redrives": found, "refresh": any(r.active for r in found)}
    return await render_page(request, "redrives.html", context)


async def redrive(request: Request) -> Response:
    redrive_id = request.path_params["redrive_id"]
    try:
        found = await state(request).bus.redrives.get(redrive_id)
    except ItemNotFound:
        raise HTTPError(404, "No such redrive", f"no redrive has the id {redrive_id!r}") from None
    context = {
        "redrive": found,
        "describe": describe(found.where),
        "refresh": found.active,
        "list_query": found.where.to_query(),
    }
    return await render_page(request, "redrive.html", context)


# the icon ---------------------------------------------------------------------------


async def favicon(request: Request) -> Response:
    """The dashboard's icon where browsers look for it without a ``<link rel="icon">``."""
    return FileResponse(FAVICON, media_type="image/svg+xml")
