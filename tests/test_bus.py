"""Publishing: handlers run concurrently, failures are recorded, never raised."""

from __future__ import annotations

import asyncio
import threading

import pytest

from retrybus import (
    DeadLetterItem,
    Event,
    EventBus,
    ExponentialBackoff,
    FixedDelay,
    ManualClock,
    PermanentError,
    RetryAfter,
    UnknownHandler,
    open_store,
)


async def test_publish_runs_every_matching_handler(bus: EventBus) -> None:
    seen: list[str] = []
    bus.subscribe("like.added", lambda e: seen.append("exact"), name="exact")
    bus.subscribe("like.*", lambda e: seen.append("glob"), name="glob")
    bus.subscribe("*", lambda e: seen.append("all"), name="all")
    bus.subscribe("comment.*", lambda e: seen.append("other"), name="other")
    result = await bus.publish(Event("like.added", {}))
    assert sorted(seen) == ["all", "exact", "glob"]
    assert result.succeeded == ("exact", "glob", "all")
    assert result.ok


async def test_a_handler_subscribed_to_several_patterns_runs_once(bus: EventBus) -> None:
    calls: list[Event] = []
    bus.subscribe(["like.*", "like.added", "*"], calls.append, name="many")
    await bus.publish(Event("like.added"))
    assert len(calls) == 1


async def test_publish_with_no_handler_is_fine(bus: EventBus) -> None:
    result = await bus.publish(Event("nobody.listens"))
    assert result.succeeded == result.retrying == result.dead_lettered == ()


async def test_async_handlers_run_concurrently(bus: EventBus) -> None:
    started = asyncio.Event()
    both = asyncio.Barrier(2)

    @bus.handler("x", name="one")
    async def one(event: Event) -> None:
        await asyncio.wait_for(both.wait(), 2)
        started.set()

    @bus.handler("x", name="two")
    async def two(event: Event) -> None:
        await asyncio.wait_for(both.wait(), 2)

    assert (await bus.publish(Event("x"))).ok
    assert started.is_set()


async def test_plain_handlers_run_in_a_thread(bus: EventBus) -> None:
    threads: list[int] = []
    bus.subscribe("x", lambda e: threads.append(threading.get_ident()), name="plain")
    await bus.publish(Event("x"))
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()


async def test_a_failure_never_reaches_the_publisher_and_is_scheduled(
    bus: EventBus, clock: ManualClock
) -> None:
    @bus.handler("like.added", name="SocialStatisticsHandler")
    async def fails(event: Event) -> None:
        raise TimeoutError("connection timeout")

    bus.subscribe("like.added", lambda e: None, name="FeedUpdateHandler")
    event = Event("like.added", {"post_id": 1})
    result = await bus.publish(event)
    assert result.succeeded == ("FeedUpdateHandler",)
    assert result.retrying == ("SocialStatisticsHandler",)
    assert not result.ok
    [item] = await bus.retry_queue.list()
    assert item.handler_name == "SocialStatisticsHandler"
    assert (item.attempt, item.error, item.error_type) == (1, "connection timeout", "TimeoutError")
    assert item.to_event() == event
    assert 0.9 <= (item.next_retry - clock.now()).total_seconds() <= 1.1


async def test_permanent_error_is_dead_lettered_at_once(bus: EventBus) -> None:
    @bus.handler("comment.created", name="CommentNotificationHandler")
    async def fails(event: Event) -> None:
        raise PermanentError("email address is invalid")

    result = await bus.publish(Event("comment.created", {}))
    assert result.dead_lettered == ("CommentNotificationHandler",)
    assert await bus.retry_queue.count() == 0
    [dead] = await bus.dead_letters.list()
    assert dead.reason == "non-retryable: PermanentError"
    assert dead.attempt == 0


async def test_an_error_the_policy_does_not_retry_is_dead_lettered(bus: EventBus) -> None:
    bus.subscribe(
        "x",
        _raise(ValueError("bad payload")),
        name="h",
        policy=ExponentialBackoff(retry_on=ConnectionError),
    )
    result = await bus.publish(Event("x"))
    assert result.dead_lettered == ("h",)
    [dead] = await bus.dead_letters.list()
    assert dead.reason == "non-retryable: ValueError"


async def test_max_retries_zero_dead_letters_the_first_failure(bus: EventBus) -> None:
    bus.subscribe("x", _raise(TimeoutError()), name="h", policy=FixedDelay(max_retries=0))
    result = await bus.publish(Event("x"))
    assert result.dead_lettered == ("h",)
    [dead] = await bus.dead_letters.list()
    assert dead.reason == "failed after 0 retries"


async def test_retry_after_sets_the_delay_exactly(bus: EventBus, clock: ManualClock) -> None:
    bus.subscribe("x", _raise(RetryAfter(42)), name="h")
    await bus.publish(Event("x"))
    [item] = await bus.retry_queue.list()
    assert (item.next_retry - clock.now()).total_seconds() == 42


async def test_a_handler_policy_overrides_the_bus_default(
    store: object, clock: ManualClock
) -> None:
    bus = EventBus(clock=clock, default_policy=FixedDelay(delay=5))
    bus.subscribe("x", _raise(TimeoutError()), name="default")
    bus.subscribe(
        "x", _raise(TimeoutError()), name="own", policy=FixedDelay(delay=9, max_retries=7)
    )
    await bus.publish(Event("x"))
    items = {i.handler_name: i for i in await bus.retry_queue.list()}
    assert (items["default"].next_retry - clock.now()).total_seconds() == 5
    assert (items["own"].next_retry - clock.now()).total_seconds() == 9
    assert items["own"].max_retries == 7


async def test_on_dead_letter_hooks_see_each_new_dead_letter(bus: EventBus) -> None:
    seen: list[DeadLetterItem] = []
    bus.on_dead_letter(seen.append)

    @bus.on_dead_letter
    async def alert(item: DeadLetterItem) -> None:
        seen.append(item)

    bus.subscribe("x", _raise(PermanentError("no")), name="h")
    await bus.publish(Event("x"))
    assert len(seen) == 2
    assert seen[0].handler_name == "h"


async def test_a_failing_hook_is_logged_and_loses_nothing(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_hook(item: DeadLetterItem) -> None:
        raise RuntimeError("pager is down")

    bus.on_dead_letter(broken_hook)
    bus.subscribe("x", _raise(PermanentError("no")), name="h")
    result = await bus.publish(Event("x"))
    assert result.dead_lettered == ("h",)
    assert await bus.dead_letters.count() == 1
    assert "pager is down" in caplog.text


def test_handler_names_default_to_the_qualified_name() -> None:
    bus = EventBus()

    @bus.handler("x")
    async def count_like(event: Event) -> None: ...

    assert bus.handler_names == [
        "test_handler_names_default_to_the_qualified_name.<locals>.count_like"
    ]


def test_a_duplicate_handler_name_is_a_clear_error() -> None:
    bus = EventBus()
    bus.subscribe("x", lambda e: None, name="h")
    with pytest.raises(ValueError, match="'h' is already subscribed"):
        bus.subscribe("y", lambda e: None, name="h")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda bus: bus.subscribe("", lambda e: None), "pattern"),
        (lambda bus: bus.subscribe("x", "not callable"), "callable"),
        (lambda bus: bus.subscribe("x", lambda e: None, name=""), "name"),
        (lambda bus: bus.subscribe("x", lambda e: None, name="p", policy=object()), "RetryPolicy"),
        (lambda bus: EventBus(store="sqlite:///x.db"), "open_store"),
        (lambda bus: EventBus(retry_retention=-1), "retry_retention"),
    ],
)
def test_bad_subscriptions_raise_naming_the_value(call: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        call(EventBus())  # type: ignore[operator]


async def test_publish_refuses_what_is_not_an_event() -> None:
    with pytest.raises(TypeError, match="Event"):
        await EventBus().publish({"type": "x"})  # type: ignore[arg-type]


def test_unsubscribe_removes_the_handler() -> None:
    bus = EventBus()
    bus.subscribe("x", lambda e: None, name="h")
    bus.unsubscribe("h")
    assert bus.handler_names == []
    with pytest.raises(UnknownHandler):
        bus.unsubscribe("h")


async def test_the_default_store_is_in_memory() -> None:
    bus = EventBus()
    assert bus.store.url == "memory://"
    bus.subscribe("x", _raise(TimeoutError()), name="h")
    await bus.publish(Event("x"))
    assert await bus.retry_queue.count() == 1


async def test_publish_after_a_store_failure_raises(tmp_path: object) -> None:
    bus = EventBus(open_store("sqlite:////nonexistent-dir/retrybus.db"))
    bus.subscribe("x", _raise(TimeoutError()), name="h")
    from retrybus import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="nonexistent-dir"):
        await bus.publish(Event("x"))


def _raise(error: BaseException):  # type: ignore[no-untyped-def]
    async def handler(event: Event) -> None:
        raise error

    return handler
