"""Routes: which handlers of other services an event type reaches, as the store
keeps their subscriptions (``Store.list_subscriptions``).

A bus keeps a copy and checks the store's revision of the subscriptions
(``subscriptions_revision``) at most every ``refresh`` seconds, in the
background: a publish never waits for it, but the first, which loads the copy.
A service that registers reaches the publishers of other processes within
``refresh`` seconds (as NServiceBus's publishers cache their subscriptions);
buses of this process on the same store object hear of it at once
(``subscriptions_changed``). The bus's own service is left out: its handlers run
from the bus's own registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ._patterns import PatternIndex

if TYPE_CHECKING:
    from ._stores.base import Store

__all__ = ["Route", "RouteContext", "Routes", "subscriptions_changed"]

logger = logging.getLogger("retrybus")

#: per store object, how often this process changed its subscriptions
_CHANGES: weakref.WeakKeyDictionary[Store, int] = weakref.WeakKeyDictionary()


def subscriptions_changed(store: Store) -> None:
    """This process changed ``store``'s subscriptions: the routes of every bus on
    that store object are read again before its next publish is routed."""
    _CHANGES[store] = _CHANGES.get(store, 0) + 1


@dataclass(frozen=True, slots=True)
class Route:
    """A handler of another service that an event reaches, and the
    ``max_retries`` its pending records carry."""

    service: str
    handler_name: str
    max_retries: int

    @property
    def label(self) -> str:
        """``service/handler``, as ``PublishResult.routed`` names it."""
        return f"{self.service}/{self.handler_name}"


class RouteContext(Protocol):
    """What the routes read from the bus's shared state (``BusCore``), each time:
    the store may change."""

    @property
    def store(self) -> Store:
        """The bus's store."""
        ...

    @property
    def service(self) -> str:
        """The bus's service (its subscriptions are left out)."""
        ...


class Routes:
    """The bus's copy of other services' subscriptions."""

    def __init__(self, core: RouteContext, refresh: float) -> None:
        self._core = core
        #: seconds between two checks of the store's revision (0: before every publish)
        self.refresh = refresh
        self._table: PatternIndex[Route] | None = None
        self._store: Store | None = None  # the store the table was read from
        self._revision = -1
        self._changes = 0  # subscriptions_changed() calls seen at the last load
        self._next_check = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._failing = False

    def match(self, event_type: str) -> tuple[Route, ...] | None:
        """The routes of ``event_type`` from the copy (None: there is none yet, or
        it is of another store, or this process changed the subscriptions since:
        ``await matching()``). Starts a check of the store's revision in the
        background when one is due."""
        store = self._core.store
        table = self._table
        if (
            table is None
            or self._store is not store
            or self.refresh == 0
            or _CHANGES.get(store, 0) != self._changes
        ):
            return None
        if time.monotonic() >= self._next_check and self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        return table.match(event_type)

    async def matching(self, event_type: str) -> tuple[Route, ...]:
        """The routes of ``event_type``, the copy read (or checked) first when
        ``match`` cannot answer from it."""
        found = self.match(event_type)
        if found is not None:
            return found
        await self.load()
        table = self._table
        return () if table is None else table.match(event_type)

    async def load(self) -> None:
        """Read the store's subscriptions into the copy, unless its revision shows
        the copy is current. Raises what the store raises."""
        store = self._core.store
        changes = _CHANGES.get(store, 0)
        revision = await store.subscriptions_revision()
        if self._table is None or self._store is not store or revision != self._revision:
            table: PatternIndex[Route] = PatternIndex()
            for subscription in await store.list_subscriptions():
                if subscription.service == self._core.service:
                    continue  # the bus's own handlers come from its registry
                table.add(
                    subscription.key,
                    subscription.patterns,
                    Route(
                        subscription.service, subscription.handler_name, subscription.max_retries
                    ),
                )
            self._table, self._store, self._revision = table, store, revision
        self._changes = changes
        self._next_check = time.monotonic() + self.refresh

    async def _refresh(self) -> None:
        """A background check: a store that fails leaves the copy in use (said once)."""
        try:
            await self.load()
            if self._failing:
                logger.info("the subscriptions of other services are read again")
            self._failing = False
        except Exception as exc:
            if not self._failing:
                logger.warning(
                    "could not read the subscriptions of other services: %s; publishes "
                    "route by the copy read before",
                    exc,
                )
            self._failing = True
            self._next_check = time.monotonic() + self.refresh
        finally:
            self._refreshing = None
