"""Group commit: concurrent callers that each have a few records to write share
one store write. The first caller to arrive leads: it lets the callers that are
ready join (one turn of the event loop), writes everything queued in one call,
and hands each caller the result; callers arriving while a write is in flight
queue for the next one. One publisher alone pays one turn of the loop; a
hundred concurrent ones pay one store write between them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ._errors import RecordRejected

__all__ = ["GroupWriter"]

T = TypeVar("T")

Write = Callable[[Sequence[T]], Awaitable[set[str]]]


class _Waiting(Generic[T]):
    __slots__ = ("future", "items")

    def __init__(self, items: Sequence[T], future: asyncio.Future[set[str]]) -> None:
        self.items = items
        self.future = future


class GroupWriter(Generic[T]):
    """Writes the items of concurrent ``write()`` calls together; ``write_many``
    (the store call) returns the ids it wrote, and each caller gets all of them
    (it picks its own). The writes run in a task of their own, so a caller that
    is cancelled never cancels the write the others wait for."""

    def __init__(self, write_many: Write[T]) -> None:
        self._write_many = write_many
        self._queue: list[_Waiting[T]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, items: Sequence[T]) -> set[str]:
        """Write ``items`` together with whatever else is queued; the ids written.
        Raises what the store raised (``RecordRejected`` only for a write of this
        caller's items alone: one caller's bad record never fails the others)."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(items, loop.create_future())
        self._queue.append(waiting)
        if self._writer is None:
            # the task starts on the loop's next turn: callers ready now join it
            self._writer = loop.create_task(self._drain())
        return await waiting.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue, []
                await self._write_group(group)
        finally:
            self._writer = None
            if self._queue:  # cancelled (the loop is closing): nobody will write these
                _fail(self._queue, asyncio.CancelledError())
                self._queue = []

    async def _write_group(self, group: list[_Waiting[T]]) -> None:
        try:
            if len(group) == 1:
                written = await self._write_many(group[0].items)
            else:
                written = await self._write_many([item for w in group for item in w.items])
        except RecordRejected as exc:
            if len(group) == 1:
                _fail(group, exc)
                return
            for waiting in group:  # find whose record it was: each alone
                await self._write_group([waiting])
            return
        except Exception as exc:
            _fail(group, exc)
            return
        except BaseException as exc:
            _fail(group, exc)
            raise
        for waiting in group:
            if not waiting.future.done():
                waiting.future.set_result(written)


def _fail(group: list[_Waiting[T]], error: BaseException) -> None:
    for waiting in group:
        if not waiting.future.done():
            waiting.future.set_exception(error)
            waiting.future.exception()  # retrieved: a caller that left logs nothing
