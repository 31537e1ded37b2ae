"""Services (issue 12), names and records: a record carries its service; the default
service keeps the ids and failure groups of the stores before services, another gets
ids and groups of its own; service names are checked; a store implements the services
part of the store protocol."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from retrybus import Event, EventBus, ManualClock
from retrybus._filters import DeadLetterFilter, filter_from
from retrybus._groups import failure_group_key
from retrybus._observe import reason_kind
from retrybus._outcomes import CorruptRecord, corrupt_to_dead_letter
from retrybus._records import DeadLetterItem, ErrorInfo, RetryItem, delivery_id
from retrybus._services import (
    DEFAULT_SERVICE,
    check_service,
    is_service_name,
    unsubscribed_reason,
)
from retrybus._stores.base import ServiceStore
from retrybus._stores.memory import MemoryStore
from retrybus._stores.sqlite.codec import CODEC

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
EVENT = Event("order.placed", {"order": 17}, source="svc", id="event-1", time=NOW)

# computed before services existed: a default-service delivery and failure group
# must keep them (stored records and groups are never recomputed)
DEFAULT_ID = "retry_f8288aef3d79b98dfcf633492059605e"
DEFAULT_GROUP = "grp_5ee619fe7242fe99"


# ids and failure groups ------------------------------------------------------------


def test_a_default_service_delivery_keeps_its_id() -> None:
    assert delivery_id("svc", "event-1", "count_like") == DEFAULT_ID
    assert delivery_id("svc", "event-1", "count_like", DEFAULT_SERVICE) == DEFAULT_ID
    item = RetryItem.pending(EVENT, "count_like", max_retries=3, due=NOW, now=NOW)
    assert item.id == delivery_id("svc", "event-1", "count_like")
    assert item.service == DEFAULT_SERVICE


def test_each_service_gets_delivery_ids_of_its_own() -> None:
    ids = {
        service: delivery_id("svc", "event-1", "count_like", service)
        for service in ("default", "billing", "shipping")
    }
    assert len(set(ids.values())) == 3
    assert ids["default"] == DEFAULT_ID
    key = "\x00".join(("billing", "svc", "event-1", "count_like")).encode()
    assert ids["billing"] == f"retry_{hashlib.sha256(key).hexdigest()[:32]}"
    # the same delivery recorded twice gets the same id, service by service
    assert delivery_id("svc", "event-1", "count_like", "billing") == ids["billing"]
    item = RetryItem.pending(
        EVENT, "count_like", max_retries=3, due=NOW, now=NOW, service="billing"
    )
    assert (item.id, item.service) == (ids["billing"], "billing")


def test_a_service_and_a_handler_never_make_the_id_of_another_pair() -> None:
    # four fields joined by NUL against three: a service cannot pose as a source
    assert delivery_id("billing", "svc", "event-1") != delivery_id("svc", "event-1", "", "billing")
    assert delivery_id("svc", "event-1", "h", "a") != delivery_id("svc", "event-1", "h", "b")


def test_a_default_service_failure_group_keeps_its_key() -> None:
    assert failure_group_key("count_like", "KeyError", "order 17 not found") == DEFAULT_GROUP
    assert (
        failure_group_key("count_like", "KeyError", "order 17 not found", DEFAULT_SERVICE)
        == DEFAULT_GROUP
    )


def test_each_service_has_failure_groups_of_its_own() -> None:
    keys = {
        service: failure_group_key("count_like", "KeyError", "order 17 not found", service)
        for service in ("default", "billing", "shipping")
    }
    assert len(set(keys.values())) == 3
    # still a group: the message's shape, not the message, is in the key
    shape_alike = failure_group_key("count_like", "KeyError", "order 9 not found", "billing")
    assert shape_alike == keys["billing"]
    dead = _retry_item("billing").to_dead_letter(reason="failed after 3 retries", now=NOW)
    assert dead.failure_group == keys["billing"]
    assert replace(dead, service=DEFAULT_SERVICE).failure_group == DEFAULT_GROUP


# records carry their service -------------------------------------------------------


def _retry_item(service: str = DEFAULT_SERVICE) -> RetryItem:
    return RetryItem.for_failure(
        EVENT,
        "count_like",
        ErrorInfo("order 17 not found", "KeyError"),
        attempt=1,
        max_retries=3,
        next_retry=NOW + timedelta(seconds=5),
        now=NOW,
        service=service,
    )


def test_records_are_of_the_default_service_unless_named() -> None:
    assert _retry_item().service == DEFAULT_SERVICE
    dead = DeadLetterItem.for_failure(
        EVENT,
        "count_like",
        ErrorInfo("boom", "ValueError"),
        reason="non-retryable: ValueError",
        attempt=0,
        max_retries=3,
        now=NOW,
    )
    assert dead.service == DEFAULT_SERVICE


def test_every_transform_keeps_the_service() -> None:
    item = _retry_item("billing")
    assert item.service == "billing"
    later = item.rescheduled(
        attempt=2, next_retry=NOW + timedelta(minutes=1), error=ErrorInfo("x", "E"), now=NOW
    )
    assert later.service == "billing"
    dead = later.to_dead_letter(reason="failed after 3 retries", now=NOW)
    assert dead.service == "billing"
    assert later.to_dead_letter(reason="copied", now=NOW, copy=True).service == "billing"
    requeued = dead.to_retry_item(max_retries=3, now=NOW)
    assert requeued.service == "billing"
    assert requeued.metadata["requeued_from"] == dead.id
    failed = DeadLetterItem.for_failure(
        EVENT,
        "count_like",
        ErrorInfo("boom", "ValueError"),
        reason="non-retryable: ValueError",
        attempt=0,
        max_retries=3,
        now=NOW,
        service="billing",
    )
    assert failed.service == "billing"
    assert failed.to_retry_item(max_retries=3, now=NOW).service == "billing"


def test_the_event_is_the_same_whatever_the_service() -> None:
    assert _retry_item("billing").to_event() == _retry_item().to_event() == EVENT
    dead = _retry_item("billing").to_dead_letter(reason="r", now=NOW)
    assert dead.to_event() == EVENT


def test_a_damaged_records_dead_letter_keeps_a_service_it_could_read() -> None:
    raw = {"id": "retry_1", "handler_name": "count_like", "service": "billing"}
    dead = corrupt_to_dead_letter(CorruptRecord("retry_1", raw, "bad"), NOW, "undecodable")
    assert dead.service == "billing"
    for service in (None, "", "no/slash", "x" * 65):
        raw = {"id": "retry_1", "service": service}
        dead = corrupt_to_dead_letter(CorruptRecord("retry_1", raw, "bad"), NOW, "undecodable")
        assert dead.service == DEFAULT_SERVICE


# the shared record codec -----------------------------------------------------------


def test_the_codec_writes_the_service_and_reads_it_back() -> None:
    item = _retry_item("billing")
    fields = CODEC.retry_fields(item)
    assert fields["service"] == "billing"
    assert CODEC.retry_item(fields) == item
    dead = item.to_dead_letter(reason="failed after 3 retries", now=NOW)
    dead_fields = CODEC.dead_letter_fields(dead)
    assert dead_fields["service"] == "billing"
    assert dead_fields["failure_group"] == dead.failure_group
    assert CODEC.dead_letter(dead_fields) == dead


def test_a_record_without_a_service_is_of_the_default_service() -> None:
    # a row written before services, or by an engine that does not keep them yet
    item = _retry_item()
    for stored in (None, "absent"):
        fields = CODEC.retry_fields(item)
        if stored == "absent":
            del fields["service"]
        else:
            fields["service"] = stored
        assert CODEC.retry_item(fields) == item
    dead = item.to_dead_letter(reason="failed after 3 retries", now=NOW)
    dead_fields = CODEC.dead_letter_fields(dead)
    del dead_fields["service"]
    assert CODEC.dead_letter(dead_fields) == dead


def test_a_damaged_service_makes_a_retry_item_undecodable_and_a_dead_letter_default() -> None:
    for damaged in (17, "", "a/b", "billing\x00"):  # a record a store could not key
        fields = CODEC.retry_fields(_retry_item())
        fields["service"] = damaged
        with pytest.raises(ValueError, match="service"):
            CODEC.retry_item(fields)
    dead_fields = CODEC.dead_letter_fields(_retry_item().to_dead_letter(reason="r", now=NOW))
    dead_fields["service"] = 17
    assert CODEC.dead_letter(dead_fields).service == DEFAULT_SERVICE


# names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "billing", "b", "9", "A.b_c-9", "x" * 64])
def test_a_service_name_is_letters_digits_dots_underscores_and_dashes(name: str) -> None:
    assert check_service(name) == name
    assert is_service_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-billing",
        ".billing",
        "_billing",
        "bill/ing",
        "bill ing",
        "x" * 65,
        "café",
        "billing\n",
        "bill\x00ing",
        None,
        7,
    ],
)
def test_any_other_service_name_is_refused_with_the_value(name: object) -> None:
    assert not is_service_name(name)
    with pytest.raises(ValueError, match="1 to 64 letters") as refused:
        check_service(name)
    assert repr(name) in str(refused.value)


# the bus ---------------------------------------------------------------------------


def test_a_bus_of_another_service_runs_on_the_memory_store() -> None:
    assert EventBus(MemoryStore(), service="billing").service == "billing"


def test_a_bus_is_of_the_default_service_unless_named() -> None:
    bus = EventBus()
    assert bus.service == DEFAULT_SERVICE == bus.core.service
    assert EventBus(MemoryStore(), service="default").service == DEFAULT_SERVICE


def test_a_bus_refuses_a_service_name_that_is_not_one() -> None:
    with pytest.raises(ValueError, match="'bill/ing'"):
        EventBus(MemoryStore(), service="bill/ing")


async def test_a_service_bus_writes_records_of_its_service() -> None:
    clock = ManualClock(NOW)
    store = MemoryStore()
    bus = EventBus(store, service="billing", clock=clock)
    assert (bus.service, bus.core.service) == ("billing", "billing")
    bus.subscribe("order.placed", lambda event: None, name="count_like")

    @bus.handler("order.placed", name="charge")
    async def charge(event: Event) -> None:
        raise ValueError("card declined")

    await bus.publish(EVENT, defer=True)
    pending = {item.handler_name: item for item in await store.list_retry(limit=10, offset=0)}
    assert {item.service for item in pending.values()} == {"billing"}
    assert pending["charge"].id == delivery_id("svc", "event-1", "charge", "billing")
    await bus.retry_queue.add(EVENT, "count_like", "boom")
    assert {item.service for item in await store.list_retry(limit=10, offset=0)} == {"billing"}


async def test_a_service_bus_records_a_failed_first_call_in_its_service() -> None:
    clock = ManualClock(NOW)
    store = MemoryStore()
    bus = EventBus(store, service="billing", clock=clock, durable=False)

    @bus.handler("order.placed", name="charge")
    async def charge(event: Event) -> None:
        raise ValueError("card declined")

    result = await bus.publish(EVENT)
    (item,) = result.retry_items
    assert item.service == "billing"
    assert (await store.get_retry(item.id)) == item


# the store protocol's services part ----------------------------------------------------


class Bare(ServiceStore):
    """An engine that implements none of the services part."""


def test_an_engine_must_implement_every_method_of_the_services_part() -> None:
    assert ServiceStore.__abstractmethods__ == {
        "put_subscriptions",
        "remove_subscriptions",
        "list_subscriptions",
        "subscriptions_revision",
        "forget_subscriptions",
        "dead_letter_unsubscribed",
        "beat",
        "forget_worker",
        "list_workers",
        "prune_workers",
        "service_loads",
    }
    with pytest.raises(TypeError, match="abstract") as refused:
        Bare()  # type: ignore[abstract]
    assert "put_subscriptions" in str(refused.value)
    assert not MemoryStore.__abstractmethods__


# dead letter filters and reasons ---------------------------------------------------


def test_a_dead_letter_filter_takes_a_service() -> None:
    where = DeadLetterFilter.parse({"service": "billing", "handler": "charge"}, NOW)
    assert where == DeadLetterFilter(service="billing", handler_name="charge")
    assert where.to_query() == {"handler": "charge", "service": "billing"}
    assert DeadLetterFilter.from_dict(where.to_dict()) == where
    assert filter_from(None, {"service": "billing"}) == DeadLetterFilter(service="billing")
    letter = _retry_item("billing").to_dead_letter(reason="r", now=NOW)
    assert where.narrowed(handler_name="count_like").matches(letter)
    assert not DeadLetterFilter(service="shipping").matches(letter)
    assert not DeadLetterFilter(service=DEFAULT_SERVICE).matches(letter)
    with pytest.raises(ValueError, match="'bill/ing'"):
        DeadLetterFilter(service="bill/ing")
    with pytest.raises(ValueError, match="or service"):
        DeadLetterFilter.parse({"services": "billing"}, NOW)


def test_a_removed_subscriptions_dead_letters_have_a_reason_kind_of_their_own() -> None:
    reason = unsubscribed_reason("billing", "charge", "alice")
    assert reason == "subscription removed: billing/charge (by alice)"
    assert reason_kind(reason) == "subscription_removed"
