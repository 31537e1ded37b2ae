"""An app for ``retrybus events`` tests: ``like.added`` at v3 (v1 named the post
``post``, as text; v3 added ``source``), also known as ``social.like``; and
``comment.created`` at v1 without a schema. ``unbuildable`` registers a type whose
pydantic model builds no JSON schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from retrybus import Event, EventBus, open_store


class LikeAdded(BaseModel):
    post_id: int
    source: str


def rename_post(data: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: ``post`` (text) became ``post_id`` (int)."""
    data = dict(data)
    data["post_id"] = int(data.pop("post"))
    return data


def default_source(data: dict[str, Any], event: Event) -> dict[str, Any]:
    """v2 → v3: ``source`` added, the event's source when the data has none."""
    return {**data, "source": data.get("source", event.source or "web")}


bus = EventBus(open_store("memory://"))
bus.event_type(
    "like.added",
    version=3,
    schema=LikeAdded,
    upcasters={1: rename_post, 2: default_source},
    aliases=("social.like",),
    dataschema="https://example.com/schemas/like.added/3",
)
bus.event_type("comment.created", validate=None)


@bus.handler("like.added", name="count")
async def count(event: Event, data: LikeAdded) -> None:
    """Counts a like."""


class Opaque:
    pass


class WithOpaque(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: Opaque


unbuildable = EventBus(open_store("memory://"))
unbuildable.event_type("thing.made", schema=WithOpaque)
