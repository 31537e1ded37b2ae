"""The retry worker: claims due items with a lease and redelivers each to the
one handler that failed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from types import TracebackType

from ._batch import ClaimedBatch
from ._budget import RetryBudget, RetryBudgets
from ._bus import EventBus
from ._consumer import TransportConsumer
from ._delivery import Attempted, deliver, undeliverable
from ._errors import StoreUnavailable
from ._event import check_text
from ._flow import ClaimFlow
from ._handlers import check_timeout
from ._history import DEFAULT_INTERVAL, DepthHistory
from ._outbox import OutboxRelay
from ._outcomes import Succeeded
from ._records import RetryItem
from ._services import WorkerBeat

__all__ = ["RetryWorker"]

logger = logging.getLogger("retrybus.worker")

_MIN_IDLE = 0.005
_FLUSH_LINGER = 0.02
#: how long, at most, a claimed item should wait for a lane (judged by the
#: handlers' recent call time): quick handlers get items claimed ahead, up to a
#: batch, so that claims are large; slow ones none, so that an idle worker can
#: take what this one could not start soon
_CLAIM_AHEAD_WAIT = 0.05
#: weight of the latest call in the running average of handler call times
_CALL_TIME_WEIGHT = 0.1
_MAX_OUTAGE_BACKOFF = 30.0

#: seconds between two heartbeats of a worker by default
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: seconds between two sweeps of what waits for removed subscriptions (what a
#: publisher whose copy of the routes was stale wrote after a removal). A sweep
#: finds nothing but the tombstones in the common case (a read of the few
#: subscription rows): cheap enough for every worker, often enough that such a
#: record is dead-lettered well within a minute (this plus the publishers'
#: route_refresh, 5 s by default)
UNSUBSCRIBED_SWEEP_INTERVAL = 15.0
#: records a sweep moves per store call (a fuller sweep goes on at the next turn)
UNSUBSCRIBED_BATCH = 500
#: heartbeats not seen for this long are deleted, and tombstones of subscriptions
#: removed this long ago forgotten, by the workers' maintenance
SERVICE_RECORDS_KEPT = timedelta(days=1)
#: how long ``stop()`` waits for the store to forget the worker's heartbeat
_FORGET_TIMEOUT = 5.0
#: seconds between two passes over the active redrives by default
DEFAULT_REDRIVE_INTERVAL = 1.0


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class RetryWorker:
    """Claims due retry items from the bus's store and calls only the handler
    that failed; success removes the item, failure reschedules it or, when
    retries are spent, moves it to the dead letter queue.

    >>> async with RetryWorker(bus):
    ...     await serve_forever()

    It claims only records of the bus's handlers. ``check_interval`` is the
    longest it sleeps (it wakes sooner when an item falls due sooner, or when
    this process schedules one); up to ``batch_size`` items are claimed at once
    and run on ``concurrency`` lanes; it claims more as soon as a lane is free,
    so a slow handler never holds up the others. While its handlers are quick,
    it also claims ahead what its lanes will start within some 50 ms (at most a
    batch), so that claims are large; a slow handler's items are never claimed
    ahead, so that another worker can take them.
    Each item is leased for ``lease`` seconds, extended while its handler runs.
    A delivery claimed ``bus.max_claims`` times without an outcome (its handler
    keeps killing or hanging the worker) is dead-lettered as undeliverable.
    ``handler_timeout`` (seconds) limits the calls of handlers that have no
    ``handler_timeout`` of their own. Every
    ``maintenance_interval`` seconds it moves expired retry items to the dead
    letter queue and deletes dead letters past the bus's retention. Every
    ``depth_sample_interval`` seconds (None: never) it adds a sample of the queues'
    depth to the store's history (``DepthHistory``) that the dashboard charts; many
    workers add one sample per interval between them. When the bus has
    ``metrics``, every ``metrics_interval`` seconds it reads the queues' depth
    for them.

    A worker started while its store is down waits for it, retrying with
    backoff (logged once, and once more when the store is back), as a running
    worker rides out an outage; with ``fail_fast`` its ``start()`` raises
    ``StoreUnavailable`` instead.

    A worker claims only records of its bus's service (``bus.service``) and
    handlers, so workers of two services never take each other's deliveries, even
    of handlers of the same name. It stores the service's subscriptions when it
    starts (``bus.register()``, once the store answers), so that publishers of
    other services record deliveries for them; it sends a heartbeat
    (``WorkerBeat``: where it runs, its lanes and how many are busy, its handlers)
    every ``heartbeat_interval`` seconds, which ``stop()`` deletes; every
    ``UNSUBSCRIBED_SWEEP_INTERVAL`` seconds it moves to the dead letter queue what
    waits for removed subscriptions (``bus.services.sweep()``), and with its
    maintenance it deletes heartbeats and tombstones a day old.

    On a bus with a transport it also consumes its service's messages from the
    broker, on ``prefetch`` lanes of its own (``concurrency`` by default): each
    message's matching handlers run, failures become retry records, and the
    message is acked once that is written (see ``TransportConsumer``).

    When the bus has an outbox database (``EventBus(outbox=URL)``), the worker
    also relays its ``retrybus_outbox`` table (``OutboxRelay``; ``relay=False``
    leaves that to ``retrybus relay``): any number of workers share it.

    Every ``redrive_interval`` seconds it also drives the active redrives it can
    drive (``bus.redrives.run_all``: a reprocess needs the handlers), so that a
    redrive started from the dashboard or the CLI goes on with neither attached.
    Any number of workers and dashboards cooperate: one at a time holds a redrive,
    the others leave it be. ``drive_redrives=False`` leaves redrives to others.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        check_interval: float = 10.0,
        batch_size: int = 100,
        concurrency: int = 16,
        lease: float = 60.0,
        maintenance_interval: float = 3600.0,
        depth_sample_interval: float | None = DEFAULT_INTERVAL,
        metrics_interval: float = 15.0,
        name: str | None = None,
        fail_fast: bool = False,
        handler_timeout: float | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        prefetch: int | None = None,
        relay: bool = True,
        drive_redrives: bool = True,
        redrive_interval: float = DEFAULT_REDRIVE_INTERVAL,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        if not isinstance(bus, EventBus):
            raise TypeError(f"RetryWorker needs an EventBus, got {bus!r}")
        self.bus = bus
        self.check_interval = _positive("check_interval", check_interval)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.concurrency = _positive_int("concurrency", concurrency)
        #: messages a consumer of the bus's transport handles at once (its own lanes)
        self.prefetch = (
            self.concurrency if prefetch is None else _positive_int("prefetch", prefetch)
        )
        self.lease = _positive("lease", lease)
        self.maintenance_interval = _positive("maintenance_interval", maintenance_interval)
        self.depth_history = (
            None
            if depth_sample_interval is None
            else DepthHistory(
                bus, interval=_positive("depth_sample_interval", depth_sample_interval)
            )
        )
        self._next_sample: datetime | None = None
        self.metrics_interval = _positive("metrics_interval", metrics_interval)
        self._next_metrics: datetime | None = None
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        self.name = check_text(
            name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "worker name"
        )
        self._claims = itertools.count(1)
        #: claimed records the inbox says were handled before (``_check_inbox``)
        self._handled: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._next_maintenance: datetime | None = None
        self._unwatch: Callable[[], Awaitable[None]] | None = None
        self._outage_since: float | None = None
        self.fail_fast = bool(fail_fast)
        self.handler_timeout = check_timeout("handler_timeout", handler_timeout)
        self.heartbeat_interval = _positive("heartbeat_interval", heartbeat_interval)
        # services (on a store that keeps them): registered, heartbeats, sweeps
        self._registered = False
        self._started_at: datetime | None = None
        self._beater: asyncio.Task[None] | None = None
        self._beat_failing = False
        self._next_sweep: datetime | None = None
        # the claim loop's shared lanes: claimed items wait in _ready for a free lane
        self._ready: asyncio.Queue[tuple[ClaimedBatch, RetryItem] | None] = asyncio.Queue()
        self._busy = 0
        self._call_time: float | None = None  # running average, seconds (None: no call yet)
        self._batches: set[asyncio.Task[None]] = set()
        #: set while a lane runs a suspect alone (see _run_alone)
        self._suspect: asyncio.Event | None = None
        #: the consumer of the bus's transport while the loop runs (None: no transport)
        self._consumer: TransportConsumer | None = None
        #: whether the worker relays its bus's outbox table (``EventBus(outbox=URL)``)
        self.relay = bool(relay)
        #: the relay of the bus's outbox while the loop runs (None: none)
        self._relay: OutboxRelay | None = None
        #: whether the worker drives the active redrives it can (``bus.redrives``)
        self.drive_redrives = bool(drive_redrives)
        self.redrive_interval = _positive("redrive_interval", redrive_interval)
        self._driver: asyncio.Task[None] | None = None
        self._driver_stop = asyncio.Event()
        #: claims of the handlers with a rate or a concurrency limit
        self._flow = ClaimFlow(bus.core)
        #: the budget the handlers' retries are kept within (None: none)
        self.retry_budget = retry_budget
        if retry_budget is not None:
            self._use_budget(retry_budget)

    def _use_budget(self, budget: RetryBudget) -> None:
        """Count the bus's deliveries against ``budget`` (one per process: workers
        of one bus share it, so they must agree on it)."""
        core = self.bus.core
        if core.retry_budgets is None:
            core.retry_budgets = RetryBudgets(budget, self.bus.clock)
        elif core.retry_budgets.budget != budget:
            raise ValueError(
                f"another worker of this bus counts retries against {core.retry_budgets.budget!r}; "
                f"workers of one bus share one retry budget, got {budget!r}"
            )

    # lifecycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the claim loop in the background. A store that cannot be reached
        now is waited for (``fail_fast``: ``StoreUnavailable`` is raised); one that
        cannot be used (``StoreUnusable``) raises at once."""
        if self.running:
            raise RuntimeError(f"worker {self.name} is already running")
        self._stopping = False
        self._wake = asyncio.Event()
        self._registered = False
        self._started_at = self.bus.clock.now()
        watching = False
        try:
            await self.bus.store.connect()
            self._unwatch = await self.bus.store.watch(self._wake_up)
            watching = True
            await self._register()
        except StoreUnavailable as exc:
            if self.fail_fast:
                await self._stop_watching()
                raise
            self._store_failed(exc, 0.5)
        except BaseException:
            await self._stop_watching()
            raise
        self.bus.core.ledger.add_schedule_listener(self._on_retry_scheduled)
        if self._registered:
            await self._beat()  # listed at once; the loop beats on
        self._beater = asyncio.create_task(
            self._beat_continuously(first=not self._registered),
            name=f"retrybus-heartbeat-{self.name}",
        )
        self._task = asyncio.create_task(self._loop(watching), name=f"retrybus-worker-{self.name}")
        self._task.add_done_callback(self._loop_ended)
        if self.drive_redrives:
            self._driver_stop = asyncio.Event()
            self._driver = asyncio.create_task(
                self.bus.redrives.run_all(interval=self.redrive_interval, stop=self._driver_stop),
                name=f"retrybus-redrives-{self.name}",
            )
        logger.info(
            "worker %s of service %s started on %s",
            self.name,
            self.bus.service,
            self.bus.store.url,
        )

    async def _stop_watching(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            with contextlib.suppress(Exception):
                await unwatch()

    async def _register(self) -> None:
        """Store the service's subscriptions (once per start), so that other
        services' publishers record deliveries for them."""
        if self._registered:
            return
        registration = await self.bus.register()
        if registration.wrote:
            logger.info(
                "worker %s: stored the subscriptions of service %s (added: %s; changed: %s)",
                self.name,
                self.bus.service,
                ", ".join(registration.added) or "none",
                ", ".join(registration.changed) or "none",
            )
        self._registered = True

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """Say so when the claim loop ends without being asked to: nothing else would."""
        if self._stopping:
            return
        if self._beater is not None:  # a worker that claims nothing more is not live
            self._beater.cancel()
        self._driver_stop.set()
        if task.cancelled():
            logger.error(
                "worker %s: its claim loop was cancelled; it claims nothing more", self.name
            )
        elif (error := task.exception()) is not None:
            logger.error(
                "worker %s: its claim loop failed; it claims nothing more",
                self.name,
                exc_info=error,
            )

    async def join(self) -> None:
        """Wait until the claim loop ends: after ``stop()``, or when it fails, in
        which case its error is raised here (``asyncio.CancelledError`` if it was
        cancelled from elsewhere)."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a grace period, not a cancel scope
        """Stop claiming, let in-flight handlers finish, release the claimed items
        not yet started. After ``timeout`` seconds in-flight work is cancelled;
        its items stay leased until the lease runs out, then another worker takes them."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._driver_stop.set()  # a redrive step under way ends at its next item
        if self._wake is not None:
            self._wake.set()
        if self._consumer is not None:
            self._consumer.stop_receiving()
        started = time.monotonic()
        try:
            if not task.done():  # a loop that failed on its own has said so already
                await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if self._task is task:  # a second stop() waits for the first; one says so
                self.bus.core.ledger.remove_schedule_listener(self._on_retry_scheduled)
                await self._stop_watching()
                await self._stop_driving(
                    None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
                )
                await self._stop_beating()
                self._task = None
                logger.info("worker %s stopped", self.name)

    async def _stop_driving(self, grace: float | None) -> None:
        """Wait for the redrive driver to end (it stops before its next item and
        lets go of its redrives); after ``grace`` seconds it is cancelled, and its
        redrives wait for their lease to run out."""
        driver, self._driver = self._driver, None
        if driver is None:
            return
        self._driver_stop.set()
        done, _ = await asyncio.wait([driver], timeout=grace)
        if not done:
            driver.cancel()
            await asyncio.wait([driver])
        elif not driver.cancelled() and (error := driver.exception()) is not None:
            logger.error("worker %s: its redrive driver failed", self.name, exc_info=error)

    async def __aenter__(self) -> RetryWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _on_retry_scheduled(self, when: datetime) -> None:
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # the loop --------------------------------------------------------------

    def _store_failed(self, exc: StoreUnavailable, retry_in: float) -> None:
        """Log an outage of the store: once when it begins (each retry after that at
        debug level only)."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "worker %s: store unavailable, retrying in %.1fs (and on, with backoff): %s",
                self.name,
                retry_in,
                exc,
            )
        else:
            logger.debug("worker %s: store still unavailable: %s", self.name, exc)

    def _store_answered(self) -> None:
        """Log the end of an outage, once."""
        if self._outage_since is not None:
            lasted = time.monotonic() - self._outage_since
            self._outage_since = None
            logger.info(
                "worker %s: store %s is back after %.1fs", self.name, self.bus.store.url, lasted
            )

    async def _watch_store(self) -> None:
        """Connect and watch the store (a worker started while it was down)."""
        await self.bus.store.connect()
        self._unwatch = await self.bus.store.watch(self._wake_up)

    # heartbeats ------------------------------------------------------------

    async def _beat_continuously(self, *, first: bool) -> None:
        if not first:
            await asyncio.sleep(self.heartbeat_interval)
        while True:
            await self._beat()
            await asyncio.sleep(self.heartbeat_interval)

    async def _beat(self) -> None:
        """Store this worker's heartbeat. A failure is logged (once, until a beat
        goes through again) and never stops the worker."""
        store = self.bus.store
        from . import __version__  # the package is loaded whole by now

        now = self.bus.clock.now()
        beat = WorkerBeat(
            name=self.name,
            service=self.bus.service,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at or now,
            last_seen=now,
            interval=self.heartbeat_interval,
            lanes=self.concurrency,
            lanes_busy=min(self._busy, self.concurrency),
            handlers=tuple(self.bus.handler_names),
            version=__version__,
        )
        try:
            await store.beat(beat)
        except StoreUnavailable as exc:
            self._store_failed(exc, self.heartbeat_interval)
            return
        except Exception as exc:
            if not self._beat_failing:
                self._beat_failing = True
                logger.warning(
                    "worker %s: could not store its heartbeat: %s; it goes on working, and "
                    "tries again every %gs",
                    self.name,
                    exc,
                    self.heartbeat_interval,
                    exc_info=exc,
                )
            else:
                logger.debug("worker %s: still no heartbeat stored: %s", self.name, exc)
            return
        if self._beat_failing:
            self._beat_failing = False
            logger.info("worker %s: its heartbeat is stored again", self.name)

    async def _stop_beating(self) -> None:
        """Stop the heartbeats and delete the last one (best effort: a worker that
        could not shows as not live once three intervals have passed)."""
        beater, self._beater = self._beater, None
        if beater is None:
            return
        beater.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beater
        try:
            await asyncio.wait_for(self.bus.store.forget_worker(self.name), _FORGET_TIMEOUT)
        except Exception as exc:
            logger.warning(
                "worker %s: could not delete its heartbeat: %s; it shows as not live after %gs",
                self.name,
                exc or "timed out",
                3 * self.heartbeat_interval,
            )

    async def _loop(self, watching: bool = True) -> None:
        lanes = [
            asyncio.create_task(self._lane(), name=f"retrybus-lane-{self.name}-{n}")
            for n in range(self.concurrency)
        ]
        transport = self.bus.transport
        if transport is not None:
            self._consumer = TransportConsumer(
                self.bus.core,
                transport,
                name=self.name,
                prefetch=self.prefetch,
                lease=self.lease,
                handler_timeout=self.handler_timeout,
                suspect=lambda: self._suspect,
            )
            lanes.append(
                asyncio.create_task(self._consumer.run(), name=f"retrybus-consumer-{self.name}")
            )
        if self.relay and self.bus.outbox.url is not None:
            self._relay = self.bus.outbox.relay()
            lanes.append(asyncio.create_task(self._relay.run(), name=f"retrybus-relay-{self.name}"))
        try:
            await self._claim_continuously(watching)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # a forced stop whose cancellation a wait swallowed (wait_for can,
                # when what it waits for finishes at the same moment)
                raise asyncio.CancelledError
            # stopping: lanes start nothing more; each batch writes what finished
            # and gives back what no lane started
            for _ in range(self.concurrency):
                self._ready.put_nowait(None)
            if self._consumer is not None:
                self._consumer.stop_receiving()
            if self._relay is not None:
                self._relay.stop()
            for task in list(self._batches):
                batch = getattr(task, "batch", None)
                if isinstance(batch, ClaimedBatch):
                    batch.close()
            await asyncio.gather(*lanes, *self._batches)
        finally:
            # a forced stop (or a failure) cancels what still runs: items cut off
            # mid-handler keep their lease until it runs out
            running = [task for task in (*lanes, *self._batches) if not task.done()]
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            self._ready = asyncio.Queue()
            self._busy = 0
            self._consumer = None
            if self._relay is not None:
                await self._relay.close()
                self._relay = None

    async def _claim_continuously(self, watching: bool) -> None:
        backoff = 0.0
        while not self._stopping:
            try:
                if not watching:
                    await self._watch_store()
                    watching = True
                await self._register()
                await self._maintain()
                await self._sample_depth()
                await self._refresh_metrics()
                room = self._claim_room()
                if not room or self._suspect is not None:
                    await self._sleep(self.check_interval)  # a lane that frees wakes it
                    continue
                batch = await self._claim(room)
                self._store_answered()
                backoff = 0.0
            except StoreUnavailable as exc:
                backoff = min(max(backoff * 2, 0.5), _MAX_OUTAGE_BACKOFF)
                self._store_failed(exc, backoff)
                await self._sleep(backoff)
                continue
            except Exception:
                logger.exception("worker %s: unexpected error in the claim loop", self.name)
                await self._sleep(1.0)
                continue
            if batch is not None:
                self._start(batch)
                await asyncio.sleep(0)  # let the lanes start it
                continue
            await self._sleep(await self._idle_time())

    def _claim_room(self) -> int:
        """How many items the next claim takes (0: none yet). Besides an item per
        lane, items claimed ahead may wait for a lane, as many as the lanes would
        start within ``_CLAIM_AHEAD_WAIT`` at the handlers' recent call time (at
        most a batch; none before a call has ended): with quick handlers a lane
        that frees finds its next item at once and claims are large (one
        transaction for many items), while slow handlers' items are left to
        other workers. With items claimed ahead, the next claim waits until half
        of what may be held fits."""
        call_time = self._call_time
        ahead = (
            0
            if call_time is None
            else min(
                self.batch_size, int(self.concurrency * _CLAIM_AHEAD_WAIT / max(call_time, 1e-6))
            )
        )
        room = self.concurrency + ahead - self._busy - self._ready.qsize()
        least = max(1, min(self.batch_size, self.concurrency + ahead) // 2) if ahead else 1
        return min(room, self.batch_size) if room >= least else 0

    def _start(self, batch: ClaimedBatch) -> None:
        """Queue the batch's items for the lanes, and run its writes alongside."""
        for item in batch.items:
            self._ready.put_nowait((batch, item))
        task = asyncio.create_task(self._run_claimed(batch), name=f"retrybus-batch-{batch.owner}")
        task.batch = batch  # type: ignore[attr-defined]
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_claimed(self, batch: ClaimedBatch) -> None:
        try:
            await self._run_batch(batch, batch.settled.wait())
        except StoreUnavailable as exc:
            self._store_failed(exc, 1.0)
        except Exception:
            logger.exception("worker %s: unexpected error finishing a batch", self.name)

    async def _lane(self) -> None:
        """Run claimed items one after another, from any batch, until stopped."""
        while True:
            entry = await self._ready.get()
            if entry is None or self._stopping:
                return
            batch, item = entry
            # started as soon as a lane holds it: a suspect run alone meanwhile
            # gives back only what no lane holds, never an item that will still run
            batch.started += 1
            while self._suspect is not None:  # another lane runs a suspect alone
                await self._suspect.wait()
            if item.claims > 1 and item.claims <= self.bus.core.max_claims:
                await self._run_alone(batch, item)
                continue
            self._busy += 1
            started = time.monotonic()
            try:
                await self._run_item(batch, item)
            except Exception:
                # its lease runs out and the item is claimed again
                logger.exception("worker %s: unexpected error delivering %s", self.name, item.id)
            finally:
                self._busy -= 1
                took = time.monotonic() - started
                average = self._call_time
                self._call_time = (
                    took if average is None else average + (took - average) * _CALL_TIME_WEIGHT
                )
                batch.item_ended()
                if self._claim_room():
                    self._wake_up()  # room for another claim

    async def _idle_time(self) -> float:
        longest = self.check_interval
        now = self.bus.clock.now()
        if self._next_sweep is not None:
            longest = min(longest, max((self._next_sweep - now).total_seconds(), _MIN_IDLE))
        handlers = self.bus.core.claimable_handlers()
        flow = self._flow
        if flow.active:  # those waiting for tokens or a free slot wake it otherwise
            handlers = flow.not_held(handlers)
        try:
            due = await self.bus.store.next_due(handlers, service=self.bus.service)
        except StoreUnavailable:
            return longest
        half_open = self.bus.core.breakers.next_change()
        if half_open is not None and (due is None or half_open < due):
            due = half_open  # a breaker's probes fall due then
        tokens = flow.next_tokens() if flow.active else None
        if tokens is not None and (due is None or tokens < due):
            due = tokens  # a rate-limited handler's tokens fall due then
        if due is None:
            return longest
        wait = (due - self.bus.clock.now()).total_seconds()
        return min(longest, max(wait, _MIN_IDLE))

    async def _sleep(self, seconds: float) -> None:
        wake = self._wake
        if wake is None or self._stopping:
            return
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    async def _maintain(self) -> None:
        now = self.bus.clock.now()
        await self._sweep_unsubscribed(now)
        if self._next_maintenance is not None and now < self._next_maintenance:
            return
        self._next_maintenance = now + timedelta(seconds=self.maintenance_interval)
        expired = await self.bus.retry_queue.cleanup()
        deleted = await self.bus.dead_letters.cleanup()
        if expired or deleted:
            logger.info(
                "worker %s: moved %d expired retry items to the DLQ, deleted %d old dead letters",
                self.name,
                expired,
                deleted,
            )
        store = self.bus.store
        if self.bus.core.remembered.in_use:
            forgot = await store.forget_successes(now)
            if forgot:
                logger.info(
                    "worker %s: forgot %d successes past the inbox's retention", self.name, forgot
                )
        pruned = await store.prune_workers(now - SERVICE_RECORDS_KEPT)
        forgotten = await store.forget_subscriptions(now - SERVICE_RECORDS_KEPT)
        if pruned or forgotten:
            logger.info(
                "worker %s: deleted %d heartbeats not seen for a day and %d subscriptions "
                "removed a day ago",
                self.name,
                pruned,
                forgotten,
            )

    async def _sweep_unsubscribed(self, now: datetime) -> None:
        """Every ``UNSUBSCRIBED_SWEEP_INTERVAL`` seconds, move to the dead letter
        queue what waits for removed subscriptions (one batch; a full one goes on
        at the next turn of the loop)."""
        if self._next_sweep is not None and now < self._next_sweep:
            return
        self._next_sweep = now + timedelta(seconds=UNSUBSCRIBED_SWEEP_INTERVAL)
        moved = await self.bus.services.sweep(limit=UNSUBSCRIBED_BATCH)
        if moved:
            logger.info(
                "worker %s: dead-lettered %d deliveries of removed subscriptions",
                self.name,
                moved,
            )
        if moved >= UNSUBSCRIBED_BATCH:
            self._next_sweep = now  # more may wait: the next turn goes on

    async def _sample_depth(self) -> None:
        history = self.depth_history
        now = self.bus.clock.now()
        if history is None or (self._next_sample is not None and now < self._next_sample):
            return
        self._next_sample = now + timedelta(seconds=history.interval)
        try:
            await history.record()
        except StoreUnavailable:
            raise
        except Exception:  # the chart's history is not worth stopping retries for
            logger.exception("worker %s: could not record the queue depth", self.name)

    async def _refresh_metrics(self) -> None:
        metrics = self.bus.metrics
        now = self.bus.clock.now()
        if metrics is None or (self._next_metrics is not None and now < self._next_metrics):
            return
        self._next_metrics = now + timedelta(seconds=self.metrics_interval)
        try:
            await metrics.refresh(self.bus)
        except StoreUnavailable:
            raise
        except Exception:  # a gauge is not worth stopping retries for
            logger.exception("worker %s: could not read the queues' depth for metrics", self.name)

    # one pass --------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim one batch of due items and process it; returns how many items were handled."""
        batch = await self._claim()
        if batch is None:
            return 0
        await self._run_batch(batch, self._process(batch))
        return len(batch.handled)

    async def _claim(self, limit: int | None = None) -> ClaimedBatch | None:
        owner = f"{self.name}:{next(self._claims)}"
        limit = limit or self.batch_size
        breakers = self.bus.core.breakers
        if breakers.active:
            await breakers.refresh_if_due()

        def claim(count: int, handlers: list[str]) -> Awaitable[list[RetryItem]]:
            return self.bus.retry_queue.claim_due(
                count, lease=self.lease, owner=owner, handlers=handlers, service=self.bus.service
            )

        handlers = self.bus.core.claimable_handlers()
        flow = self._flow
        if not flow.active:
            items = await claim(limit, handlers)
        else:  # limited handlers first, each on its own: as many as it may run now
            handlers, limited = flow.split(handlers)
            items = await flow.claim(claim, limited, limit, self._waiting)
            if handlers and len(items) < limit:
                try:
                    items += await claim(limit - len(items), handlers)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await self.bus.store.release([item.id for item in items], owner)
                    raise
        budgets = self.bus.core.retry_budgets
        if budgets is not None and items:
            items = await self._within_budget(budgets, items, owner)
        if breakers.active and len(items) < limit:  # a half-open breaker's probes
            items += await breakers.claim_probes(claim, limit - len(items))
        if not items:
            return None
        remembered = self.bus.core.remembered
        if remembered.in_use:
            await self._check_inbox(items, owner)
        return ClaimedBatch(owner, items, lease_deadline=time.monotonic() + self.lease)

    async def _within_budget(
        self, budgets: RetryBudgets, items: list[RetryItem], owner: str
    ) -> list[RetryItem]:
        """The claimed records to run: the retries over the handlers' retry budget
        go back to the queue at once, due later, their attempt unused (written
        directly, not announced: no handler was called). Should that write fail,
        they are given back as they were."""
        run, postponed = budgets.sort_claimed(items)
        if postponed:
            for line in budgets.news(postponed):
                logger.info("worker %s: %s", self.name, line)
            try:
                await self.bus.store.complete(postponed, owner, self.bus.clock.now())
            except StoreUnavailable:
                with contextlib.suppress(StoreUnavailable):  # else their leases run out
                    await self.bus.store.release([p.item.id for p in postponed], owner)
        return run

    def _waiting(self) -> Counter[str]:
        """Claimed records no lane has started yet, by handler (a batch's items
        start in order)."""
        return Counter(
            item.handler_name
            for task in self._batches
            if isinstance(batch := getattr(task, "batch", None), ClaimedBatch)
            for item in batch.items[batch.started :]
        )

    async def _check_inbox(self, items: Sequence[RetryItem], owner: str) -> None:
        """One look at the store's remembered successes for a claimed batch: the
        records found there are finished as successes without a call
        (``_deliver``). Should the look fail, the batch is given back."""
        try:
            self._handled |= await self.bus.core.remembered.handled_records(
                items, self.bus.clock.now()
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.bus.store.release([item.id for item in items], owner)
            raise

    async def _run_batch(self, batch: ClaimedBatch, work: Awaitable[object]) -> None:
        """Keep the batch's leases and write its outcomes while ``work`` runs its items."""
        owner = batch.owner
        heartbeat = asyncio.create_task(self._heartbeat(batch))
        flusher = asyncio.create_task(self._flush(batch))
        try:
            await work
        finally:
            # Also when cancelled (a forced stop): write what finished, give back
            # what no handler started. Items cut off mid-handler keep their lease
            # (a plain handler's thread may still be running) until it runs out.
            # The heartbeat goes on until the outcomes are written: a store that is
            # briefly away must not cost the leases of work that is already done.
            batch.finish()
            try:
                await flusher
            finally:
                heartbeat.cancel()
                if batch.pending:  # outcomes that never reached the store
                    self.bus.core.ledger.unwritten(batch.take_pending())
                unstarted = batch.unstarted_ids()
                if unstarted:
                    await self.bus.store.release(unstarted, owner)

    async def _process(self, batch: ClaimedBatch) -> None:
        async def lane() -> None:
            while not self._stopping:
                item = batch.next_item()
                if item is None:
                    return
                await self._run_item(batch, item)

        lanes = min(self.concurrency, len(batch.items))
        if lanes == 1:
            await lane()
        else:
            # A TaskGroup, not gather: should one lane fail, the others are cancelled
            # and awaited before the batch's items are released.
            async with asyncio.TaskGroup() as group:
                for _ in range(lanes):
                    group.create_task(lane())

    async def _flush(self, batch: ClaimedBatch) -> None:
        """Write outcomes as they come, lingering briefly so that outcomes finishing
        together are written together."""
        while True:
            if not batch.pending:
                if batch.finished:
                    return
                batch.ready.clear()
                await batch.ready.wait()
                continue
            if not batch.finished:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(batch.done.wait(), _FLUSH_LINGER)
            attempted = batch.take_pending()
            batch.writing = True
            try:
                await self._complete(attempted, batch)
            except StoreUnavailable as exc:
                batch.pending[:0] = attempted  # keep them: the store may come back
                left = batch.lease_deadline - time.monotonic()
                if left <= 0:
                    # the leases are gone: these items run again elsewhere (at least once)
                    raise
                logger.warning(
                    "worker %s: %d outcome(s) wait for the store; their leases last %.0fs more",
                    self.name,
                    len(batch.pending),
                    left,
                )
                self._store_failed(exc, min(1.0, left))
                await asyncio.sleep(min(1.0, left))
            finally:
                batch.writing = False

    async def _deliver(self, item: RetryItem, batch: ClaimedBatch) -> Attempted | None:
        """Run ``item``; None when its breaker opened since it was claimed: it is
        given back uncalled (due as it was, its attempt unused)."""
        core = self.bus.core
        if core.breakers.active and not core.breakers.admits_claimed(item):
            batch.handled.add(item.id)  # no outcome will come: not held, not counted
            with contextlib.suppress(StoreUnavailable):  # else its lease runs out
                await self.bus.store.release([item.id], batch.owner)
            return None
        if item.claims > core.max_claims:
            return Attempted(undeliverable(item, core.max_claims, core.clock.now()))
        if self._handled and item.id in self._handled:
            # the inbox: this handler succeeded with this event before
            self._handled.discard(item.id)
            core.inbox_skipped(item.handler_name, item.to_event())
            return Attempted(Succeeded(item))
        return await deliver(
            item,
            core.subscription(item.handler_name),
            observers=core.observers,
            clock=core.clock,
            default_policy=core.default_policy,
            time_limit=self.handler_timeout,
        )

    async def _run_item(self, batch: ClaimedBatch, item: RetryItem) -> None:
        attempted = await self._deliver(item, batch)
        if attempted is not None:
            batch.add(attempted)
            budgets = self.bus.core.retry_budgets
            if budgets is not None and isinstance(attempted.outcome, Succeeded):
                budgets.succeeded(item)

    async def _complete(self, attempted: list[Attempted], batch: ClaimedBatch) -> None:
        ledger = self.bus.core.ledger
        pause = 0.1
        for attempt in range(6):
            try:
                applied = await ledger.complete(attempted, batch.owner, self.bus.clock.now())
                self._store_answered()
                break
            except StoreUnavailable as exc:
                if attempt == 5:
                    raise
                self._store_failed(exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
        lost = len(attempted) - len(applied)
        if lost:
            logger.warning(
                "worker %s: %d item(s) were taken over by another worker after their lease ran out; "
                "their outcome here is discarded",
                self.name,
                lost,
            )

    async def _run_alone(self, batch: ClaimedBatch, item: RetryItem) -> None:
        """Run a suspect (an item claimed before without an outcome: perhaps what
        killed a worker) with nothing else in flight: the other lanes wait, the
        items no lane started are given back first and every outcome is written
        before and after it, so that should it kill this worker too, only its own
        claims count (``max_claims``), not its neighbours'."""
        self._suspect = done = asyncio.Event()
        self._busy += 1
        try:
            # polls the lanes' and batches' state: suspects are rare
            while self._busy > 1 or not self._quiet():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            await self._give_back_unstarted()
            await self._run_item(batch, item)
            while not self._quiet():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        except Exception:
            logger.exception("worker %s: unexpected error delivering %s", self.name, item.id)
        finally:
            self._busy -= 1
            self._suspect = None
            done.set()
            batch.item_ended()
            self._wake_up()

    def _quiet(self) -> bool:
        if self._consumer is not None and not self._consumer.quiet:
            return False
        return all(task.batch.quiet for task in self._batches if hasattr(task, "batch"))

    async def _give_back_unstarted(self) -> None:
        """Release every claimed item no lane has started (its claim no longer counts)."""
        while not self._ready.empty():
            if self._ready.get_nowait() is None:
                self._ready.put_nowait(None)  # a stop: leave it for a lane
                break
        for task in list(self._batches):
            batch = getattr(task, "batch", None)
            if isinstance(batch, ClaimedBatch):
                ids = batch.give_back_unstarted()
                if ids:
                    with contextlib.suppress(StoreUnavailable):
                        await self.bus.store.release(ids, batch.owner)

    async def _heartbeat(self, batch: ClaimedBatch) -> None:
        """Extend the batch's leases every third of a lease while its handlers run."""
        interval = self.lease / 3
        warned = False
        while True:
            await asyncio.sleep(interval)
            until = self.bus.clock.now() + timedelta(seconds=self.lease)
            held = batch.unwritten_ids()
            try:
                # A heartbeat that waits longer than this is too late to matter.
                extended = await asyncio.wait_for(
                    self.bus.store.extend_leases(held, batch.owner, until), interval
                )
            except (StoreUnavailable, TimeoutError) as exc:
                logger.warning(
                    "worker %s: could not extend leases: %s", self.name, exc or "timed out"
                )
                continue
            batch.lease_deadline = time.monotonic() + self.lease
            lost = len(held) - extended
            if lost > 0 and not warned:
                warned = True
                logger.warning(
                    "worker %s: the lease on %d item(s) ran out before it could be extended; "
                    "another worker may be running them too, and only its outcome will count",
                    self.name,
                    lost,
                )
