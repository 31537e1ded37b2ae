"""Event types: registration, the stamp at publish, upcasting on read, typed
handlers, and what a delivery that cannot be read becomes (on the memory store
and SQLite; tests/test_versioning_engines.py runs the stored paths on every engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from retrybus import (
    Event,
    EventBus,
    InvalidEventData,
    ManualClock,
    RetryWorker,
    UnknownVersion,
    UpcastFailed,
    open_store,
)
from retrybus._event_types import EventTypes, stored_version


class LikeAdded(BaseModel):
    """Version 3 of like.added: ``post`` became ``post_id`` (an int) in v2, ``source`` came in v3."""

    post_id: int
    user_id: str | None = None
    source: str = "web"


def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["post_id"] = int(data.pop("post"))
    return data


def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "source": data.get("source", "web")}


def register_v3(bus: EventBus, **options: Any) -> None:
    bus.event_type(
        "like.added",
        version=3,
        schema=LikeAdded,
        upcasters={1: v1_to_v2, 2: v2_to_v3},
        aliases=("social.like",),
        **options,
    )


def v1(data: dict[str, Any], type: str = "like.added") -> Event:
    return Event(type, data, extensions={"dataversion": "1"})


# the chain ---------------------------------------------------------------------


async def test_a_v1_event_reaches_handlers_as_v3() -> None:
    bus = EventBus()
    register_v3(bus)
    plain: list[Event] = []
    typed: list[tuple[Event, LikeAdded]] = []
    bus.subscribe("like.added", plain.append, name="plain")

    @bus.handler("like.added", name="typed")
    async def count(event: Event, data: LikeAdded) -> None:
        typed.append((event, data))

    published = v1({"post": "7", "user_id": "u1"})
    result = await bus.publish(published)
    assert result.succeeded == ("plain", "typed")
    assert plain[0].data == {"post_id": 7, "user_id": "u1", "source": "web"}
    assert plain[0].extensions["dataversion"] == "3"
    event, data = typed[0]
    assert data == LikeAdded(post_id=7, user_id="u1", source="web")
    assert event.id == published.id
    # what was published is left as it was: upcasting works on the call's own copy
    assert published.data == {"post": "7", "user_id": "u1"}
    assert published.extensions["dataversion"] == "1"


async def test_an_event_under_an_alias_reaches_the_types_handlers_as_the_type() -> None:
    bus = EventBus()
    register_v3(bus)
    seen: list[Event] = []
    bus.subscribe("like.added", seen.append, name="count")
    result = await bus.publish(v1({"post": "3"}, type="social.like"))
    assert result.succeeded == ("count",)
    assert seen[0].type == "like.added"
    assert seen[0].data == {"post_id": 3, "source": "web"}
    # a publish under the alias keeps the name it was given (other services may know only it)
    assert result.event.type == "social.like"


valid_v1 = st.fixed_dictionaries(
    {"post": st.integers(min_value=-(2**53), max_value=2**53).map(str)},
    optional={
        "user_id": st.one_of(st.none(), st.text(max_size=20)),
        "source": st.sampled_from(["web", "ios", "android"]),
    },
)


@settings(max_examples=200, deadline=None)
@given(valid_v1)
def test_every_valid_v1_payload_upcasts_to_a_valid_v3_model(payload: dict[str, Any]) -> None:
    types = EventTypes()
    types.register("like.added", version=3, schema=LikeAdded, upcasters={1: v1_to_v2, 2: v2_to_v3})
    event = types.read(Event("like.added", payload, extensions={"dataversion": "1"}).copy())
    model = types.model(event)
    assert isinstance(model, LikeAdded)
    assert model.post_id == int(payload["post"])
    assert model.source == payload.get("source", "web")
    assert stored_version(event) == 3


def test_an_event_without_a_version_is_version_1() -> None:
    assert stored_version(Event("x", {})) == 1
    assert stored_version(Event("x", {}, extensions={"dataversion": "4"})) == 4
    assert stored_version(Event("x", {}, extensions={"dataversion": "v4"})) == "v4"


def test_an_upcaster_may_ask_for_the_event() -> None:
    types = EventTypes()
    types.register("order.placed", version=2, upcasters={1: lambda d, e: {**d, "source": e.source}})
    event = types.read(Event("order.placed", {}, source="shop").copy())
    assert event.data == {"source": "shop"}


# publish -----------------------------------------------------------------------


async def test_publish_stamps_the_version_and_the_dataschema() -> None:
    bus = EventBus()
    bus.event_type("order.placed", version=2, upcasters={1: dict}, dataschema="urn:order/2")
    result = await bus.publish(Event("order.placed", {"n": 1}))
    assert result.event.extensions == {"dataversion": "2", "dataschema": "urn:order/2"}
    assert result.event.to_dict()["dataschema"] == "urn:order/2"
    # an unregistered type is published as it is
    plain = await bus.publish(Event("other", {}))
    assert plain.event.extensions == {}


async def test_data_that_fails_the_schema_raises_naming_the_field_and_records_nothing(
    tmp_path: Path,
) -> None:
    async with EventBus(open_store(f"sqlite:///{tmp_path}/bus.db")) as bus:
        register_v3(bus)
        calls: list[Event] = []
        bus.subscribe("like.added", calls.append, name="count")
        with pytest.raises(ValueError, match=r"post_id: Input should be a valid integer") as info:
            await bus.publish(Event("like.added", {"post_id": "seven"}))
        assert "'seven'" in str(info.value)
        with pytest.raises(ValueError, match="post_id"):
            await bus.publish(Event("like.added", {"user_id": "u"}), defer=True)
        with pytest.raises(ValueError, match="post_id"):
            await bus.publish(Event("like.added", {}), deliver_in=60)
        # an older version states what it is: its data is validated as upcast
        with pytest.raises(ValueError, match=r"cannot publish like.added: upcast failed v1→v2"):
            await bus.publish(v1({"post_id": 3}))
        assert calls == []
        assert (await bus.stats()).retry_queue_size == 0
        assert await bus.retry_queue.list() == []


async def test_validation_can_be_left_to_delivery_or_off() -> None:
    bus = EventBus()
    register_v3(bus, validate="deliver")
    seen: list[Event] = []
    bus.subscribe("like.added", seen.append, name="count")
    result = await bus.publish(Event("like.added", {"post_id": "seven"}))
    assert result.dead_lettered == ("count",)
    (dead,) = await bus.dead_letters.list()
    assert dead.reason.startswith("invalid like.added v3 data: post_id:")
    assert dead.error_type.endswith("InvalidEventData")
    assert seen == []
    unchecked = EventBus()
    register_v3(unchecked, validate=None)
    unchecked.subscribe("like.added", seen.append, name="count")
    assert (await unchecked.publish(Event("like.added", {"post_id": "seven"}))).ok
    assert InvalidEventData.__mro__[1].__name__ == "VersionError"


# deliveries that cannot be read ------------------------------------------------


async def test_an_upcaster_that_raises_dead_letters_at_once_with_its_step() -> None:
    clock = ManualClock()
    bus = EventBus(clock=clock)
    bus.event_type("like.added", version=2, upcasters={1: lambda d: {"post_id": d["post"]}})
    calls: list[Event] = []
    bus.subscribe("like.added", calls.append, name="count")
    result = await bus.publish(v1({"id": 1}))
    assert result.dead_lettered == ("count",)
    (dead,) = await bus.dead_letters.list()
    assert dead.reason == "upcast failed v1→v2: KeyError 'post' (like.added)"
    assert dead.error_type.endswith("UpcastFailed")
    assert dead.attempt == 0
    assert dead.event_data == {"id": 1}
    assert dead.event_extensions == {"dataversion": "1"}
    assert calls == []
    # fixed, the same dead letter is delivered with its original payload
    bus.event_type("like.added", version=2, upcasters={1: lambda d: {"post_id": d.get("post")}})
    await bus.dead_letters.reprocess(dead.id)
    assert calls[0].data == {"post_id": None}


async def test_a_version_newer_than_the_code_knows_waits_for_the_deploy() -> None:
    bus = EventBus()
    register_v3(bus)
    seen: list[Event] = []
    bus.subscribe("like.added", seen.append, name="count")
    result = await bus.publish(
        Event("like.added", {"post_id": 1, "kind": "heart"}, extensions={"dataversion": "4"})
    )
    assert result.dead_lettered == ("count",)
    (dead,) = await bus.dead_letters.list()
    assert dead.reason == "unknown version 4 of like.added (this code knows up to 3)"
    bus.event_type("like.added", version=4, upcasters={1: v1_to_v2, 2: v2_to_v3, 3: dict})
    await bus.dead_letters.reprocess(dead.id)
    assert seen[0].data == {"post_id": 1, "kind": "heart"}
    assert seen[0].extensions["dataversion"] == "4"


async def test_an_unknown_version_can_be_delivered_as_it_is() -> None:
    bus = EventBus()
    register_v3(bus, unknown_version="deliver")
    seen: list[Event] = []
    bus.subscribe("like.added", seen.append, name="count")
    assert (await bus.publish(Event("like.added", {"z": 1}, extensions={"dataversion": "9"}))).ok
    assert seen[0].data == {"z": 1}


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("two", "unknown version 'two' of like.added (not a version number)"),
        ("0", "unknown version 0 of like.added (not a version number)"),
    ],
)
async def test_a_version_that_is_no_number_is_dead_lettered(version: str, reason: str) -> None:
    bus = EventBus()
    register_v3(bus)
    with pytest.raises(ValueError, match=re.escape(f"cannot publish like.added: {reason}")):
        await bus.publish(Event("like.added", {}, extensions={"dataversion": version}))
    register_v3(bus, validate=None)  # as a producer that does not validate would publish it
    bus.subscribe("like.added", lambda e: None, name="count")
    await bus.publish(Event("like.added", {}, extensions={"dataversion": version}))
    (dead,) = await bus.dead_letters.list()
    assert dead.reason == reason


async def test_a_version_older_than_the_first_upcaster_is_dead_lettered() -> None:
    bus = EventBus()
    bus.event_type("like.added", version=3, upcasters={2: v2_to_v3})
    bus.subscribe("like.added", lambda e: None, name="count")
    await bus.publish(v1({"post": "1"}))
    (dead,) = await bus.dead_letters.list()
    assert dead.reason.startswith("unknown version 1 of like.added (this code reads 2 to 3")
    with pytest.raises(UnknownVersion):
        bus.core.types.read(v1({}))


async def test_the_worker_delivers_a_retry_as_the_current_version(tmp_path: Path) -> None:
    clock = ManualClock()
    async with EventBus(open_store(f"sqlite:///{tmp_path}/bus.db"), clock=clock) as bus:
        register_v3(bus)
        attempts: list[LikeAdded] = []

        @bus.handler("like.added", name="count")
        async def count(data: LikeAdded) -> None:  # the model only
            attempts.append(data)
            if len(attempts) == 1:
                raise ConnectionError("down")

        result = await bus.publish(v1({"post": "5"}))
        assert result.retrying == ("count",)
        (item,) = await bus.retry_queue.list()
        assert item.event_data == {"post": "5"}  # stored as published
        clock.advance(3600)
        assert await RetryWorker(bus).run_once() == 1
        assert attempts == [LikeAdded(post_id=5), LikeAdded(post_id=5)]


# registration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"version": 0}, "version of like.added must be an int >= 1, got 0"),
        ({"version": 3, "upcasters": {3: dict}}, "keyed by the version they lift"),
        ({"version": 4, "upcasters": {1: dict, 3: dict}}, r"skip version\(s\) 2"),
        ({"version": 2, "upcasters": {1: "no"}}, "upcaster 1 of like.added must be callable"),
        ({"validate": "always"}, "validate must be 'publish', 'deliver', 'both' or None"),
        ({"unknown_version": "drop"}, "unknown_version must be 'dead_letter' or 'deliver'"),
        ({"aliases": ("like.added",)}, "aliases of like.added must be other type names"),
        ({"schema": 42}, "schema must be a pydantic model or a callable"),
    ],
)
def test_bad_registrations_say_what_is_wrong(options: dict[str, Any], message: str) -> None:
    bus = EventBus()
    with pytest.raises((ValueError, TypeError), match=message):
        bus.event_type("like.added", **options)


def test_a_name_is_one_types_only() -> None:
    bus = EventBus()
    register_v3(bus)
    with pytest.raises(ValueError, match=r"'social\.like' is already registered, as like\.added"):
        bus.event_type("social.like")
    with pytest.raises(ValueError, match="without wildcards"):
        bus.event_type("like.*")
    # registering the type again replaces it, its old aliases with it
    bus.event_type("like.added", version=1)
    bus.event_type("social.like")
    assert [t.name for t in bus.event_types] == ["like.added", "social.like"]


def test_a_callable_schema_validates_and_its_result_is_the_model() -> None:
    def positive(data: Any) -> int:
        if not isinstance(data, int) or data <= 0:
            raise ValueError(f"not a positive int: {data!r}")
        return data

    types = EventTypes()
    types.register("n", schema=positive)
    assert types.model(Event("n", 3)) == 3
    with pytest.raises(
        InvalidEventData, match=r"invalid n v1 data: ValueError: not a positive int: -1"
    ):
        types.model(Event("n", -1))


async def test_register_stores_versions_aliases_and_the_services_types() -> None:
    bus = EventBus(service="social")
    register_v3(bus)
    bus.subscribe("like.added", lambda e: None, name="count")
    bus.subscribe("like.*", lambda e: None, name="all_likes")
    bus.subscribe("comment.added", lambda e: None, name="comments")
    await bus.register()
    stored = {s.handler_name: s for s in await bus.services.list("social")}
    assert stored["count"].patterns == ("like.added", "social.like")
    assert stored["count"].details == {"versions": {"like.added": 3}}
    assert stored["all_likes"].patterns == ("like.*", "social.like")
    assert stored["all_likes"].details == {"versions": {"like.added": 3}}
    assert stored["comments"].details == {}
    (described,) = (await bus.services.event_types())["social"]
    assert described["type"] == "like.added"
    assert described["versions"] == [1, 2, 3]
    assert described["schema"] == f"{__name__}.LikeAdded"
    assert described["aliases"] == ["social.like"]


def test_preview_reads_a_stored_event_without_changing_it() -> None:
    types = EventTypes()
    types.register("like.added", version=3, schema=LikeAdded, upcasters={1: v1_to_v2, 2: v2_to_v3})
    stored = v1({"post": "9"})
    reading = types.preview(stored)
    assert (reading.stored_version, reading.current_version, reading.upcast) == (1, 3, True)
    assert reading.data == {"post_id": 9, "source": "web"}
    assert stored.data == {"post": "9"}
    broken = types.preview(v1({"id": 9}))
    assert broken.error == "upcast failed v1→v2: KeyError 'post' (like.added)"
    assert broken.data is None
    assert types.preview(Event("other", {})).current_version is None
    with pytest.raises(UpcastFailed):
        types.read(v1({"id": 9}).copy())


async def test_an_upcaster_that_changes_its_data_in_place_changes_nothing_stored() -> None:
    clock = ManualClock()
    bus = EventBus(clock=clock)

    def in_place(data: dict[str, Any]) -> dict[str, Any]:
        data["post_id"] = int(data.pop("post"))
        return data

    bus.event_type("like.added", version=2, upcasters={1: in_place})
    seen: list[Any] = []

    @bus.handler("like.added", name="first")
    async def first(event: Event) -> None:
        seen.append(event.data)
        raise ConnectionError("down")

    bus.subscribe("like.added", lambda e: seen.append(e.data), name="second")
    published = v1({"post": "4"})
    result = await bus.publish(published)
    assert result.retrying == ("first",)
    assert seen == [{"post_id": 4}, {"post_id": 4}]
    assert published.data == {"post": "4"}
    (item,) = await bus.retry_queue.list()
    assert item.event_data == {"post": "4"}
    clock.advance(3600)
    await RetryWorker(bus).run_once()
    assert seen[-1] == {"post_id": 4}
    (item,) = await bus.retry_queue.list()
    assert item.event_data == {"post": "4"}
