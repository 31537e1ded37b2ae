"""Services (issue 12) on every store engine: each record keeps its service; two
services' records of one handler name never cross in claims, ``next_due`` or
listings; the store keeps each service's subscriptions (put, tombstone, resurrect,
prune, and a revision that moves with every change), dead-letters what waits for a
removed handler once no lease holds it, keeps the workers' heartbeats, counts what
waits per service and handler, and filters and groups dead letters by service."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from retrybus import DeadLetterFilter, Event, ManualClock, RetryItem, Store
from retrybus._outcomes import DeadLettered, Rescheduled
from retrybus._records import DeadLetterItem, ErrorInfo, dead_letter_id_for, delivery_id
from retrybus._services import (
    DEFAULT_SERVICE,
    HandlerLoad,
    Registration,
    StoredSubscription,
    WorkerBeat,
)

# a time inside a millisecond (MongoDB keeps a record's microseconds beside it)
START = datetime(2025, 1, 7, 10, 0, 0, 123456, tzinfo=UTC)
# subscriptions and heartbeats: whole milliseconds (no engine needs more for them)
ADMIN_START = datetime(2025, 1, 7, 10, 0, 0, 123000, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def event(n: int) -> Event:
    return Event("order.placed", {"n": n}, source="shop", id=f"event-{n}", time=START)


def pending(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    service: str = DEFAULT_SERVICE,
    *,
    due_in: float = 0.0,
    owner: str | None = None,
) -> RetryItem:
    """A first delivery of ``event(n)`` to ``service``'s ``handler``, due in ``due_in``
    seconds, leased to ``owner`` for a minute when given."""
    now = clock.now()
    return RetryItem.pending(
        event(n),
        handler,
        max_retries=3,
        due=now + timedelta(seconds=due_in),
        now=now,
        lease_owner=owner,
        lease_until=None if owner is None else now + timedelta(seconds=60),
        service=service,
    )


def retry(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    service: str = DEFAULT_SERVICE,
    *,
    attempt: int = 2,
    due_in: float = 0.0,
) -> RetryItem:
    now = clock.now()
    return RetryItem.for_failure(
        event(n),
        handler,
        ErrorInfo(f"order {n} not found", "KeyError"),
        attempt=attempt,
        max_retries=3,
        next_retry=now + timedelta(seconds=due_in),
        now=now,
        service=service,
    )


def dead(
    clock: ManualClock,
    n: int,
    handler: str = "h",
    service: str = DEFAULT_SERVICE,
    *,
    processed: bool = False,
    error: str = "order 7 not found",
) -> DeadLetterItem:
    item = DeadLetterItem.for_failure(
        event(n),
        handler,
        ErrorInfo(error, "KeyError"),
        reason="non-retryable: KeyError",
        attempt=0,
        max_retries=3,
        now=clock.now(),
        service=service,
    )
    return replace(item, processed=True, processed_at=clock.now()) if processed else item


def subscription(
    service: str,
    handler: str,
    *patterns: str,
    policy: str = "ExponentialBackoff(max_retries=3)",
    max_retries: int = 3,
) -> StoredSubscription:
    """What a bus offers ``put_subscriptions`` (the store sets the times)."""
    return StoredSubscription(
        service=service,
        handler_name=handler,
        patterns=patterns or ("order.*",),
        policy=policy,
        max_retries=max_retries,
        handler_timeout=30.0,
        registered_at=ADMIN_START,
        updated_at=ADMIN_START,
        details={"versions": [1, 2]},
    )


def ids(items: list[RetryItem]) -> set[str]:
    return {item.id for item in items}


# every engine: records of the default service ------------------------------------------


async def test_default_service_records_are_found_by_default_or_any_never_by_another(
    store: Store, clock: ManualClock
) -> None:
    # what every engine must do, keeping services or not
    first = pending(clock, 1)
    failed = retry(clock, 2)
    letter = dead(clock, 3)
    await store.record_pending([first])
    await store.record_failures([failed], [letter])
    assert (await store.get_retry(first.id)) == first
    assert (await store.get_dead(letter.id)) == letter
    assert {item.service for item in await store.list_retry(limit=10, offset=0)} == {"default"}
    for service in (None, DEFAULT_SERVICE):
        assert ids(await store.list_retry(limit=10, offset=0, service=service)) == {
            first.id,
            failed.id,
        }
        assert await store.next_due(service=service) == clock.now()
        assert await store.next_due(["h"], service=service) == clock.now()
        assert await store.count_dead(DeadLetterFilter(service=service)) == 1
    assert await store.list_retry(limit=10, offset=0, service="billing") == []
    assert await store.next_due(service="billing") is None
    assert await store.next_due(["h"], service="billing") is None
    owner_args = {"now": clock.now(), "limit": 10, "lease_until": clock.now()}
    assert await store.claim_due(owner="w", service="billing", **owner_args) == []
    assert await store.claim_due(owner="w", service="billing", handlers=["h"], **owner_args) == []
    billing = DeadLetterFilter(service="billing")
    assert await store.list_dead(billing, limit=10, offset=0) == []
    assert await store.count_dead(billing) == 0
    assert await store.group_dead("handler_name", billing, limit=10) == []
    assert await store.group_dead("service", billing, limit=10) == []
    default = DeadLetterFilter(service=DEFAULT_SERVICE)
    assert [d.id for d in await store.list_dead(default, limit=10, offset=0)] == [letter.id]
    (by_service,) = await store.group_dead("service", DeadLetterFilter(), limit=10)
    assert (by_service.key, by_service.count, by_service.sample_id) == ("default", 1, letter.id)
    (retry_group,) = await store.group_retry("service", limit=10)
    assert (retry_group.key, retry_group.count) == ("default", 2)
    claimed = await store.claim_due(
        now=clock.now(),
        limit=10,
        owner="w",
        lease_until=clock.now() + timedelta(seconds=60),
        service=DEFAULT_SERVICE,
        handlers=["h"],
    )
    assert {item.id for item in claimed if isinstance(item, RetryItem)} == {first.id, failed.id}


# round trips -----------------------------------------------------------------------------


async def test_a_retry_item_and_a_dead_letter_keep_their_service(
    store: Store, clock: ManualClock
) -> None:
    first = pending(clock, 1, service="billing")
    failed = retry(clock, 2, service="billing")
    letter = dead(clock, 3, service="billing")
    await store.record_pending([first])
    await store.record_failures([failed], [letter])
    assert (await store.get_retry(first.id)) == first
    assert (await store.get_retry(failed.id)) == failed
    assert (await store.get_dead(letter.id)) == letter
    # its failure group is its service's (the engines that store groups store that one)
    assert letter.failure_group != replace(letter, service=DEFAULT_SERVICE).failure_group
    same_group = DeadLetterFilter(failure_group=letter.failure_group)
    assert await store.list_dead(same_group, limit=10, offset=0) == [letter]
    lease_until = clock.now() + timedelta(seconds=60)
    claimed = await store.claim_due(now=clock.now(), limit=10, owner="w", lease_until=lease_until)
    assert {item.service for item in claimed if isinstance(item, RetryItem)} == {"billing"}
    # an outcome's record and dead letter keep it too
    later = failed.rescheduled(
        attempt=3,
        next_retry=clock.now() + timedelta(seconds=5),
        error=ErrorInfo("again", "KeyError"),
        now=clock.now(),
    )
    moved = first.to_dead_letter(reason="non-retryable: KeyError", now=clock.now())
    applied = await store.complete(
        [Rescheduled(later), DeadLettered(first.id, moved, first_delivery=True)], "w", clock.now()
    )
    assert applied == {first.id, failed.id}
    assert (await store.get_retry(failed.id)) == replace(later, claims=0)
    assert (await store.get_dead(moved.id)) == moved
    assert moved.service == "billing"
    # requeued, a dead letter is a retry item of its service again
    requeued = letter.to_retry_item(max_retries=3, now=clock.now())
    assert await store.requeue_dead(letter.id, requeued)
    assert (await store.get_retry(requeued.id)) == requeued
    assert requeued.service == "billing"


# two services, one handler name ----------------------------------------------------------


async def test_two_services_with_the_same_handler_name_never_cross(
    store: Store, clock: ManualClock
) -> None:
    # the same event to handler "h" of each service: one record each
    billing = [pending(clock, n, service="billing", due_in=-n) for n in range(1, 4)]
    shipping = [pending(clock, n, service="shipping", due_in=-10 * n) for n in range(1, 4)]
    default = pending(clock, 1, due_in=5)
    assert await store.record_pending([*billing, *shipping, default]) == ids(
        [*billing, *shipping, default]
    )
    assert billing[0].id == delivery_id("shop", "event-1", "h", "billing")
    assert len({billing[0].id, shipping[0].id, default.id}) == 3
    # recorded again (a publisher retrying): nothing new
    assert await store.record_pending([billing[0], shipping[0], default]) == set()

    assert ids(await store.list_retry(limit=10, offset=0, service="billing")) == ids(billing)
    assert ids(await store.list_retry(limit=10, offset=0, service="shipping")) == ids(shipping)
    assert ids(await store.list_retry(limit=10, offset=0, service=DEFAULT_SERVICE)) == {default.id}
    assert len(await store.list_retry(limit=10, offset=0)) == 7

    now = clock.now()
    assert await store.next_due(["h"], service="billing") == now - timedelta(seconds=3)
    assert await store.next_due(["h"], service="shipping") == now - timedelta(seconds=30)
    assert await store.next_due(["h"], service=DEFAULT_SERVICE) == now + timedelta(seconds=5)
    assert await store.next_due(["h"]) == now - timedelta(seconds=30)
    assert await store.next_due(["h"], service="nobody") is None

    lease_until = now + timedelta(seconds=60)
    got = await store.claim_due(
        now=now, limit=2, owner="b1", lease_until=lease_until, service="billing", handlers=["h"]
    )
    # billing's two earliest, though shipping's are due earlier still
    assert ids([i for i in got if isinstance(i, RetryItem)]) == {billing[2].id, billing[1].id}
    got = await store.claim_due(
        now=now, limit=10, owner="b2", lease_until=lease_until, service="billing"
    )
    assert ids([i for i in got if isinstance(i, RetryItem)]) == {billing[0].id}
    assert (
        await store.claim_due(
            now=now, limit=10, owner="b3", lease_until=lease_until, service="billing"
        )
        == []
    )
    # billing's leases push its next_due; shipping's is as it was
    assert await store.next_due(["h"], service="billing") == lease_until
    assert await store.next_due(["h"], service="shipping") == now - timedelta(seconds=30)
    got = await store.claim_due(
        now=now, limit=10, owner="s1", lease_until=lease_until, service="shipping", handlers=["h"]
    )
    assert ids([i for i in got if isinstance(i, RetryItem)]) == ids(shipping)
    # the default service's record is not due yet; nothing else is left
    assert await store.claim_due(now=now, limit=10, owner="x", lease_until=lease_until) == []
    assert ids(await store.list_retry(limit=10, offset=0, service="shipping")) == ids(shipping)


# subscriptions ---------------------------------------------------------------------------


async def test_put_subscriptions_adds_changes_and_leaves_alone(store: Store) -> None:
    assert await store.subscriptions_revision() == 0
    assert await store.list_subscriptions() == []
    t0 = ADMIN_START
    first = await store.put_subscriptions(
        "billing",
        [subscription("billing", "charge"), subscription("billing", "refund", "refund.*")],
        prune=False,
        now=t0,
        actor="worker-1",
    )
    assert first == Registration(added=("charge", "refund"))
    assert first.wrote
    revision = await store.subscriptions_revision()
    assert revision > 0
    charge, refund = await store.list_subscriptions("billing")
    assert (charge.service, charge.handler_name, refund.handler_name) == (
        "billing",
        "charge",
        "refund",
    )
    assert charge.same_terms(subscription("billing", "charge"))
    assert (charge.registered_at, charge.updated_at, charge.revision) == (t0, t0, revision)
    assert (charge.removed_at, charge.removed_by, charge.removed) == (None, None, False)
    assert charge.details == {"versions": [1, 2]}
    assert charge.handler_timeout == 30.0
    assert refund.patterns == ("refund.*",)

    # the same again: nothing written, the revision stays
    t1 = t0 + timedelta(seconds=10)
    again = await store.put_subscriptions(
        "billing",
        [subscription("billing", "charge"), subscription("billing", "refund", "refund.*")],
        prune=False,
        now=t1,
        actor="worker-2",
    )
    assert again == Registration(unchanged=("charge", "refund"))
    assert not again.wrote
    assert await store.subscriptions_revision() == revision
    assert await store.list_subscriptions("billing") == [charge, refund]

    # new terms: changed, registered_at kept; a handler left out stays without prune
    changed = await store.put_subscriptions(
        "billing",
        [subscription("billing", "charge", "order.*", "invoice.*", max_retries=5)],
        prune=False,
        now=t1,
        actor="worker-2",
    )
    assert changed == Registration(changed=("charge",))
    later = await store.subscriptions_revision()
    assert later > revision
    charge2, refund2 = await store.list_subscriptions("billing")
    assert charge2.patterns == ("order.*", "invoice.*")
    assert charge2.max_retries == 5
    assert (charge2.registered_at, charge2.updated_at, charge2.revision) == (t0, t1, later)
    assert refund2 == refund


async def test_subscriptions_are_listed_by_service_then_handler(store: Store) -> None:
    for service, handlers in (("shipping", ["pack", "label"]), ("billing", ["refund", "charge"])):
        await store.put_subscriptions(
            service,
            [subscription(service, handler) for handler in handlers],
            prune=False,
            now=ADMIN_START,
            actor="a",
        )
    assert [s.key for s in await store.list_subscriptions()] == [
        ("billing", "charge"),
        ("billing", "refund"),
        ("shipping", "label"),
        ("shipping", "pack"),
    ]
    assert [s.handler_name for s in await store.list_subscriptions("shipping")] == [
        "label",
        "pack",
    ]
    assert await store.list_subscriptions("nobody") == []


async def test_put_subscriptions_refuses_another_service_or_a_handler_twice(
    store: Store,
) -> None:
    with pytest.raises(ValueError, match="shipping/charge"):
        await store.put_subscriptions(
            "billing",
            [subscription("shipping", "charge")],
            prune=False,
            now=ADMIN_START,
            actor="a",
        )
    with pytest.raises(ValueError, match="'charge'"):
        await store.put_subscriptions(
            "billing",
            [subscription("billing", "charge"), subscription("billing", "charge", "x.*")],
            prune=False,
            now=ADMIN_START,
            actor="a",
        )
    assert await store.list_subscriptions() == []
    assert await store.subscriptions_revision() == 0


async def test_prune_tombstones_what_the_code_no_longer_has_and_a_return_resurrects_it(
    store: Store,
) -> None:
    t0 = ADMIN_START
    await store.put_subscriptions(
        "billing",
        [subscription("billing", "charge"), subscription("billing", "refund")],
        prune=False,
        now=t0,
        actor="w",
    )
    await store.put_subscriptions(
        "shipping", [subscription("shipping", "charge")], prune=False, now=t0, actor="w"
    )
    before = await store.subscriptions_revision()
    t1 = t0 + timedelta(minutes=1)
    pruned = await store.put_subscriptions(
        "billing", [subscription("billing", "charge")], prune=True, now=t1, actor="deploy-42"
    )
    assert pruned == Registration(removed=("refund",), unchanged=("charge",))
    pruned_at = await store.subscriptions_revision()
    assert pruned_at > before
    # live listings leave the tombstone out; another service's "charge" is untouched
    assert [s.key for s in await store.list_subscriptions()] == [
        ("billing", "charge"),
        ("shipping", "charge"),
    ]
    everything = await store.list_subscriptions("billing", removed=True)
    assert [s.handler_name for s in everything] == ["charge", "refund"]
    tombstone = everything[1]
    assert (tombstone.removed_at, tombstone.removed_by, tombstone.removed) == (
        t1,
        "deploy-42",
        True,
    )
    assert (tombstone.registered_at, tombstone.updated_at, tombstone.revision) == (
        t0,
        t1,
        pruned_at,
    )
    # pruning again changes nothing: a tombstone is not removed twice
    assert await store.put_subscriptions(
        "billing", [subscription("billing", "charge")], prune=True, now=t1, actor="x"
    ) == Registration(unchanged=("charge",))
    assert await store.subscriptions_revision() == pruned_at

    # the handler comes back: added again, registered anew, its tombstone cleared
    t2 = t1 + timedelta(minutes=1)
    back = await store.put_subscriptions(
        "billing",
        [subscription("billing", "charge"), subscription("billing", "refund")],
        prune=True,
        now=t2,
        actor="w",
    )
    assert back == Registration(added=("refund",), unchanged=("charge",))
    assert await store.subscriptions_revision() > pruned_at
    refund = (await store.list_subscriptions("billing"))[1]
    assert (refund.handler_name, refund.removed_at, refund.removed_by) == ("refund", None, None)
    assert (refund.registered_at, refund.updated_at) == (t2, t2)


async def test_remove_subscriptions_tombstones_named_handlers_or_all(store: Store) -> None:
    t0 = ADMIN_START
    await store.put_subscriptions(
        "billing",
        [subscription("billing", name) for name in ("charge", "refund", "audit")],
        prune=False,
        now=t0,
        actor="w",
    )
    await store.put_subscriptions(
        "shipping", [subscription("shipping", "charge")], prune=False, now=t0, actor="w"
    )
    revision = await store.subscriptions_revision()
    t1 = t0 + timedelta(minutes=1)
    assert await store.remove_subscriptions(
        "billing", ["refund", "nothing"], now=t1, actor="alice"
    ) == ["refund"]
    assert await store.subscriptions_revision() > revision
    revision = await store.subscriptions_revision()
    # removed already, or unknown: nothing to do, no new revision
    assert await store.remove_subscriptions("billing", ["refund"], now=t1, actor="bob") == []
    assert await store.remove_subscriptions("nobody", None, now=t1, actor="bob") == []
    assert await store.subscriptions_revision() == revision
    assert await store.remove_subscriptions("billing", None, now=t1, actor="bob") == [
        "audit",
        "charge",
    ]
    assert await store.list_subscriptions("billing") == []
    removed = await store.list_subscriptions("billing", removed=True)
    assert [(s.handler_name, s.removed_by) for s in removed] == [
        ("audit", "bob"),
        ("charge", "bob"),
        ("refund", "alice"),
    ]
    assert [s.key for s in await store.list_subscriptions()] == [("shipping", "charge")]


async def test_forgetting_old_tombstones_keeps_the_revision(store: Store) -> None:
    t0 = ADMIN_START
    await store.put_subscriptions(
        "billing",
        [subscription("billing", name) for name in ("charge", "refund", "audit")],
        prune=False,
        now=t0,
        actor="w",
    )
    await store.remove_subscriptions("billing", ["refund"], now=t0, actor="a")
    await store.remove_subscriptions("billing", ["audit"], now=t0 + timedelta(hours=2), actor="a")
    revision = await store.subscriptions_revision()
    assert await store.forget_subscriptions(t0 + timedelta(hours=1)) == 1
    assert await store.subscriptions_revision() == revision
    assert [s.handler_name for s in await store.list_subscriptions("billing", removed=True)] == [
        "audit",
        "charge",
    ]
    assert await store.forget_subscriptions(t0 + timedelta(hours=1)) == 0
    # a write after forgetting still moves the revision on
    await store.put_subscriptions(
        "billing", [subscription("billing", "refund")], prune=False, now=t0, actor="w"
    )
    assert await store.subscriptions_revision() > revision


# what waits for a removed handler --------------------------------------------------------


async def test_removal_dead_letters_unleased_records_and_leased_ones_once_their_lease_ran_out(
    store: Store, clock: ManualClock
) -> None:
    now = clock.now()
    waiting = pending(clock, 1, service="billing", due_in=-5)
    scheduled = pending(clock, 2, service="billing", due_in=3600)
    running = pending(clock, 3, service="billing", owner="publisher")
    failed = retry(clock, 4, service="billing", attempt=3, due_in=60)
    # another service's handler of the same name, and another billing handler
    other = pending(clock, 5, service="shipping")
    sibling = pending(clock, 6, "g", service="billing")
    await store.record_pending([waiting, scheduled, running, other, sibling])
    await store.record_failures([failed], [])
    for service, names in (("billing", ["h", "g"]), ("shipping", ["h"])):
        await store.put_subscriptions(
            service,
            [subscription(service, name) for name in names],
            prune=False,
            now=ADMIN_START,
            actor="w",
        )
    # nothing is removed: nothing moves
    assert await store.dead_letter_unsubscribed(now=now, limit=100) == []
    counted = (await store.counters()).retry_dead_lettered

    assert await store.remove_subscriptions("billing", ["h"], now=now, actor="alice") == ["h"]
    reason = "subscription removed: billing/h (by alice)"
    first = await store.dead_letter_unsubscribed(now=now, limit=2)
    # due first: the waiting one, then the retry
    assert [d.id for d in first] == [dead_letter_id_for(waiting.id), dead_letter_id_for(failed.id)]
    rest = await store.dead_letter_unsubscribed(now=now, limit=100)
    assert len(rest) == 1
    assert await store.dead_letter_unsubscribed(now=now, limit=100) == []
    moved = {d.event_id: d for d in [*first, *rest]}
    assert set(moved) == {"event-1", "event-2", "event-4"}
    for letter in moved.values():
        assert (letter.reason, letter.service, letter.handler_name) == (reason, "billing", "h")
        assert (await store.get_dead(letter.id)) == letter
    # the retries made, as expiry counts them: none for a first delivery
    assert (moved["event-1"].attempt, moved["event-4"].attempt) == (0, 2)
    assert (await store.counters()).retry_dead_lettered == counted + 3
    # the leased one waits for its lease; shipping's "h" and billing's "g" stay
    left = ids(await store.list_retry(limit=10, offset=0))
    assert left == {running.id, other.id, sibling.id}

    clock.advance(60)  # the publisher's lease runs out this instant
    (late,) = await store.dead_letter_unsubscribed(now=clock.now(), limit=100)
    assert (late.event_id, late.reason) == ("event-3", reason)
    assert ids(await store.list_retry(limit=10, offset=0)) == {other.id, sibling.id}
    letters = await store.list_dead(DeadLetterFilter(reason=reason), limit=10, offset=0)
    assert len(letters) == 4


async def test_a_handler_back_before_the_sweep_keeps_its_records(
    store: Store, clock: ManualClock
) -> None:
    item = pending(clock, 1, service="billing")
    await store.record_pending([item])
    terms = [subscription("billing", "h")]
    await store.put_subscriptions("billing", terms, prune=False, now=ADMIN_START, actor="w")
    await store.remove_subscriptions("billing", None, now=clock.now(), actor="alice")
    await store.put_subscriptions("billing", terms, prune=False, now=ADMIN_START, actor="w")
    assert await store.dead_letter_unsubscribed(now=clock.now(), limit=100) == []
    assert ids(await store.list_retry(limit=10, offset=0)) == {item.id}


# heartbeats ------------------------------------------------------------------------------


def beat(name: str, service: str, seen: datetime, *, busy: int = 0) -> WorkerBeat:
    return WorkerBeat(
        name=name,
        service=service,
        host="host-1",
        pid=4242,
        started_at=ADMIN_START,
        last_seen=seen,
        interval=10.0,
        lanes=8,
        lanes_busy=busy,
        handlers=("charge", "refund"),
        version="1.2.3",
    )


async def test_heartbeats_are_kept_listed_replaced_forgotten_and_pruned(store: Store) -> None:
    t0 = ADMIN_START
    assert await store.list_workers() == []
    await store.beat(beat("w2", "billing", t0))
    await store.beat(beat("w1", "shipping", t0))
    await store.beat(beat("w1b", "billing", t0))
    assert [(b.service, b.name) for b in await store.list_workers()] == [
        ("billing", "w1b"),
        ("billing", "w2"),
        ("shipping", "w1"),
    ]
    # a later beat replaces the last
    t1 = t0 + timedelta(seconds=10)
    latest = beat("w2", "billing", t1, busy=3)
    await store.beat(latest)
    assert await store.list_workers("billing") == [beat("w1b", "billing", t0), latest]
    assert latest.live_at(t1 + timedelta(seconds=30))
    assert not latest.live_at(t1 + timedelta(seconds=30.001))

    assert await store.forget_worker("w1b")
    assert not await store.forget_worker("w1b")
    assert [b.name for b in await store.list_workers()] == ["w2", "w1"]
    # beats last seen before the time go
    assert await store.prune_workers(t1) == 1
    assert await store.list_workers() == [latest]
    assert await store.prune_workers(t1) == 0
    assert await store.list_workers("shipping") == []


# what waits, per service and handler -----------------------------------------------------


async def test_service_loads_count_each_kind_the_leases_and_the_dead_letters(
    store: Store, clock: ManualClock
) -> None:
    assert await store.service_loads(clock.now()) == []
    now = clock.now()
    oldest = pending(clock, 1, service="billing", due_in=-30)
    await store.record_pending(
        [
            oldest,
            pending(clock, 2, service="billing", due_in=-5, owner="publisher"),
            pending(clock, 3, service="billing", due_in=600),
            pending(clock, 4, service="shipping", due_in=600),
            pending(clock, 5),
        ]
    )
    await store.record_failures(
        [retry(clock, 6, service="billing", due_in=10), retry(clock, 7, service="billing")],
        [
            dead(clock, 8, service="billing"),
            dead(clock, 9, service="billing", processed=True),
            dead(clock, 10, "g", service="billing"),
        ],
    )
    # a worker leases the billing retry that is due
    await store.claim_due(
        now=now,
        limit=10,
        owner="w",
        lease_until=now + timedelta(seconds=60),
        service="billing",
        handlers=["h"],
    )
    assert await store.service_loads(now) == [
        HandlerLoad(
            service="billing",
            handler_name="g",
            dead_unprocessed=1,
        ),
        HandlerLoad(
            service="billing",
            handler_name="h",
            pending=2,
            scheduled=1,
            retrying=2,
            # the publisher's, the oldest pending and the due retry (claimed just now)
            leased=3,
            dead_unprocessed=1,
            dead_processed=1,
            oldest_pending_due=oldest.next_retry,
        ),
        HandlerLoad(service="default", handler_name="h", pending=1, oldest_pending_due=now),
        HandlerLoad(service="shipping", handler_name="h", scheduled=1),
    ]
    # ten minutes on: the scheduled ones are pending, the leases ran out
    later = now + timedelta(seconds=600)
    loads = {(load.service, load.handler_name): load for load in await store.service_loads(later)}
    billing = loads["billing", "h"]
    assert (billing.pending, billing.scheduled, billing.retrying, billing.leased) == (3, 0, 2, 0)
    assert billing.queued == 5
    assert loads["shipping", "h"] == HandlerLoad(
        service="shipping",
        handler_name="h",
        pending=1,
        oldest_pending_due=later,
    )


# dead letters by service -----------------------------------------------------------------


async def test_dead_letters_are_filtered_and_grouped_by_service(
    store: Store, clock: ManualClock
) -> None:
    letters = []
    for n, service in enumerate(["billing", "shipping", "billing", DEFAULT_SERVICE, "billing"]):
        clock.advance(1)
        letters.append(dead(clock, n, service=service))
    await store.record_failures([], letters)
    billing = [letter for letter in letters if letter.service == "billing"]
    where = DeadLetterFilter(service="billing")
    assert await store.count_dead(where) == 3
    assert [d.id for d in await store.list_dead(where, limit=10, offset=0)] == [
        d.id for d in reversed(billing)
    ]
    assert await store.count_dead(DeadLetterFilter(service="nobody")) == 0
    assert await store.count_dead(DeadLetterFilter(service=DEFAULT_SERVICE)) == 1
    groups = await store.group_dead("service", DeadLetterFilter(), limit=10)
    assert [(g.key, g.count) for g in groups] == [("billing", 3), ("default", 1), ("shipping", 1)]
    assert (groups[0].first_at, groups[0].last_at, groups[0].sample_id) == (
        billing[0].created_at,
        billing[-1].created_at,
        billing[-1].id,
    )
    assert [(g.key, g.count) for g in await store.group_dead("service", where, limit=10)] == [
        ("billing", 3)
    ]
    assert await store.group_dead("service", DeadLetterFilter(), limit=1) == groups[:1]
    # one failure, three services: three failure groups, each its own service's
    failure_groups = await store.group_dead("failure_group", DeadLetterFilter(), limit=10)
    assert sorted(g.count for g in failure_groups) == [1, 1, 3]
    billing_group = billing[0].failure_group
    assert {g.key for g in failure_groups} == {
        billing_group,
        letters[1].failure_group,
        letters[3].failure_group,
    }
    same_group = DeadLetterFilter(failure_group=billing_group)
    assert {d.service for d in await store.list_dead(same_group, limit=10, offset=0)} == {"billing"}
    by_handler = await store.group_dead("handler_name", where, limit=10)
    assert [(g.key, g.count) for g in by_handler] == [("h", 3)]


async def test_retry_items_are_grouped_by_service(store: Store, clock: ManualClock) -> None:
    await store.record_pending(
        [
            pending(clock, 1, service="billing", due_in=3),
            pending(clock, 2, service="billing", due_in=1),
            pending(clock, 3, service="shipping", due_in=2),
        ]
    )
    groups = await store.group_retry("service", limit=10)
    assert [(g.key, g.count) for g in groups] == [("billing", 2), ("shipping", 1)]
    now = clock.now()
    assert (groups[0].first_at, groups[0].last_at) == (
        now + timedelta(seconds=1),
        now + timedelta(seconds=3),
    )
    assert groups[0].sample_id == delivery_id("shop", "event-2", "h", "billing")
