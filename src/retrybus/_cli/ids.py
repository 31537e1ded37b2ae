"""Ids as people give them: a whole id, or a unique start of one copied from a
table (``dlq_01a2370d``). Every command that takes a dead letter, redrive or
retry queue item id resolves it here first, so that an unknown or ambiguous one stops the command,
naming it and the ids it could mean, before anything is changed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from .._bus import EventBus
from .._errors import AmbiguousId, ItemNotFound
from .session import EXIT_USAGE, CliError

__all__ = [
    "DeadLetterIdArgument",
    "DeadLetterIdsArgument",
    "RedriveIdArgument",
    "RetryIdArgument",
    "resolve_dead_letter_id",
    "resolve_dead_letter_ids",
    "resolve_redrive_id",
    "resolve_retry_id",
]

DeadLetterIdArgument = Annotated[
    str,
    typer.Argument(metavar="ID", help="A dead letter id (dlq_…) or a unique start of it."),
]
DeadLetterIdsArgument = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="ID",
        help="Dead letter ids (dlq_…), or unique starts of them.",
        show_default=False,
    ),
]
RedriveIdArgument = Annotated[
    str,
    typer.Argument(metavar="ID", help="A redrive id (redrive_…) or a unique start of it."),
]
RetryIdArgument = Annotated[
    str,
    typer.Argument(metavar="ID", help="A retry queue item id (retry_…) or a unique start of it."),
]

# AmbiguousId lists ten ids, and says there are more when given an eleventh
_MATCHES_SHOWN = 11


def _require_text(given: str) -> None:
    if not given:
        raise CliError("an id may not be empty", EXIT_USAGE)


async def resolve_dead_letter_id(bus: EventBus, given: str) -> str:
    """The id of the one dead letter whose id is ``given`` or starts with it;
    ``ItemNotFound`` or ``AmbiguousId`` (which ``common.run`` reports) otherwise."""
    _require_text(given)
    return await bus.dead_letters.resolve_id(given)


async def resolve_dead_letter_ids(bus: EventBus, given: Sequence[str]) -> list[str]:
    """The dead letter ids ``given`` stand for, each once, in the order given.

    Every one is resolved before any is returned: when one is unknown or
    ambiguous, a ``CliError`` names each such one (and what an ambiguous one
    could mean), so that the command stops before it changes anything."""
    for text in given:
        _require_text(text)
    resolved: list[str] = []
    problems: list[str] = []
    for text in given:
        try:
            resolved.append(await bus.dead_letters.resolve_id(text))
        except (ItemNotFound, AmbiguousId) as exc:
            problems.append(str(exc))
    if problems:
        unchanged = "; nothing was changed" if len(given) > 1 else ""
        raise CliError("; ".join(problems) + unchanged)
    return list(dict.fromkeys(resolved))


async def resolve_redrive_id(bus: EventBus, given: str) -> str:
    """The id of the one redrive whose id is ``given`` or starts with it, among
    those ``bus.redrives.list()`` gives; ``ItemNotFound`` or ``AmbiguousId`` otherwise."""
    _require_text(given)
    ids = sorted(redrive.id for redrive in await bus.redrives.list())
    if given in ids:
        return given
    matches = [redrive_id for redrive_id in ids if redrive_id.startswith(given)]
    if not matches:
        raise ItemNotFound(given)
    if len(matches) > 1:
        raise AmbiguousId(given, matches[:_MATCHES_SHOWN])
    return matches[0]


async def resolve_retry_id(bus: EventBus, given: str) -> str:
    """The id of the one retry queue item whose id is ``given`` or starts with it;
    ``ItemNotFound`` or ``AmbiguousId`` (which ``common.run`` reports) otherwise."""
    _require_text(given)
    return await bus.retry_queue.resolve_id(given)
