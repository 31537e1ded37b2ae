"""The event type the versioning tests share: ``like.added`` at versions 1, 3 and 4.

- v1: ``{"post": "42", "user": "ana"}`` (the post's id as text);
- v2: ``post`` renamed ``post_id``, an int;
- v3: ``source`` added, ``"web"`` unless given; known by the old name ``social.like``;
- v4: ``reaction`` added, ``"like"`` unless given.

``register_v3`` and ``register_v4`` register the type on a bus as the code of that
version would; a bus that knows only v1 registers nothing (or ``register_v1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from retrybus import EventBus, EventType
from retrybus._event_types import Upcaster

__all__ = [
    "ALIAS",
    "TYPE",
    "UPCASTERS_V3",
    "UPCASTERS_V4",
    "V1_DATA",
    "V3_DATA",
    "V4_DATA",
    "LikeAdded",
    "LikeAddedV4",
    "buggy_v1_to_v2",
    "register_v1",
    "register_v3",
    "register_v4",
    "v1_to_v2",
    "v2_to_v3",
    "v3_to_v4",
]

TYPE = "like.added"
ALIAS = "social.like"

V1_DATA: dict[str, Any] = {"post": "42", "user": "ana"}
#: ``V1_DATA`` read as v3
V3_DATA: dict[str, Any] = {"post_id": 42, "user": "ana", "source": "web"}
V4_DATA: dict[str, Any] = {"post_id": 7, "user": "bo", "source": "app", "reaction": "heart"}


class LikeAdded(BaseModel):
    """``like.added`` at version 3."""

    post_id: int
    user: str
    source: str


class LikeAddedV4(BaseModel):
    """``like.added`` at version 4."""

    post_id: int
    user: str
    source: str
    reaction: str


def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """``post`` (text) renamed ``post_id`` (an int)."""
    lifted = {key: value for key, value in data.items() if key != "post"}
    lifted["post_id"] = int(data["post"])
    return lifted


def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """``source`` added: ``"web"``, the only source there was before v3."""
    return {"source": "web", **data}


def v3_to_v4(data: dict[str, Any]) -> dict[str, Any]:
    """``reaction`` added: ``"like"``, the only reaction there was before v4."""
    return {"reaction": "like", **data}


def buggy_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """The rename done wrong: it reads a field v1 never had (``KeyError 'postid'``)."""
    lifted = {key: value for key, value in data.items() if key != "post"}
    lifted["post_id"] = int(data["postid"])
    return lifted


UPCASTERS_V3: Mapping[int, Upcaster] = {1: v1_to_v2, 2: v2_to_v3}
UPCASTERS_V4: Mapping[int, Upcaster] = {1: v1_to_v2, 2: v2_to_v3, 3: v3_to_v4}


def register_v1(bus: EventBus) -> EventType:
    """``like.added`` as the code of v1 knows it: publish stamps ``dataversion`` 1."""
    return bus.event_type(TYPE, version=1)


def register_v3(bus: EventBus, upcasters: Mapping[int, Upcaster] | None = None) -> EventType:
    """``like.added`` as the code of v3 knows it (``upcasters`` instead of the right ones)."""
    return bus.event_type(
        TYPE,
        version=3,
        schema=LikeAdded,
        upcasters=UPCASTERS_V3 if upcasters is None else upcasters,
        aliases=(ALIAS,),
    )


def register_v4(bus: EventBus, upcasters: Mapping[int, Upcaster] | None = None) -> EventType:
    """``like.added`` as the code of v4 knows it."""
    return bus.event_type(
        TYPE,
        version=4,
        schema=LikeAddedV4,
        upcasters=UPCASTERS_V4 if upcasters is None else upcasters,
        aliases=(ALIAS,),
    )
