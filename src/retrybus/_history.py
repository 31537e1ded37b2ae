"""Queue depth over time, for the dashboard's chart.

Samples (retry queue size, unprocessed and processed dead letters) are kept in
one control record of the store, so every process that records them (workers,
the dashboard) adds to one history, and it outlives them. A sample is added
only when the newest is older than the interval, so many recorders add one
sample per interval between them.

Each recorder also adds a sample of its own bus's service (its records only)
to that service's history (``depth_history/<service>``): the workers of a
service keep its chart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._filters import DeadLetterFilter
from ._services import check_service, is_service_name

if TYPE_CHECKING:
    from ._observe import BusView

__all__ = ["DepthHistory", "DepthSample", "history_key"]

HISTORY_KEY = "depth_history"
DEFAULT_INTERVAL = 60.0
# a day of samples at the default interval
DEFAULT_KEEP = 1440


@dataclass(frozen=True, slots=True)
class DepthSample:
    """The queues' depth at one moment."""

    at: datetime
    retry_queue: int
    dead_unprocessed: int
    dead_processed: int

    def to_list(self) -> list[object]:
        return [self.at.isoformat(), self.retry_queue, self.dead_unprocessed, self.dead_processed]


def history_key(service: str | None = None) -> str:
    """The control record holding the history of the whole store (``service``
    None) or of one service's records."""
    return HISTORY_KEY if service is None else f"{HISTORY_KEY}/{check_service(service)}"


class DepthHistory:
    """Record and read the depth history of a bus's store, and of its services'."""

    def __init__(
        self, bus: BusView, *, interval: float = DEFAULT_INTERVAL, keep: int = DEFAULT_KEEP
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            raise ValueError(f"keep must be an int >= 2, got {keep!r}")
        self._bus = bus
        self.interval = float(interval)
        self.keep = keep

    async def samples(self, service: str | None = None) -> list[DepthSample]:
        """The samples kept, oldest first: of the whole store, or of ``service``'s
        records (recorded by that service's workers)."""
        record = await self._bus.store.get_control(history_key(service))
        if record is None:
            return []
        return [_sample(row) for row in record.value.get("samples", []) if _valid(row)]

    async def record(self) -> DepthSample | None:
        """Add a sample of now, unless the newest is younger than the interval (or
        another process added one meanwhile). Returns the sample added, or None.

        A sample of the bus's own service (``bus.service``) goes to that
        service's history too, on the same terms."""
        added = await self._add(history_key(), self._measure_store)
        # any BusView may record; only a bus of a service (an EventBus) has one
        service = getattr(self._bus, "service", None)
        if is_service_name(service):
            await self._add(history_key(service), lambda now: self._measure_service(service, now))
        return added

    async def _add(
        self, key: str, measure: Callable[[datetime], Awaitable[DepthSample]]
    ) -> DepthSample | None:
        store = self._bus.store
        now = self._bus.clock.now()
        record = await store.get_control(key)
        rows = list(record.value.get("samples", [])) if record is not None else []
        if rows and _valid(rows[-1]):
            newest = datetime.fromisoformat(rows[-1][0])
            # a little slack, so recorders waking every `interval` do not skip one
            if now - newest < timedelta(seconds=self.interval * 0.9):
                return None
        sample = await measure(now)
        rows = [*rows[-(self.keep - 1) :], sample.to_list()]
        version = record.version if record is not None else 0
        written = await store.put_control(key, {"samples": rows}, version=version)
        return sample if written is not None else None

    async def _measure_store(self, now: datetime) -> DepthSample:
        store = self._bus.store
        return DepthSample(
            now,
            await store.retry_count(),
            await store.count_dead(DeadLetterFilter(processed=False)),
            await store.count_dead(DeadLetterFilter(processed=True)),
        )

    async def _measure_service(self, service: str, now: datetime) -> DepthSample:
        loads = [
            load for load in await self._bus.store.service_loads(now) if load.service == service
        ]
        return DepthSample(
            now,
            sum(load.queued for load in loads),
            sum(load.dead_unprocessed for load in loads),
            sum(load.dead_processed for load in loads),
        )


def _valid(row: object) -> bool:
    return isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)


def _sample(row: list[object]) -> DepthSample:
    at, retry, unprocessed, processed = row
    return DepthSample(
        datetime.fromisoformat(str(at)),
        int(str(retry)),
        int(str(unprocessed)),
        int(str(processed)),
    )
