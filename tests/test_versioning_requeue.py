"""Edit-and-requeue at the current version, and ``bus.dead_letters.reading``:
a dead letter stored at v1, read and edited by a bus that knows v3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from conftest import fresh_store
from retrybus import DeadLetterItem, Event, EventBus, ItemNotFound, ManualClock, RetryWorker, Store

# memory, SQLite and PostgreSQL: requeue is one store step the conformance suite
# covers on every engine; what is new here is what goes into it
ENGINES = ["memory", "sqlite", "postgresql"]
DATASCHEMA = "https://example.com/schemas/like.added/3"


class LikeAdded(BaseModel):
    post_id: int
    source: str


def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["post_id"] = int(data.pop("post"))
    return data


def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "source": data.get("source", "web")}


def broken_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"post_id": data["no such field"]}


@pytest.fixture(params=ENGINES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with fresh_store(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture
def bus(store: Store, clock: ManualClock) -> EventBus:
    """A bus that knows like.added at v3 (also as social.like), on a store where
    a bus that knew only v1 left dead letters."""
    bus = EventBus(store, clock=clock)
    bus.event_type(
        "like.added",
        version=3,
        schema=LikeAdded,
        upcasters={1: v1_to_v2, 2: v2_to_v3},
        aliases=("social.like",),
        dataschema=DATASCHEMA,
    )
    return bus


async def v1_dead_letter(
    bus: EventBus, event_type: str = "like.added", *, data: Any = None, version: str | None = None
) -> DeadLetterItem:
    """A dead letter as a bus that knew only v1 wrote it (no ``dataversion``, or
    the one given), recorded without stamping."""
    extensions = {} if version is None else {"dataversion": version}
    event = Event(event_type, data or {"post": "7"}, source="social", extensions=extensions)
    item = await bus.retry_queue.add(event, "count", TimeoutError("slow"))
    dead = await bus.dead_letters.add(item, reason="failed after 3 retries")
    await bus.retry_queue.delete(item.id)
    return dead


async def test_edit_and_requeue_stores_the_edited_payload_as_the_current_version(
    bus: EventBus,
) -> None:
    dead = await v1_dead_letter(bus)
    retry = await bus.dead_letters.requeue(
        dead.id, data={"post_id": 8, "source": "app"}, actor="ana"
    )
    stored = await bus.retry_queue.get(retry.id)
    assert stored.event_data == {"post_id": 8, "source": "app"}
    assert stored.event_type == "like.added"
    assert stored.event_extensions == {"dataversion": "3", "dataschema": DATASCHEMA}
    (edit,) = stored.metadata["edits"]
    assert edit["original_data"] == {"post": "7"}
    assert (edit["original_version"], edit["version"], edit["by"]) == (1, 3, "ana")
    assert edit["data"] == {"post_id": 8, "source": "app"}


async def test_an_edited_item_is_delivered_as_edited_without_upcasting(
    bus: EventBus, clock: ManualClock
) -> None:
    received: list[Any] = []
    bus.subscribe("like.added", lambda event: received.append(event.data), name="count")
    dead = await v1_dead_letter(bus)
    await bus.dead_letters.requeue(dead.id, data={"post_id": 8, "source": "app"})
    assert await RetryWorker(bus).run_once() == 1
    assert received == [{"post_id": 8, "source": "app"}]


async def test_edit_of_an_alias_keeps_the_stored_type_name(bus: EventBus) -> None:
    dead = await v1_dead_letter(bus, "social.like")
    retry = await bus.dead_letters.requeue(dead.id, data={"post_id": 8, "source": "web"})
    stored = await bus.retry_queue.get(retry.id)
    assert stored.event_type == "social.like"
    assert stored.event_extensions["dataversion"] == "3"


async def test_requeue_without_data_keeps_payload_and_version_and_delivery_upcasts(
    bus: EventBus,
) -> None:
    received: list[Any] = []
    bus.subscribe("like.added", lambda event: received.append(event.data), name="count")
    dead = await v1_dead_letter(bus, version="1")
    retry = await bus.dead_letters.requeue(dead.id)
    stored = await bus.retry_queue.get(retry.id)
    assert (stored.event_data, dict(stored.event_extensions)) == (
        {"post": "7"},
        {"dataversion": "1"},
    )
    assert "edits" not in stored.metadata
    assert await RetryWorker(bus).run_once() == 1
    assert received == [{"post_id": 7, "source": "web"}]


async def test_an_edit_that_fails_the_schema_names_the_field_and_changes_nothing(
    bus: EventBus,
) -> None:
    dead = await v1_dead_letter(bus)
    with pytest.raises(ValueError, match="post_id"):
        await bus.dead_letters.requeue(dead.id, data={"post_id": "seven", "source": "web"})
    assert await bus.dead_letters.get(dead.id) == dead
    assert await bus.retry_queue.count() == 0


async def test_an_edit_keeps_a_stored_version_that_is_not_a_number_as_text(
    bus: EventBus,
) -> None:
    dead = await v1_dead_letter(bus, data={"post_id": 1, "source": "x"}, version="beta")
    retry = await bus.dead_letters.requeue(dead.id, data={"post_id": 2, "source": "x"})
    (edit,) = (await bus.retry_queue.get(retry.id)).metadata["edits"]
    assert (edit["original_version"], edit["version"]) == ("beta", 3)


async def test_edit_of_an_unregistered_type_is_as_before(bus: EventBus) -> None:
    dead = await v1_dead_letter(bus, "comment.created", data={"text": "hi"}, version="2")
    retry = await bus.dead_letters.requeue(dead.id, data={"text": "hello"})
    stored = await bus.retry_queue.get(retry.id)
    assert (stored.event_data, dict(stored.event_extensions)) == (
        {"text": "hello"},
        {"dataversion": "2"},
    )
    (edit,) = stored.metadata["edits"]
    assert set(edit) == {"at", "by", "original_data", "data"}


async def test_reading_gives_the_stored_and_current_versions_and_the_upcast_data(
    bus: EventBus,
) -> None:
    dead = await v1_dead_letter(bus, "social.like")
    reading = await bus.dead_letters.reading(dead.id)
    assert (reading.event_type, reading.stored_version, reading.current_version) == (
        "like.added",
        1,
        3,
    )
    assert (reading.data, reading.error, reading.upcast) == (
        {"post_id": 7, "source": "web"},
        None,
        True,
    )
    assert await bus.dead_letters.reading(dead) == reading
    assert (await bus.dead_letters.get(dead.id)).event_data == {"post": "7"}


async def test_reading_gives_the_reason_a_broken_upcaster_would_dead_letter(
    bus: EventBus,
) -> None:
    bus.event_type("like.added", version=3, upcasters={1: broken_v1_to_v2, 2: v2_to_v3})
    reading = await bus.dead_letters.reading(await v1_dead_letter(bus))
    assert reading.data is None
    assert reading.error is not None
    assert reading.error.startswith("upcast failed v1→v2: KeyError")


async def test_reading_an_unknown_id_raises(bus: EventBus) -> None:
    with pytest.raises(ItemNotFound):
        await bus.dead_letters.reading("dlq_nope")
