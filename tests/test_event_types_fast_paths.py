"""The shortcuts of the event types' hot paths (the stamp, a read with nothing
to do, a handler call's read and check) give what the long way gives."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from retrybus import Event
from retrybus._errors import InvalidEventData, UnknownVersion
from retrybus._event_types import EventTypes


class Liked(BaseModel):
    post_id: int
    public: bool


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"post_id": data["post"]}


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "public": True}


def _types(**options: Any) -> EventTypes:
    types = EventTypes()
    types.register(
        "like.added",
        version=3,
        schema=Liked,
        upcasters={1: _v1_to_v2, 2: _v2_to_v3},
        aliases=("social.like",),
        **options,
    )
    return types


def _event(data: Any, type: str = "like.added", **extensions: str) -> Event:
    return Event(
        type,
        data,
        source="shop",
        id="e-1",
        time=datetime(2026, 1, 2, tzinfo=UTC),
        subject="post-7",
        extensions=extensions,
    )


def test_the_stamp_adds_the_version_and_the_dataschema_beside_other_extensions() -> None:
    types = _types(dataschema="https://example.com/like/3")
    bare = types.stamp(_event({"post_id": 7, "public": True}))
    traced = types.stamp(_event({"post_id": 7, "public": True}, traceparent="00-ab-cd-01"))
    assert dict(bare.extensions) == {
        "dataversion": "3",
        "dataschema": "https://example.com/like/3",
    }
    assert dict(traced.extensions) == {**bare.extensions, "traceparent": "00-ab-cd-01"}
    assert (traced.id, traced.source, traced.subject) == ("e-1", "shop", "post-7")
    assert traced.data_json == '{"post_id":7,"public":true}'
    with pytest.raises(TypeError):
        bare.extensions["dataversion"] = "1"  # type: ignore[index]


def test_a_version_written_another_way_reads_as_the_same_number() -> None:
    types = _types()
    padded = _event({"post_id": 7, "public": True}, dataversion="03")
    assert types.read(padded) is padded
    assert types.read(_event({"post_id": 7, "public": True}, dataversion="3")).data == {
        "post_id": 7,
        "public": True,
    }


def test_an_upcast_keeps_the_other_extensions_and_leaves_the_stored_event_alone() -> None:
    types = _types()
    stored = _event({"post": 7}, traceparent="00-ab-cd-01")
    read = types.read(stored.copy())
    assert read.data == {"post_id": 7, "public": True}
    assert dict(read.extensions) == {"traceparent": "00-ab-cd-01", "dataversion": "3"}
    assert (read.type, read.id, read.time, read.subject) == (
        "like.added",
        "e-1",
        stored.time,
        "post-7",
    )
    assert read.data_json == '{"post_id":7,"public":true}'
    assert stored.data == {"post": 7}
    assert dict(stored.extensions) == {"traceparent": "00-ab-cd-01"}


@pytest.mark.parametrize("validate", ["publish", "deliver", "both", None])
@pytest.mark.parametrize(
    "event",
    [
        _event({"post_id": 7, "public": True}, dataversion="3"),
        _event({"post_id": 7, "public": True}, "social.like", dataversion="3"),
        _event({"post": 7}),
        _event({"post": "x"}, "social.like", dataversion="1", traceparent="00-ab-cd-01"),
        _event({"post_id": "x", "public": True}, dataversion="3"),
        _event({"post_id": 7}, dataversion="4"),
        _event({"post_id": 7}, dataversion="v2"),
    ],
)
@pytest.mark.parametrize("unknown_version", ["dead_letter", "deliver"])
def test_a_handler_calls_read_is_read_then_check_delivery(
    event: Event, validate: Any, unknown_version: Any
) -> None:
    types = _types(validate=validate, unknown_version=unknown_version)

    def long_way() -> Event | type[Exception]:
        try:
            read = types.read(event.copy())
            types.check_delivery(read)
        except (InvalidEventData, UnknownVersion) as exc:
            return type(exc)
        return read

    def short_way() -> Event | type[Exception]:
        try:
            return types.delivered(event.copy())
        except (InvalidEventData, UnknownVersion) as exc:
            return type(exc)

    assert short_way() == long_way()
