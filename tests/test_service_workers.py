"""Workers of many services on one store (issue 12): a worker claims only its
service's records, stores its service's subscriptions when it starts, sends
heartbeats, and sweeps what waits for removed subscriptions; a stopped
service's deliveries wait for its next worker. On every engine; the
fault-injecting ones on the memory store."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

import retrybus
from retrybus import (
    Event,
    EventBus,
    ManualClock,
    RetryItem,
    RetryWorker,
    Store,
    StoreUnavailable,
    WorkerBeat,
)
from retrybus._cli.worker import WorkerSettings, build_parser, serve
from retrybus._services import UNSUBSCRIBED
from retrybus._stores.memory import MemoryStore
from retrybus._worker import SERVICE_RECORDS_KEPT, UNSUBSCRIBED_SWEEP_INTERVAL

FAST = {"check_interval": 0.02, "heartbeat_interval": 0.05}


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Wait until ``condition()`` holds (checked every 10 ms), failing after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {seconds}s: {condition.__doc__ or condition}")
        await asyncio.sleep(0.01)


class Calls:
    """What each service's handler was called with: (service, event id)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def handler(self, service: str) -> Callable[[Event], Awaitable[None]]:
        async def handle(event: Event) -> None:
            self.seen.append((service, event.id))

        return handle

    def of(self, service: str) -> list[str]:
        return [event_id for who, event_id in self.seen if who == service]


def shop_and_two_services(
    store: Store, clock: ManualClock, calls: Calls
) -> tuple[EventBus, EventBus, EventBus]:
    """The shop publishes orders; billing and shipping each handle them with a
    handler of the same name, ``OnOrder``."""
    shop = EventBus(store, service="shop", clock=clock, route_refresh=0)
    billing = EventBus(store, service="billing", clock=clock, route_refresh=0)
    shipping = EventBus(store, service="shipping", clock=clock, route_refresh=0)
    billing.subscribe("order.placed", calls.handler("billing"), name="OnOrder")
    shipping.subscribe("order.placed", calls.handler("shipping"), name="OnOrder")
    return shop, billing, shipping


async def records(store: Store, service: str) -> list[RetryItem]:
    return await store.list_retry(limit=1000, offset=0, service=service)


# claims by service -------------------------------------------------------------------


async def test_a_worker_claims_only_its_services_records_of_a_handler_name_both_have(
    store: Store, clock: ManualClock
) -> None:
    calls = Calls()
    shop, billing, shipping = shop_and_two_services(store, clock, calls)
    await billing.register()
    await shipping.register()
    event = Event("order.placed", {"order": 1})
    assert (await shop.publish(event)).routed == ("billing/OnOrder", "shipping/OnOrder")

    assert await RetryWorker(billing).run_once() == 1
    assert calls.of("billing") == [event.id]
    assert calls.of("shipping") == []
    assert await RetryWorker(billing).run_once() == 0  # shipping's is not billing's to claim
    assert await store.next_due(["OnOrder"], service="billing") is None
    (left,) = await records(store, "shipping")
    assert (left.handler_name, left.lease_owner, left.claims) == ("OnOrder", None, 0)

    async with RetryWorker(shipping, **FAST):

        async def shipping_handled() -> bool:
            return calls.of("shipping") == [event.id]

        await until(shipping_handled)
    assert calls.of("billing") == [event.id]
    assert await records(store, "shipping") == []


async def test_running_workers_of_two_services_each_handle_only_their_own(
    store: Store, clock: ManualClock
) -> None:
    calls = Calls()
    shop, billing, shipping = shop_and_two_services(store, clock, calls)
    async with RetryWorker(billing, **FAST), RetryWorker(shipping, **FAST):  # both register
        events = [Event("order.placed", {"order": n}) for n in range(20)]
        for event in events:
            await shop.publish(event, defer=True)

        async def all_handled() -> bool:
            return len(calls.seen) >= 2 * len(events)

        await until(all_handled)
        await asyncio.sleep(0.1)  # nothing more comes
    ids = sorted(event.id for event in events)
    assert sorted(calls.of("billing")) == ids
    assert sorted(calls.of("shipping")) == ids


async def test_a_stopped_service_accumulates_its_deliveries_and_drains_them_when_a_worker_starts(
    store: Store, clock: ManualClock
) -> None:
    calls = Calls()
    shop, billing, shipping = shop_and_two_services(store, clock, calls)
    async with RetryWorker(shipping, **FAST):
        pass  # shipping deployed once (registered), then all its workers stopped
    async with RetryWorker(billing, **FAST):
        events = [Event("order.placed", {"order": n}) for n in range(10)]
        for event in events:
            await shop.publish(event)

        async def billing_handled() -> bool:
            return len(calls.of("billing")) == len(events)

        await until(billing_handled)  # billing is not held up by shipping's backlog
        assert calls.of("shipping") == []
        waiting = await records(store, "shipping")
        assert sorted(item.event_id for item in waiting) == sorted(e.id for e in events)
        assert {item.handler_name for item in waiting} == {"OnOrder"}

        async with RetryWorker(shipping, **FAST):

            async def shipping_drained() -> bool:
                return not await records(store, "shipping")

            await until(shipping_drained)
    assert sorted(calls.of("shipping")) == sorted(e.id for e in events)
    assert len(calls.of("billing")) == len(events)


async def test_an_idle_worker_wakes_for_what_another_bus_of_this_process_routes_to_it() -> None:
    """No check interval passes: the publishing bus's write wakes the idle worker
    of the service it routed the event to (one store object; a store's watch
    tells of other processes), and no worker of another service."""
    store = MemoryStore()
    calls = Calls()
    shop, billing, shipping = shop_and_two_services(store, retrybus.SystemClock(), calls)
    woken: list[str] = []
    async with (
        RetryWorker(billing, check_interval=60) as billing_worker,
        RetryWorker(shipping, check_interval=60) as shipping_worker,
    ):
        await asyncio.sleep(0.05)  # both idle, for a minute
        for worker in (billing_worker, shipping_worker):
            count_wakes(worker, woken)
        await billing.store.remove_subscriptions(
            "shipping", None, now=shop.clock.now(), actor="test"
        )
        await shop.publish(Event("order.placed"), defer=True)

        async def handled() -> bool:
            return len(calls.seen) == 1

        await until(handled, 5)
    assert calls.of("billing") == [calls.seen[0][1]]
    assert woken[:1] == ["billing"]
    assert "shipping" not in woken


def count_wakes(worker: RetryWorker, woken: list[str]) -> None:
    """Note the worker's service in ``woken`` each time something wakes it."""
    wake = worker._wake_up

    def counted() -> None:
        woken.append(worker.bus.service)
        wake()

    worker._wake_up = counted  # type: ignore[method-assign]


# registration and heartbeats ----------------------------------------------------------


async def test_a_worker_stores_its_services_subscriptions_when_it_starts(
    store: Store, clock: ManualClock
) -> None:
    calls = Calls()
    shop, billing, _shipping = shop_and_two_services(store, clock, calls)
    assert await store.list_subscriptions("billing") == []
    worker = RetryWorker(billing, **FAST)
    await worker.start()
    try:
        (stored,) = await store.list_subscriptions("billing")
        assert (stored.handler_name, stored.patterns) == ("OnOrder", ("order.placed",))
        assert (await shop.publish(Event("order.placed"))).routed == ("billing/OnOrder",)
    finally:
        await worker.stop()
    assert len(await store.list_subscriptions("billing")) == 1  # a stop removes nothing


async def test_a_worker_started_while_the_store_is_down_registers_once_it_answers(
    clock: ManualClock,
) -> None:
    store = Unreliable()
    store.down = True
    bus = EventBus(store, service="billing", clock=clock)
    bus.subscribe("order.placed", Calls().handler("billing"), name="OnOrder")
    worker = RetryWorker(bus, **FAST)
    await worker.start()
    try:
        assert store.subscriptions_now() == []
        store.down = False

        async def registered() -> bool:
            return [s.handler_name for s in store.subscriptions_now()] == ["OnOrder"]

        await until(registered)

        async def beating() -> bool:
            return [beat.name for beat in await store.list_workers()] == [worker.name]

        await until(beating)
    finally:
        await worker.stop()


async def test_a_worker_beats_with_its_lanes_busy_and_forgets_its_beat_when_it_stops(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, service="billing", clock=clock)
    started, release = asyncio.Event(), asyncio.Event()

    @bus.handler("order.placed", name="Slow")
    async def slow(event: Event) -> None:
        started.set()
        await release.wait()

    @bus.handler("order.paid", name="Other")
    async def other(event: Event) -> None:
        return None

    worker = RetryWorker(bus, concurrency=4, name="billing-1", **FAST)
    await worker.start()
    try:
        (beat,) = await store.list_workers("billing")  # beats as it starts
        assert (beat.name, beat.service, beat.lanes, beat.lanes_busy) == (
            "billing-1",
            "billing",
            4,
            0,
        )
        assert (beat.host, beat.pid) == (socket.gethostname(), os.getpid())
        assert beat.handlers == ("Slow", "Other")
        assert (beat.interval, beat.version) == (0.05, retrybus.__version__)
        assert beat.started_at == clock.now()
        assert beat.live_at(clock.now())
        assert await store.list_workers("shipping") == []

        await bus.publish(Event("order.placed"), defer=True)
        await asyncio.wait_for(started.wait(), 10)

        async def one_lane_busy() -> bool:
            beats = await store.list_workers("billing")
            return [b.lanes_busy for b in beats] == [1]

        await until(one_lane_busy)
        (busy,) = await store.list_workers()
        assert busy.live_at(clock.now())
        assert not busy.live_at(clock.now() + timedelta(seconds=3 * 0.05 + 0.001))
    finally:
        release.set()
        await worker.stop()
    assert await store.list_workers() == []


async def test_a_failing_heartbeat_is_logged_once_and_never_stops_the_worker(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = Unreliable()
    store.beats_fail = True
    bus = EventBus(store, service="billing", clock=clock)
    calls = Calls()
    bus.subscribe("order.placed", calls.handler("billing"), name="OnOrder")
    caplog.set_level(logging.DEBUG, logger="retrybus.worker")
    async with RetryWorker(bus, **FAST) as worker:
        await asyncio.sleep(0.3)  # several beats fail
        await bus.publish(Event("order.placed"), defer=True)

        async def handled() -> bool:
            return len(calls.seen) == 1

        await until(handled)
        assert worker.running
        store.beats_fail = False

        async def beating() -> bool:
            return len(await store.list_workers()) == 1

        await until(beating)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "could not store its heartbeat" in warnings[0]
    assert any("its heartbeat is stored again" in r.getMessage() for r in caplog.records)


def test_heartbeat_interval_must_be_seconds() -> None:
    for value in (0, -1, "10", True):
        with pytest.raises(ValueError, match="heartbeat_interval must be a number > 0"):
            RetryWorker(EventBus(), heartbeat_interval=value)  # type: ignore[arg-type]
    assert RetryWorker(EventBus()).heartbeat_interval == 10.0


def test_the_worker_command_takes_a_heartbeat_interval() -> None:
    assert build_parser().parse_args(["app:bus"]).heartbeat_interval == 10.0
    assert (
        build_parser().parse_args(["app:bus", "--heartbeat-interval", "2.5"]).heartbeat_interval
        == 2.5
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["app:bus", "--heartbeat-interval", "0"])


async def test_the_worker_command_beats_every_heartbeat_interval(clock: ManualClock) -> None:
    bus = EventBus(MemoryStore(), service="billing", clock=clock)
    bus.subscribe("order.placed", Calls().handler("billing"), name="OnOrder")
    serving = asyncio.create_task(serve(bus, WorkerSettings(heartbeat_interval=0.25)))
    try:

        async def beating() -> bool:
            if serving.done():
                serving.result()  # its error
            return [beat.interval for beat in await bus.store.list_workers()] == [0.25]

        await until(beating)
    finally:
        if not serving.done():  # (one that ended has removed its signal handlers)
            os.kill(os.getpid(), signal.SIGTERM)  # serve() stops gracefully on it
        await asyncio.wait_for(serving, 10)
    assert await bus.store.list_workers() == []


# maintenance ------------------------------------------------------------------------


async def test_a_workers_maintenance_deletes_day_old_heartbeats_and_tombstones(
    store: Store, clock: ManualClock
) -> None:
    bus = EventBus(store, service="billing", clock=clock)
    bus.subscribe("order.placed", Calls().handler("billing"), name="OnOrder")
    await bus.register()
    gone = clock.now()
    await store.beat(beat_of("billing-gone", "billing", last_seen=gone, handlers=("OnOrder",)))
    await store.put_subscriptions(
        "shipping", [stored_terms("shipping", "OnOrder", gone)], prune=False, now=gone, actor="t"
    )
    await store.remove_subscriptions("shipping", ["OnOrder"], now=gone, actor="alice")
    clock.advance(SERVICE_RECORDS_KEPT.total_seconds() - 60)
    await store.beat(beat_of("billing-recent", "billing", last_seen=clock.now()))
    clock.advance(61)  # the first beat and the tombstone are a day old, the second is not
    async with RetryWorker(bus, **FAST) as worker:

        async def pruned() -> bool:
            names = [beat.name for beat in await store.list_workers()]
            return names == sorted(["billing-recent", worker.name])

        await until(pruned)

        async def forgotten() -> bool:
            return await store.list_subscriptions("shipping", removed=True) == []

        await until(forgotten)


# the sweep of removed subscriptions -------------------------------------------------


async def test_a_worker_sweeps_what_a_stale_publisher_wrote_after_a_removal(
    store: Store, clock: ManualClock
) -> None:
    calls = Calls()
    shop, billing, shipping = shop_and_two_services(store, clock, calls)
    await shipping.register()
    removal = await shop.services.remove("shipping", "OnOrder", actor="alice")
    assert (removal.removed, removal.dead_lettered) == (("OnOrder",), 0)
    dead: list[str] = []
    billing.on_dead_letter(lambda item: dead.append(item.reason))
    async with RetryWorker(billing, **FAST):
        await asyncio.sleep(0.1)  # its first sweep: nothing waits yet
        # a publisher whose copy of the routes predates the removal writes for it
        stale = RetryItem.pending(
            Event("order.placed", {"order": 9}),
            "OnOrder",
            max_retries=3,
            due=clock.now(),
            now=clock.now(),
            service="shipping",
        )
        await store.record_pending([stale])
        await asyncio.sleep(0.2)
        assert [item.id for item in await records(store, "shipping")] == [stale.id]
        clock.advance(UNSUBSCRIBED_SWEEP_INTERVAL)

        async def swept() -> bool:
            return not await records(store, "shipping")

        await until(swept)
    (letter,) = await store.list_dead(
        retrybus.DeadLetterFilter(service="shipping"), limit=5, offset=0
    )
    assert letter.reason == f"{UNSUBSCRIBED}shipping/OnOrder (by alice)"
    assert (letter.event_id, letter.handler_name) == (stale.event_id, "OnOrder")
    assert dead == [letter.reason]  # announced through the ledger: hooks, metrics, log
    assert calls.seen == []  # never handled by anyone


# helpers ------------------------------------------------------------------------


class Unreliable(MemoryStore):
    """A memory store that can be down (every call raises ``StoreUnavailable``),
    or refuse heartbeats alone."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.beats_fail = False

    def subscriptions_now(self) -> list[Any]:
        return [s for s in self._subscriptions.values() if not s.removed]

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if (
            not name.startswith("_")
            and callable(value)
            and asyncio.iscoroutinefunction(value)
            and name not in ("close",)
        ):

            async def guarded(*args: Any, **kwargs: Any) -> Any:
                if super(Unreliable, self).__getattribute__("down"):
                    raise StoreUnavailable(f"{self.url} is down")
                if name == "beat" and super(Unreliable, self).__getattribute__("beats_fail"):
                    raise RuntimeError("heartbeats are refused")
                return await value(*args, **kwargs)

            return guarded
        return value


def beat_of(
    name: str, service: str, *, last_seen: Any, handlers: tuple[str, ...] = ()
) -> WorkerBeat:
    return WorkerBeat(
        name=name,
        service=service,
        host="elsewhere",
        pid=1,
        started_at=last_seen,
        last_seen=last_seen,
        interval=10.0,
        lanes=16,
        handlers=handlers,
    )


def stored_terms(service: str, handler: str, now: Any) -> retrybus.StoredSubscription:
    return retrybus.StoredSubscription(
        service=service,
        handler_name=handler,
        patterns=("order.placed",),
        policy="ExponentialBackoff()",
        max_retries=3,
        registered_at=now,
        updated_at=now,
    )
