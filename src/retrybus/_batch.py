"""One claimed batch as the worker runs it: which items are pending, which written."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._outcomes import outcome_id
from ._records import RetryItem

if TYPE_CHECKING:
    from ._delivery import Attempted


@dataclass(eq=False)
class ClaimedBatch:
    """Items leased under one ``owner`` token, and their outcomes on the way to the store.

    Handlers append outcomes to ``pending``; the flusher writes them in groups,
    so a finished item is recorded soon after its handler returns (a crash
    re-runs little), while a batch of fast handlers is still one write.
    """

    owner: str
    items: list[RetryItem]
    #: when (time.monotonic()) the leases run out unless a heartbeat extends them
    lease_deadline: float = 0.0
    pending: list[Attempted] = field(default_factory=list)
    handled: set[str] = field(default_factory=set)
    started: int = 0
    finished: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: set once every started item has ended and no more will start (``close``,
    #: or every item started): what the worker's shared lanes wait for
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    ended: int = 0
    closing: bool = False
    #: the flusher is writing outcomes it took from ``pending``
    writing: bool = False
    _queue: Iterator[RetryItem] | None = None

    def next_item(self) -> RetryItem | None:
        """The next item no handler has started, or None."""
        if self._queue is None:
            self._queue = iter(self.items)
        item = next(self._queue, None)
        if item is not None:
            self.started += 1
        return item

    def give_back_unstarted(self) -> list[str]:
        """Drop the items no lane has started (the caller releases them); their ids."""
        unstarted = self.items[self.started :]
        self.items = self.items[: self.started]
        self._queue = iter(())
        self._check_settled()
        return [item.id for item in unstarted]

    @property
    def quiet(self) -> bool:
        """Every outcome so far is written (none waiting, none being written)."""
        return not self.pending and not self.writing

    def item_ended(self) -> None:
        """A lane is done with one of the items it started."""
        self.ended += 1
        self._check_settled()

    def close(self) -> None:
        """No more items will start (the worker stops): settle once the started ones end."""
        self.closing = True
        self._check_settled()

    def _check_settled(self) -> None:
        if self.ended == self.started and (self.closing or self.started == len(self.items)):
            self.settled.set()

    def add(self, attempted: Attempted) -> None:
        self.pending.append(attempted)
        self.handled.add(outcome_id(attempted.outcome))
        self.ready.set()

    def finish(self) -> None:
        """No more outcomes will come."""
        self.finished = True
        self.ready.set()
        self.done.set()

    def take_pending(self) -> list[Attempted]:
        outcomes, self.pending = self.pending, []
        return outcomes

    def unstarted_ids(self) -> list[str]:
        """Claimed items no handler has started (items are started in order)."""
        return [item.id for item in self.items[self.started :]]

    def unwritten_ids(self) -> list[str]:
        """Claimed items whose outcome is not yet on its way to the store."""
        written = self.handled.difference(outcome_id(a.outcome) for a in self.pending)
        return [item.id for item in self.items if item.id not in written]
