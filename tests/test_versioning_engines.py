"""Event versioning on every engine and every delivery path: events stored by code
that knows v1 of ``like.added`` (dead letters, scheduled deliveries, retries) are
read as v3 by code that knows v3, through the worker, a reprocess and a redrive,
and their stored payloads are never rewritten; a buggy upcaster and a version
newer than the code dead-letter, and a redrive after the fix delivers; brokers,
aliases across services, inline, deferred and outbox publishes upcast too
(tests/versioning_types.py has the type)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from retrybus import (
    DeadLetterFilter,
    DeadLetterItem,
    Event,
    EventBus,
    FixedDelay,
    ManualClock,
    PermanentError,
    RetryItem,
    RetryWorker,
    Store,
    open_store,
)
from retrybus._event_types import Upcaster
from retrybus._stores.memory import MemoryStore
from retrybus._transports.base import Transport
from transports._common import all_transports
from versioning_types import (
    ALIAS,
    TYPE,
    UPCASTERS_V3,
    V1_DATA,
    V3_DATA,
    V4_DATA,
    LikeAdded,
    LikeAddedV4,
    buggy_v1_to_v2,
    register_v1,
    register_v3,
    register_v4,
)

#: a v1 event as a v1 bus that registers nothing stores it, and as one that registers v1
UNSTAMPED: dict[str, str] = {}
STAMPED_V1 = {"dataversion": "1"}


def stored_json(data: Any) -> str:
    """A payload as text to compare (keys sorted: PostgreSQL's jsonb keeps no order)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stored_form(record: RetryItem | DeadLetterItem) -> tuple[str, dict[str, str]]:
    """What a record holds of its event's payload and version."""
    return stored_json(record.event_data), dict(record.event_extensions)


class Seen:
    """What each read gave the first upcaster of the chain, by event id: the
    stored payload and extensions exactly as they came out of the store."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[tuple[str, dict[str, str]]]] = {}

    def upcasters(self, chain: Mapping[int, Upcaster] = UPCASTERS_V3) -> dict[int, Upcaster]:
        first = chain[1]

        def watched(data: Any, event: Event) -> Any:
            self.inputs.setdefault(event.id, []).append((stored_json(data), dict(event.extensions)))
            return first(data)

        return {**chain, 1: watched}


class Received:
    """What a v3 handler named ``count`` was given, by event id; it fails the
    first call of each event id in ``fail_once``."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[str, dict[str, str], Any]]] = {}
        self.fail_once: set[str] = set()

    def subscribe(self, bus: EventBus, **options: Any) -> None:
        async def count(event: Event, data: LikeAdded) -> None:
            self.calls.setdefault(event.id, []).append((event.type, dict(event.extensions), data))
            if event.id in self.fail_once:
                self.fail_once.discard(event.id)
                raise ConnectionError("the counter blinked")

        bus.subscribe(TYPE, count, name="count", **options)

    def models(self, event_id: str) -> list[Any]:
        return [data for _type, _extensions, data in self.calls.get(event_id, [])]


def v1_bus(store: Store, clock: ManualClock, *, stamps: bool) -> EventBus:
    """A bus of the code that knows v1: registering nothing, or v1 itself
    (``stamps``). Its ``count`` handler dead-letters every event at once except
    those with the subject ``retry``, which it leaves to a retry."""
    bus = EventBus(store, clock=clock)
    if stamps:
        register_v1(bus)

    def count(event: Event) -> None:
        if event.subject == "retry":
            raise ConnectionError("the counter is down")
        raise PermanentError("the v1 counter cannot count this")

    bus.subscribe(TYPE, count, name="count", policy=FixedDelay(delay=1, max_retries=3))
    return bus


def v3_bus(store: Store, clock: ManualClock, seen: Seen, received: Received) -> EventBus:
    bus = EventBus(store, clock=clock)
    register_v3(bus, seen.upcasters())
    received.subscribe(bus, policy=FixedDelay(delay=1, max_retries=3))
    return bus


async def dead_letter_of(bus: EventBus, event_id: str) -> DeadLetterItem:
    (letter,) = await bus.dead_letters.list(event_id=event_id)
    return letter


# 1. what v1 code stored, read as v3 -------------------------------------------------


async def test_v1_scheduled_deliveries_and_dead_letters_are_read_as_v3_and_never_rewritten(
    store: Store, clock: ManualClock
) -> None:
    plain = v1_bus(store, clock, stamps=False)
    stamping = v1_bus(store, clock, stamps=True)
    reprocessed = await plain.publish(Event(TYPE, V1_DATA, source="/social"))
    redriven = await stamping.publish(Event(TYPE, V1_DATA, source="/social"))
    assert reprocessed.dead_lettered == redriven.dead_lettered == ("count",)
    in_a_minute = await plain.publish(Event(TYPE, V1_DATA, source="/social"), deliver_in=60)
    at_two = await stamping.publish(
        Event(TYPE, V1_DATA, source="/social"), deliver_at=clock.now() + timedelta(minutes=2)
    )
    assert in_a_minute.pending == at_two.pending == ("count",)
    written = {
        reprocessed.event.id: (stored_json(V1_DATA), UNSTAMPED),
        in_a_minute.event.id: (stored_json(V1_DATA), UNSTAMPED),
        redriven.event.id: (stored_json(V1_DATA), STAMPED_V1),
        at_two.event.id: (stored_json(V1_DATA), STAMPED_V1),
    }
    scheduled = {item.event_id: item for item in await plain.retry_queue.list()}
    assert set(scheduled) == {in_a_minute.event.id, at_two.event.id}
    for event_id, item in scheduled.items():
        assert item.kind(clock.now()) == "scheduled"
        assert stored_form(item) == written[event_id]
    for result in (reprocessed, redriven):
        assert stored_form(await dead_letter_of(plain, result.event.id)) == written[result.event.id]

    seen, received = Seen(), Received()
    v3 = v3_bus(store, clock, seen, received)
    v3_model = LikeAdded(**V3_DATA)

    # a reprocess calls the v3 handler here, and keeps the dead letter as it was
    done = await v3.dead_letters.reprocess(
        (await dead_letter_of(v3, reprocessed.event.id)).id, actor="alice"
    )
    assert done.processed is True
    assert received.models(reprocessed.event.id) == [v3_model]
    after = await v3.dead_letters.get(done.id)
    assert (after.processed, stored_form(after)) == (True, written[reprocessed.event.id])

    # a redrive requeues the stored event as it is; the worker reads it as v3
    redrive = await v3.redrives.start(
        DeadLetterFilter(event_id=redriven.event.id, processed=False), actor="alice"
    )
    finished = await v3.redrives.run(redrive.id, interval=0)
    assert (finished.state, finished.done, finished.failed) == ("completed", 1, 0)
    requeued = [i for i in await v3.retry_queue.list() if i.event_id == redriven.event.id]
    assert [stored_form(i) for i in requeued] == [written[redriven.event.id]]

    worker = RetryWorker(v3)
    assert await worker.run_once() == 1  # the redriven one: the scheduled ones wait
    assert received.models(redriven.event.id) == [v3_model]
    clock.advance(60)
    assert await worker.run_once() == 1
    assert received.models(in_a_minute.event.id) == [v3_model]
    clock.advance(60)
    assert await worker.run_once() == 1
    assert received.models(at_two.event.id) == [v3_model]
    assert await v3.retry_queue.count() == 0

    for event_id, calls in received.calls.items():
        # the handler got the event as v3, under its registered name
        assert [(t, e) for t, e, _data in calls] == [(TYPE, {"dataversion": "3"})]
        # and the read was given exactly what the store held, once per delivery
        assert seen.inputs[event_id] == [written[event_id]]
    assert set(received.calls) == set(written)
    assert await v3.dead_letters.count() == 1  # the reprocessed one, kept and marked
    kept = await dead_letter_of(v3, reprocessed.event.id)
    assert stored_form(kept) == written[reprocessed.event.id]


async def test_a_v1_retry_fails_once_at_v3_and_stays_v1_in_the_store_between_attempts(
    store: Store, clock: ManualClock
) -> None:
    v1 = v1_bus(store, clock, stamps=True)
    published = await v1.publish(Event(TYPE, V1_DATA, source="/social", subject="retry"))
    assert published.retrying == ("count",)
    (item,) = await v1.retry_queue.list()
    written = (stored_json(V1_DATA), STAMPED_V1)
    assert (item.attempt, stored_form(item)) == (1, written)

    seen, received = Seen(), Received()
    v3 = v3_bus(store, clock, seen, received)
    received.fail_once.add(published.event.id)
    worker = RetryWorker(v3)
    clock.advance(1)
    assert await worker.run_once() == 1
    (again,) = await v3.retry_queue.list()
    assert (again.id, again.attempt, again.error) == (item.id, 2, "the counter blinked")
    assert stored_form(again) == written
    clock.advance(1)
    assert await worker.run_once() == 1
    assert await v3.retry_queue.count() == 0
    assert await v3.dead_letters.count() == 0
    assert received.models(published.event.id) == [LikeAdded(**V3_DATA)] * 2
    assert seen.inputs[published.event.id] == [written, written]


# 2. a buggy upcaster, fixed ---------------------------------------------------------


async def test_a_buggy_upcaster_dead_letters_and_a_redrive_after_the_fix_delivers_the_original(
    store: Store, clock: ManualClock
) -> None:
    v1 = v1_bus(store, clock, stamps=False)
    deferred = await v1.publish(Event(TYPE, V1_DATA, source="/social"), defer=True)
    retried = await v1.publish(Event(TYPE, V1_DATA, source="/social", subject="retry"))
    assert (deferred.pending, retried.retrying) == (("count",), ("count",))
    written = (stored_json(V1_DATA), UNSTAMPED)

    received = Received()
    v3 = EventBus(store, clock=clock)
    register_v3(v3, {**UPCASTERS_V3, 1: buggy_v1_to_v2})
    received.subscribe(v3, policy=FixedDelay(delay=1, max_retries=3))
    clock.advance(1)
    assert await RetryWorker(v3).run_once() == 2
    assert received.calls == {}
    assert await v3.retry_queue.count() == 0  # not retried
    for result, attempt in ((deferred, 0), (retried, 1)):
        letter = await dead_letter_of(v3, result.event.id)
        assert letter.reason == "upcast failed v1→v2: KeyError 'postid' (like.added)"
        assert (letter.error_type, letter.attempt) == ("retrybus._errors.UpcastFailed", attempt)
        assert stored_form(letter) == written

    seen = Seen()
    register_v3(v3, seen.upcasters())  # the fix, deployed: registered again
    redrive = await v3.redrives.start(action="reprocess", actor="alice")
    finished = await v3.redrives.run(redrive.id, interval=0)
    assert (finished.state, finished.done, finished.failed) == ("completed", 2, 0)
    for result in (deferred, retried):
        assert received.models(result.event.id) == [LikeAdded(**V3_DATA)]
        assert seen.inputs[result.event.id] == [written]
        letter = await dead_letter_of(v3, result.event.id)
        assert (letter.processed, stored_form(letter)) == (True, written)


# 3. a version newer than the code ---------------------------------------------------


async def test_a_v4_event_parks_on_a_v3_bus_until_it_learns_v4(
    store: Store, clock: ManualClock
) -> None:
    v4 = EventBus(store, clock=clock)
    register_v4(v4)
    v4.subscribe(TYPE, lambda event: None, name="count")
    published = await v4.publish(Event(TYPE, V4_DATA, source="/social"), defer=True)
    assert published.pending == ("count",)
    written = (stored_json(V4_DATA), {"dataversion": "4"})

    seen, received = Seen(), Received()
    v3 = v3_bus(store, clock, seen, received)
    assert await RetryWorker(v3).run_once() == 1
    letter = await dead_letter_of(v3, published.event.id)
    assert letter.reason == "unknown version 4 of like.added (this code knows up to 3)"
    assert (letter.error_type, letter.attempt) == ("retrybus._errors.UnknownVersion", 0)
    assert stored_form(letter) == written
    assert received.calls == {}
    assert await v3.retry_queue.count() == 0

    register_v4(v3)  # the deploy that knows v4
    redrive = await v3.redrives.start(event_id=published.event.id, actor="alice")
    assert (await v3.redrives.run(redrive.id, interval=0)).done == 1
    (requeued,) = await v3.retry_queue.list()
    assert stored_form(requeued) == written
    assert await RetryWorker(v3).run_once() == 1
    assert received.models(published.event.id) == [LikeAddedV4(**V4_DATA)]
    assert await v3.dead_letters.count() == 0
    assert await v3.retry_queue.count() == 0


# 5. through a broker ----------------------------------------------------------------

TRANSPORTS = all_transports()


@pytest.fixture(params=list(TRANSPORTS))
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    async with TRANSPORTS[request.param].open_test_transport() as opened:
        yield opened


async def until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.02)


async def test_v1_events_through_a_broker_reach_the_v3_handler_as_v3(
    transport: Transport,
) -> None:
    store = MemoryStore()
    seen, received = Seen(), Received()
    consumer = EventBus(store, service="stats", transport=transport)
    register_v3(consumer, seen.upcasters())
    received.subscribe(consumer, policy=FixedDelay(delay=3600, max_retries=3))
    producer = EventBus(store, service="social", transport=transport)  # knows no types
    renamed = Event(ALIAS, V1_DATA, source="/social")
    received.fail_once.add(renamed.id)  # its retry waits in the store
    worker = RetryWorker(consumer, check_interval=0.2)
    await worker.start()
    try:
        await until(
            lambda: worker._consumer is not None and worker._consumer._receiver is not None,
            "the consumer to open",
        )
        current = await producer.publish(Event(TYPE, V1_DATA, source="/social"))
        assert current.receipt is not None
        assert (await producer.publish(renamed)).receipt is not None
        await until(lambda: len(received.calls) == 2, "both events")
        deadline = time.monotonic() + 30
        while (retries := await store.list_retry(limit=10, offset=0)) == []:
            assert time.monotonic() < deadline, "no retry record"
            await asyncio.sleep(0.02)
    finally:
        await worker.stop()
    written = (stored_json(V1_DATA), UNSTAMPED)
    for event_id in (current.event.id, renamed.id):
        assert received.calls[event_id] == [(TYPE, {"dataversion": "3"}, LikeAdded(**V3_DATA))]
        assert seen.inputs[event_id] == [written]
    (retry,) = retries
    assert (retry.event_id, retry.event_type, retry.attempt) == (renamed.id, ALIAS, 1)
    assert stored_form(retry) == written


# 6. an old name, routed to another service ------------------------------------------


async def test_an_old_name_published_by_a_service_that_knows_no_aliases_reaches_the_type(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'bus.db'}") as store:
        seen, received = Seen(), Received()
        stats = EventBus(store, service="stats", clock=clock)
        like_added = register_v3(stats, seen.upcasters())
        received.subscribe(stats)
        wild: list[tuple[str, Any]] = []
        stats.subscribe("like.*", lambda event: wild.append((event.type, event.data)), name="wild")
        await stats.register()
        stored = {s.handler_name: s for s in await store.list_subscriptions("stats")}
        # a handler receives the type's old names as it receives the type, by name or pattern
        assert {name: s.patterns for name, s in stored.items()} == {
            "count": (TYPE, ALIAS),
            "wild": ("like.*", ALIAS),
        }
        assert {s.details["versions"][TYPE] for s in stored.values()} == {3}

        social = EventBus(store, service="social", clock=clock, route_refresh=0)
        assert await social.services.event_types() == {"stats": [like_added.describe()]}
        published = await social.publish(Event(ALIAS, V1_DATA, source="/social"))
        assert published.routed == ("stats/count", "stats/wild")
        written = (stored_json(V1_DATA), UNSTAMPED)
        records = await social.retry_queue.list()
        assert sorted((i.service, i.handler_name, i.event_type) for i in records) == [
            ("stats", "count", ALIAS),
            ("stats", "wild", ALIAS),
        ]
        assert [stored_form(i) for i in records] == [written] * 2

        assert await RetryWorker(stats).run_once() == 2
        assert received.calls[published.event.id] == [
            (TYPE, {"dataversion": "3"}, LikeAdded(**V3_DATA))
        ]
        assert wild == [(TYPE, V3_DATA)]
        assert seen.inputs[published.event.id] == [written] * 2


# 7. inline, deferred and staged publishes -------------------------------------------


async def test_a_v1_event_published_on_a_v3_bus_is_read_as_v3_inline_durably_and_deferred(
    store: Store, clock: ManualClock
) -> None:
    seen, received = Seen(), Received()
    v3 = v3_bus(store, clock, seen, received)
    models: list[LikeAdded] = []
    plain: list[tuple[str, Any]] = []

    async def tally(data: LikeAdded) -> None:
        models.append(data)

    def log(event: Event) -> None:
        plain.append((event.type, event.data))

    v3.subscribe(TYPE, tally, name="tally")
    v3.subscribe(TYPE, log, name="log")
    handlers = ("count", "tally", "log")
    written = (stored_json(V1_DATA), STAMPED_V1)
    results = {}
    for durable in (False, True, None):  # None: as the store says (durable when it persists)
        result = await v3.publish(
            Event(TYPE, V1_DATA, source="/social", extensions=STAMPED_V1), durable=durable
        )
        assert result.succeeded == handlers
        results[result.event.id] = result
    # a durable publish's records are removed behind its success; until then, v1
    assert all(stored_form(item) == written for item in await v3.retry_queue.list())
    await v3.core.ledger.flush()
    assert await v3.retry_queue.count() == 0
    deferred = await v3.publish(
        Event(TYPE, V1_DATA, source="/social", extensions=STAMPED_V1), defer=True
    )
    assert deferred.pending == handlers
    assert [stored_form(item) for item in await v3.retry_queue.list()] == [written] * 3
    assert await RetryWorker(v3).run_once() == 3
    results[deferred.event.id] = deferred

    assert set(received.calls) == set(results)
    model = LikeAdded(**V3_DATA)
    for event_id, result in results.items():
        assert result.event.extensions == STAMPED_V1  # publish keeps the version it states
        assert received.calls[event_id] == [(TYPE, {"dataversion": "3"}, model)]
        # each handler's call reads it (publish too, to validate it): all saw the v1 payload
        assert len(seen.inputs[event_id]) >= len(handlers)
        assert all(given == written for given in seen.inputs[event_id])
    assert models == [model] * len(results)
    assert plain == [(TYPE, V3_DATA)] * len(results)
    assert await v3.retry_queue.count() == 0
    assert await v3.dead_letters.count() == 0


async def test_the_outbox_stages_events_stamped_and_a_v1_one_is_delivered_as_v3(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "app.db"
    async with open_store(f"sqlite:///{path}") as store:
        seen, received = Seen(), Received()
        v3 = v3_bus(store, clock, seen, received)
        app = sqlite3.connect(path)
        try:
            old = Event(TYPE, V1_DATA, source="/social", extensions=STAMPED_V1)
            new = Event(TYPE, V3_DATA, source="/social")
            assert (await v3.outbox.stage(old, connection=app)).into == "store"
            await v3.outbox.stage(new, connection=app)
            with pytest.raises(ValueError, match="post_id"):
                await v3.outbox.stage(Event(TYPE, V1_DATA), connection=app)  # v1 data as v3
            app.commit()
        finally:
            app.close()
        stored = {item.event_id: stored_form(item) for item in await v3.retry_queue.list()}
        assert stored == {
            old.id: (stored_json(V1_DATA), STAMPED_V1),
            new.id: (stored_json(V3_DATA), {"dataversion": "3"}),
        }
        assert await RetryWorker(v3).run_once() == 2
        model = LikeAdded(**V3_DATA)
        assert received.models(old.id) == received.models(new.id) == [model]
        assert seen.inputs[old.id][-1] == stored[old.id]
        assert new.id not in seen.inputs  # nothing to upcast
