"""A bus's circuit breakers, shared through the store (``bus.breakers``).

Each process counts its own calls in a sliding window (``CallWindow``); the
state (open, half-open, closed, isolated) and the probes of a half-open
breaker are shared by every worker and publisher of the service in one
control record per breaker (``breaker:<service>:<name>``), written with
compare-and-set: a process that loses re-reads the record and applies its
transition to what it found. The hot path reads a cached copy, refreshed on
every transition this process makes and every ``refresh`` seconds (workers
before a claim, publishers before a publish).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._breaker import (
    BreakerMachine,
    BreakerState,
    BreakerStatus,
    CircuitBreaker,
    Transition,
    counts_as_failure,
)
from ._breaker_records import breaker_record
from ._errors import StoreUnavailable
from ._records import RetryItem

if TYPE_CHECKING:
    from ._core import BusCore
    from ._policy import RetryPolicy

__all__ = ["BreakerInfo", "Breakers", "SharedBreaker", "control_key"]

logger = logging.getLogger("retrybus.breakers")

PREFIX = "breaker:"
#: seconds between two reads of the breakers' shared state by default
DEFAULT_REFRESH = 5.0
#: seconds between two reads while this process's calls through a closed breaker
#: fail: another process may have opened it (an outage is seen by all at once)
FAILING_REFRESH = 0.5
#: compare-and-set attempts before a transition is given up (and logged)
_CAS_TRIES = 8

#: claims ``limit`` due records of ``handlers`` for this worker
ProbeClaim = Callable[[int, list[str]], Awaitable[list[RetryItem]]]


def control_key(service: str, name: str) -> str:
    """The control record that holds breaker ``name`` of ``service``."""
    return f"{PREFIX}{service}:{name}"


def _at(when: datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class BreakerInfo:
    """What an operator sees of one breaker: its settings, the handlers behind
    it, its shared state, and the calls this process counted in its window."""

    name: str
    state: BreakerState
    handlers: tuple[str, ...]
    breaker: CircuitBreaker
    trips: int
    open_for: float
    opened_at: datetime | None
    half_open_at: datetime | None
    reason: str
    calls: int
    failures: int


class SharedBreaker:
    """One breaker of a bus: its machine (this process's window and the cached
    shared status) and the writes that share the status. Handler calls report
    to it (``succeeded``, ``failed``): nothing more than counting unless a
    transition is due, which is written before the call returns."""

    def __init__(self, breaker: CircuitBreaker, core: BusCore) -> None:
        self.breaker = breaker
        self.machine = BreakerMachine(breaker, core.clock)
        self.handlers: list[str] = []
        self.version = 0
        #: closed, as last known here (the hot path's check; kept with the status)
        self.closed = True
        self._core = core
        self._window = self.machine.window
        self._seconds = self.machine.seconds

    @property
    def key(self) -> str:
        """Its control record's key."""
        return control_key(self._core.service, self.breaker.name)

    def state(self) -> BreakerState:
        """The state now, as last known here."""
        return self.machine.status.state_at(self._core.clock.now())

    # the hot path ----------------------------------------------------------

    def succeeded(self) -> Awaitable[object] | None:
        """A call through the breaker succeeded (an awaitable: a transition to share)."""
        if self.closed:
            self._window.add(self._seconds(), False)
            return None
        return self._after(False, "")

    def failed(self, error: BaseException, policy: RetryPolicy | None) -> Awaitable[object] | None:
        """A call through the breaker failed with ``error``; it counts against the
        breaker when ``policy`` (None: the bus's default) would retry it, else as
        a call that reached the dependency."""
        failed = counts_as_failure(error, policy or self._core.default_policy)
        if failed and self.machine.status.state == "closed":
            self._core.breakers.refresh_soon()
        return self._after(failed, error)

    def _after(self, failed: bool, error: BaseException | str) -> Awaitable[object] | None:
        transition = self.machine.after_call(failed, error)
        if transition is None or transition(self.machine.status) is None:
            return None
        return self.apply(transition)

    # sharing ---------------------------------------------------------------

    async def apply(self, transition: Transition, *, actor: str | None = None) -> bool:
        """Write ``transition`` of the shared status with compare-and-set (on a
        lost race, read the record again and apply it to that); whether it was
        written. A store that cannot be reached keeps the change here only (this
        process holds back as it says; the next refresh reads the store's)."""
        store = self._core.store
        try:
            for _ in range(_CAS_TRIES):
                new = transition(self.machine.status)
                if new is None:
                    return False
                value = breaker_record(new, self.breaker, self.handlers)
                version = await store.put_control(self.key, value, version=self.version)
                if version is not None:
                    self._adopt(new, version, announce=actor or "")
                    return True
                await self.reload()
        except StoreUnavailable as exc:
            new = transition(self.machine.status)
            if new is not None:
                self._adopt(new, self.version, announce=actor or "")
            logger.warning(
                "breaker %s: could not share its state (%s); this process holds back "
                "as it says until the store answers",
                self.breaker.name,
                exc,
            )
            return False
        logger.warning(
            "breaker %s: gave up a change after %d lost compare-and-sets",
            self.breaker.name,
            _CAS_TRIES,
        )
        return False

    async def reload(self) -> None:
        """Read the shared status from the store."""
        record = await self._core.store.get_control(self.key)
        if record is None:
            self.adopt_stored(None, 0)
        else:
            self.adopt_stored(record.value, record.version)

    def adopt_stored(self, value: object, version: int) -> None:
        """Take the stored status (None: no record yet) as the one known here."""
        if value is None:
            status = BreakerStatus.initial(self.breaker)
        else:
            try:
                status = BreakerStatus.from_json(value)
            except ValueError as exc:
                logger.warning("breaker %s: %s; read as closed", self.breaker.name, exc)
                status = BreakerStatus.initial(self.breaker)
        if status != self.machine.status:
            self._adopt(status, version)
        self.version = version

    def _adopt(self, status: BreakerStatus, version: int, *, announce: str | None = None) -> None:
        machine = self.machine
        before = machine.status
        machine.status = status
        self.closed = status.state == "closed"
        self.version = version
        if status.state == "closed" and before.state != "closed":
            machine.window.clear()
        if status.state != before.state or status.trips != before.trips:
            self._log(status, announce)
        self._report(status)

    def _report(self, status: BreakerStatus) -> None:
        """Tell the bus's metrics (``set_breaker_state``, when they have it) the
        state this process now knows."""
        report = getattr(self._core.metrics, "set_breaker_state", None)
        if report is None:
            return
        try:
            report(
                self._core.service,
                self.breaker.name,
                status.state_at(self._core.clock.now()),
                status.trips,
            )
        except Exception:  # a gauge is not worth failing a transition for
            logger.exception("breaker %s: the metrics refused its state", self.breaker.name)

    def _log(self, status: BreakerStatus, actor: str | None) -> None:
        name = self.breaker.name
        by = f" by {actor}" if actor else ""
        if actor is None:  # seen in the store: another process made the change
            logger.debug("breaker %s is %s (changed elsewhere)", name, status.state)
        elif status.state == "open":
            logger.warning(
                "breaker %s opened%s: %s; half-open at %s",
                name,
                by,
                status.reason,
                _at(status.half_open_at),
            )
        elif status.state == "closed":
            logger.info("breaker %s closed%s: %s", name, by, status.reason)
        else:
            logger.warning("breaker %s isolated%s: %s", name, by, status.reason)

    async def store_settings(self) -> None:
        """Write the breaker's settings and handlers into its record beside the
        status found there (a new record: closed), unless they are there already:
        what lets a store-only reader (``retrybus breakers``) list and reset it."""
        store = self._core.store
        for _ in range(_CAS_TRIES):
            record = await store.get_control(self.key)
            if record is None:
                status, version, stored = BreakerStatus.initial(self.breaker), 0, {}
            else:
                version, stored = record.version, dict(record.value)
                try:
                    status = BreakerStatus.from_json(stored)
                except ValueError as exc:
                    logger.warning("breaker %s: %s; read as closed", self.breaker.name, exc)
                    status = BreakerStatus.initial(self.breaker)
            value = {**stored, **breaker_record(status, self.breaker, self.handlers)}
            if record is not None and value == record.value:
                self.adopt_stored(record.value, record.version)
                return
            written = await store.put_control(self.key, value, version=version)
            if written is not None:
                self.adopt_stored(value, written)
                return
        logger.warning(
            "breaker %s: gave up storing its settings after %d lost compare-and-sets",
            self.breaker.name,
            _CAS_TRIES,
        )

    async def take_probes(self, wanted: int) -> int:
        """Take up to ``wanted`` of the half-open breaker's probes; how many."""
        now = self._core.clock.now()
        breaker = self.breaker
        taken = [0]

        def take(status: BreakerStatus) -> BreakerStatus | None:
            count = 0
            while count < wanted:
                more = status.take_probe(now, breaker)
                if more is None:
                    break
                status, count = more, count + 1
            taken[0] = count
            return status if count else None

        first = self.machine.status.probes_taken == 0
        if not await self.apply(take):
            return 0
        if first:
            logger.info(
                "breaker %s half-open: letting %d probe(s) through", breaker.name, breaker.probes
            )
        return taken[0]

    async def return_probes(self, count: int) -> None:
        """Give back probes taken but not used."""
        await self.apply(lambda status: status.return_probes(count))

    def info(self) -> BreakerInfo:
        """What an operator sees of it now."""
        status = self.machine.status
        window = self.machine.window
        return BreakerInfo(
            name=self.breaker.name,
            state=self.state(),
            handlers=tuple(self.handlers),
            breaker=self.breaker,
            trips=status.trips,
            open_for=status.open_for,
            opened_at=status.opened_at,
            half_open_at=status.half_open_at,
            reason=status.reason,
            calls=window.calls,
            failures=window.failures,
        )


class Breakers:
    """The circuit breakers of a bus (``bus.breakers``): list them, read one,
    isolate one (held open until reset) or reset one (closed), shared with
    every process of the service through the store.

    >>> for info in await bus.breakers.list():
    ...     print(info.name, info.state, info.half_open_at)
    >>> await bus.breakers.isolate("orders-db")
    """

    def __init__(self, core: BusCore, refresh: float = DEFAULT_REFRESH) -> None:
        self._core = core
        self._by_name: dict[str, SharedBreaker] = {}
        self._by_handler: dict[str, SharedBreaker] = {}
        #: whether any handler of the bus has a breaker (the hot path's check)
        self.active = False
        #: claimed probe records this worker may run though the breaker is not closed
        self._probes: set[str] = set()
        self.refresh_interval = refresh
        self._next_refresh: datetime | None = None
        self._last_refresh: datetime | None = None
        #: a call through a closed breaker failed since the last read
        self._failing = False

    def add(self, breaker: CircuitBreaker) -> SharedBreaker:
        """Register ``breaker`` (again: the same settings share it); raises
        ``ValueError`` for another breaker of the same name."""
        if not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker or a name, got {breaker!r}")
        shared = self._by_name.get(breaker.name)
        if shared is None:
            shared = self._by_name[breaker.name] = SharedBreaker(breaker, self._core)
            self._next_refresh = None  # read its state before the next use
        elif shared.breaker != breaker:
            raise ValueError(
                f"a breaker named {breaker.name!r} is already registered with other "
                f"settings ({shared.breaker!r}); share it by passing its name"
            )
        return shared

    def resolve(self, breaker: CircuitBreaker | str) -> SharedBreaker:
        """The breaker ``breaker`` names (a name must be registered already)."""
        if isinstance(breaker, str):
            shared = self._by_name.get(breaker)
            if shared is None:
                known = ", ".join(sorted(self._by_name)) or "none"
                raise ValueError(
                    f"no breaker named {breaker!r} is registered on this bus (registered: "
                    f"{known}); pass a CircuitBreaker first"
                )
            return shared
        return self.add(breaker)

    def attach(self, handler: str, shared: SharedBreaker) -> None:
        """Put ``handler``'s calls behind ``shared``."""
        self._by_handler[handler] = shared
        self.active = True
        shared.handlers.append(handler)

    def detach(self, handler: str) -> None:
        """``handler`` is no longer subscribed."""
        shared = self._by_handler.pop(handler, None)
        self.active = bool(self._by_handler)
        if shared is not None:
            shared.handlers.remove(handler)

    def of(self, handler: str) -> SharedBreaker | None:
        """The breaker in front of ``handler`` (None: none)."""
        return self._by_handler.get(handler)

    # what delivery asks ----------------------------------------------------

    def admits(self, handler: str) -> bool:
        """Whether ``handler``'s deliveries go through now (no breaker, or closed)."""
        shared = self._by_handler.get(handler)
        return shared is None or shared.closed

    def held_until(self, handler: str) -> datetime | None:
        """None when ``handler``'s deliveries go through now; else when its
        breaker half-opens (now, when half-open or isolated): what a new
        delivery's pending record is due at."""
        shared = self._by_handler.get(handler)
        if shared is None or shared.closed:
            return None
        now = self._core.clock.now()
        status = shared.machine.status
        if status.state == "open" and status.half_open_at is not None and status.half_open_at > now:
            return status.half_open_at
        return now

    def admits_claimed(self, item: RetryItem) -> bool:
        """Whether a worker runs ``item``, claimed earlier: its breaker is closed,
        or it was claimed as one of a half-open breaker's probes."""
        shared = self._by_handler.get(item.handler_name)
        if shared is None or (shared.closed and not self._probes):
            return True
        if item.id in self._probes:
            self._probes.discard(item.id)
            return True
        return shared.closed

    def claimable(self, names: Iterable[str]) -> list[str]:
        """Of ``names``, the handlers whose breaker lets deliveries through."""
        by_handler = self._by_handler
        return [n for n in names if n not in by_handler or by_handler[n].closed]

    async def claim_probes(self, claim: ProbeClaim, room: int) -> list[RetryItem]:
        """For each half-open breaker, take probes (shared: ``probes`` at most
        across all processes) and claim as many of its handlers' due records
        with ``claim``, up to ``room`` in all; the probes not used are given back."""
        now = self._core.clock.now()
        items: list[RetryItem] = []
        for shared in self._by_name.values():
            if room <= 0:
                break
            if not shared.handlers or shared.machine.status.state_at(now) != "half_open":
                continue
            granted = await shared.take_probes(min(room, shared.breaker.probes))
            if not granted:
                continue
            claimed = await claim(granted, list(shared.handlers))
            if len(claimed) < granted:
                await shared.return_probes(granted - len(claimed))
            self._probes.update(item.id for item in claimed)
            items += claimed
            room -= len(claimed)
        return items

    def next_change(self) -> datetime | None:
        """When the next known breaker half-opens (None: none is waiting to)."""
        times = [
            s.machine.status.half_open_at
            for s in self._by_name.values()
            if s.machine.status.state == "open" and s.machine.status.half_open_at is not None
        ]
        return min(times) if times else None

    async def refresh_if_due(self) -> None:
        """Read the shared state when ``refresh`` seconds passed since the last read."""
        if not self._by_name:
            return
        now = self._core.clock.now()
        if self._next_refresh is not None and now < self._next_refresh:
            return
        await self.refresh()

    def refresh_soon(self) -> None:
        """A call through a closed breaker failed: read the shared state again
        ``FAILING_REFRESH`` seconds after the last read rather than
        ``refresh`` (once per read, however many calls fail)."""
        if self._failing:
            return
        self._failing = True
        if self._last_refresh is not None:
            soon = self._last_refresh + timedelta(seconds=FAILING_REFRESH)
            if self._next_refresh is None or soon < self._next_refresh:
                self._next_refresh = soon

    async def refresh(self) -> None:
        """Read every breaker's shared state from the store now (one read)."""
        now = self._core.clock.now()
        self._last_refresh = now
        self._failing = False
        self._next_refresh = now + timedelta(seconds=self.refresh_interval)
        prefix = control_key(self._core.service, "")
        stored = {r.key: r for r in await self._core.store.list_control(prefix)}
        for shared in self._by_name.values():
            record = stored.get(shared.key)
            if record is None:
                shared.adopt_stored(None, 0)
            else:
                shared.adopt_stored(record.value, record.version)

    async def store_settings(self) -> None:
        """Write each breaker's settings and handlers into its control record
        (``bus.register()`` does, as a worker starts): a breaker that never
        tripped is listed by ``retrybus breakers`` and the dashboard too."""
        for shared in self._by_name.values():
            if shared.handlers:
                await shared.store_settings()

    # operators -------------------------------------------------------------

    async def list(self) -> Sequence[BreakerInfo]:
        """Every breaker of the bus, by name, as the store says now."""
        await self.refresh()
        return [self._by_name[name].info() for name in sorted(self._by_name)]

    async def get(self, name: str) -> BreakerInfo:
        """Breaker ``name`` as the store says now; raises ``ValueError`` if unknown."""
        shared = self.resolve(name)
        await shared.reload()
        return shared.info()

    async def isolate(self, name: str, *, actor: str = "an operator") -> BreakerInfo:
        """Hold breaker ``name`` open (no probes) until ``reset``: its handlers'
        deliveries wait, in every process of the service."""
        shared = self.resolve(name)
        await shared.reload()
        now = self._core.clock.now()
        await shared.apply(lambda s: s.isolate(now, f"isolated by {actor}"), actor=actor)
        return shared.info()

    async def reset(self, name: str, *, actor: str = "an operator") -> BreakerInfo:
        """Close breaker ``name`` now (its open period back to ``open_for``), in
        every process of the service."""
        shared = self.resolve(name)
        await shared.reload()
        now = self._core.clock.now()
        breaker = shared.breaker
        await shared.apply(lambda s: s.reset(now, breaker, f"reset by {actor}"), actor=actor)
        return shared.info()
