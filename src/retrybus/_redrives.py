"""``bus.redrives``: start, steer and drive redrives (the record is ``_redrive.Redrive``).

Driving is a series of steps. A step leases the redrive to this runner (a
compare-and-set on its record), takes what the rate allows now from after the
redrive's cursor, and writes the progress back. While a step runs, its lease is
renewed; a step that loses its lease (another runner took over, or someone
paused or cancelled the redrive) stops before its next item. Steps of one
redrive never overlap within a process. Whatever happens to the record during a
step (a pause, a cancel), the step's counts are added to it, not lost.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Unpack

from ._errors import (
    ItemBusy,
    ItemNotFound,
    OtherService,
    RedriveConflict,
    StoreUnavailable,
    UnknownHandler,
)
from ._filters import DeadLetterFilter, FilterFields, filter_from
from ._inbox.remembered import PROBE_MARK
from ._records import RetryItem, dead_letter_id_for, delivery_id
from ._redrive import (
    ACTIONS,
    DEFAULT_PROBE_TIMEOUT,
    FINAL,
    Redrive,
    check_probe_timeout,
    duration_text,
    parse_rate,
)

if TYPE_CHECKING:
    from ._core import BusCore
    from ._dead_letters import DeadLetterQueue

__all__ = ["Redrives"]

logger = logging.getLogger("retrybus.redrive")

PREFIX = "redrive:"
RUNNER_LEASE = 30.0
# a step stops taking items after this long, well inside its lease
STEP_BUDGET = RUNNER_LEASE / 3
# items taken per step without a rate limit
UNLIMITED_BATCH = 200


@dataclass(slots=True)
class _Taken:
    """What one step took: how many dead letters it looked at, how they went, the
    new retry items' ids (requeue), the first error and where to go on from."""

    listed: int = 0
    succeeded: int = 0
    failed: int = 0
    retry_ids: list[str] = field(default_factory=list)
    delivery_ids: list[str] = field(default_factory=list)
    first_error: str = ""
    cursor: tuple[datetime, str] | None = None


@dataclass(slots=True)
class _ProbeCount:
    """How a requeue's probe items went so far: handled successfully (a worker
    of this release remembers each success of a probe item, ``PROBE_MARK``),
    failed again, gone from both queues without a remembered success (deleted by
    someone, or handled by a worker that does not remember them: not a success,
    not a failure), and the items still waiting for a worker."""

    succeeded: int = 0
    failed: int = 0
    gone: int = 0
    first_error: str = ""
    waiting: list[RetryItem] = field(default_factory=list)

    @property
    def handled(self) -> int:
        return self.succeeded + self.failed + self.gone


class Redrives:
    """``bus.redrives``: start, watch and steer redrives of the dead letter queue.

    >>> redrive = await bus.redrives.start(DeadLetterFilter(handler_name="Mailer"),
    ...                                    rate=10, probe=5, actor="alice")
    >>> await bus.redrives.run(redrive.id)   # drive it here until it ends or is paused
    """

    def __init__(self, core: BusCore, dead_letters: DeadLetterQueue) -> None:
        self._core = core
        self._dead_letters = dead_letters
        self.owner = f"redrive-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._steps: dict[str, asyncio.Lock] = {}

    # starting and steering -------------------------------------------------

    async def start(
        self,
        where: DeadLetterFilter | None = None,
        *,
        action: str = "requeue",
        rate: float | str | None = None,
        probe: int = 0,
        probe_timeout: float | None = DEFAULT_PROBE_TIMEOUT,
        actor: str | None = None,
        **fields: Unpack[FilterFields],
    ) -> Redrive:
        """Create a redrive of the dead letters matching ``where`` (and the filter
        fields given as keyword arguments) now.

        ``rate`` bounds it to that many items per second (``10``, ``"600/m"``);
        ``probe`` first takes that many items alone and goes on only once they
        have succeeded (for ``requeue``: once a worker has handled them), stopping
        for good if any fails again. A requeue's probe waits for a worker of the
        items' service (its message says when none is running) for at most
        ``probe_timeout`` seconds (None: for ever), then stops the redrive (what
        it requeued stays queued). A probe item that disappears without a
        success being remembered (someone deleted it) is neither a success nor a
        failure: when all are gone so, the probe takes the next items.
        ``action="reprocess"`` calls the handlers in
        the process that runs the redrive, which must subscribe them, and takes
        only unprocessed dead letters of this bus's service (on a store that keeps
        services; ``OtherService`` for a filter naming another).
        """
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0:
            raise ValueError(f"probe must be an int >= 0, got {probe!r}")
        probe_timeout = check_probe_timeout(probe_timeout)
        where = filter_from(where, fields)
        if action == "reprocess" and where.processed is True:
            raise ValueError(
                "a reprocess redrive takes unprocessed dead letters, not processed=True"
            )
        if (
            action == "reprocess"
            and where.service is not None
            and where.service != self._core.service
        ):
            raise OtherService(None, where.service)
        per_second = parse_rate(rate)
        now = self._core.clock.now()
        selected = where.narrowed(created_before=now + timedelta(microseconds=1), cursor=None)
        if action == "reprocess":
            # this service's own dead letters only: it has their handlers
            selected = replace(selected, processed=False, service=self._core.service)
        total = await self._core.store.count_dead(selected)
        redrive = Redrive(
            id=f"redrive_{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:8]}",
            action=action,
            where=selected,
            rate=per_second,
            probe=probe,
            probe_timeout=probe_timeout,
            state="probing" if probe else "running",
            total=total,
            created_by=actor,
            created_at=now,
            updated_at=now,
        )
        version = await self._core.store.put_control(
            PREFIX + redrive.id, redrive.to_dict(), version=0
        )
        if version is None:  # pragma: no cover - ids are unique
            raise RedriveConflict(f"redrive {redrive.id} exists already")
        return replace(redrive, version=version)

    async def get(self, redrive_id: str) -> Redrive:
        """The redrive with this id; raises ``ItemNotFound``."""
        record = await self._core.store.get_control(PREFIX + redrive_id)
        if record is None:
            raise ItemNotFound(redrive_id)
        return Redrive.from_dict(dict(record.value), record.version)

    async def list(self) -> builtins.list[Redrive]:
        """Every redrive the store keeps, newest first (a damaged record is logged
        and left out)."""
        redrives = []
        for record in await self._core.store.list_control(PREFIX):
            try:
                redrives.append(Redrive.from_dict(dict(record.value), record.version))
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("cannot read redrive record %s: %s", record.key, exc)
        return sorted(redrives, key=lambda r: (r.created_at, r.id), reverse=True)

    async def pause(self, redrive_id: str) -> Redrive:
        """Pause an active redrive (it keeps its progress); ``resume`` goes on."""
        return await self._change(redrive_id, self._paused)

    async def resume(self, redrive_id: str) -> Redrive:
        """Resume a paused redrive."""
        return await self._change(redrive_id, self._resumed)

    async def cancel(self, redrive_id: str) -> Redrive:
        """Cancel a redrive for good (what it requeued stays requeued)."""
        return await self._change(redrive_id, self._cancelled)

    async def delete(self, redrive_id: str) -> None:
        """Forget a finished redrive; raises ``ItemNotFound``, or ``ValueError`` while
        it is not finished (cancel it first)."""
        redrive = await self.get(redrive_id)
        if not redrive.finished:
            raise ValueError(f"redrive {redrive_id} is {redrive.state}: cancel it first")
        await self._core.store.delete_control(PREFIX + redrive_id)

    @staticmethod
    def _paused(redrive: Redrive, now: datetime) -> Redrive:
        if not redrive.active:
            raise ValueError(f"redrive {redrive.id} is {redrive.state}, not active: cannot pause")
        return replace(
            redrive,
            state="paused",
            resume_state=redrive.state,
            message="paused",
            runner=None,
            runner_until=None,
            updated_at=now,
        )

    @staticmethod
    def _resumed(redrive: Redrive, now: datetime) -> Redrive:
        if redrive.state != "paused":
            raise ValueError(f"redrive {redrive.id} is {redrive.state}, not paused: cannot resume")
        return replace(
            redrive,
            state=redrive.resume_state or "running",
            resume_state=None,
            message="resumed",
            # the probe's time limit counts again from now
            probe_since=None if redrive.probe_since is None else now,
            allowance=1.0,
            last_step_at=None,
            runner=None,
            runner_until=None,
            updated_at=now,
        )

    @staticmethod
    def _cancelled(redrive: Redrive, now: datetime) -> Redrive:
        if redrive.finished:
            raise ValueError(f"redrive {redrive.id} is {redrive.state} already")
        return replace(
            redrive,
            state="cancelled",
            message="cancelled",
            finished_at=now,
            runner=None,
            runner_until=None,
            updated_at=now,
        )

    async def _change(
        self, redrive_id: str, change: Callable[[Redrive, datetime], Redrive]
    ) -> Redrive:
        while True:
            current = await self.get(redrive_id)
            saved = await self._save(change(current, self._core.clock.now()))
            if saved is not None:
                return saved

    async def _save(self, redrive: Redrive) -> Redrive | None:
        version = await self._core.store.put_control(
            PREFIX + redrive.id, redrive.to_dict(), version=redrive.version
        )
        return None if version is None else replace(redrive, version=version)

    # driving ---------------------------------------------------------------

    async def step(self, redrive_id: str, *, stop: asyncio.Event | None = None) -> Redrive:
        """Advance one redrive by what its rate allows now, if no other runner holds
        it. Returns it as stored afterwards. Once ``stop`` is set, the step takes no
        more items (what it took is written)."""
        lock = self._steps.setdefault(redrive_id, asyncio.Lock())
        async with lock:
            return await self._step(redrive_id, stop)

    async def _step(self, redrive_id: str, stop: asyncio.Event | None = None) -> Redrive:
        redrive = await self.get(redrive_id)
        if not redrive.active:
            return redrive
        now = self._core.clock.now()
        if (
            redrive.runner not in (None, self.owner)
            and redrive.runner_until is not None
            and redrive.runner_until > now
        ):
            return redrive  # another runner drives it
        held = await self._save(
            replace(
                redrive,
                runner=self.owner,
                runner_until=now + timedelta(seconds=RUNNER_LEASE),
                updated_at=now,
            )
        )
        if held is None:
            return await self.get(redrive_id)  # changed meanwhile: next step
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(held.id, lost, stop))
        try:
            if held.state == "probing":
                return await self._probe_step(held, now, lost)
            return await self._run_step(held, now, lost)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_lease(
        self, redrive_id: str, lost: asyncio.Event, stop: asyncio.Event | None = None
    ) -> None:
        """Renew this runner's lease while a step runs; set ``lost`` when it is gone,
        or when ``stop`` is set (the step then ends at its next item)."""
        stop = stop or asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RUNNER_LEASE / 3)
            if stop.is_set():
                lost.set()
                return
            while True:
                current = await self.get(redrive_id)
                if current.runner != self.owner or not current.active:
                    lost.set()
                    return
                until = self._core.clock.now() + timedelta(seconds=RUNNER_LEASE)
                if await self._save(replace(current, runner_until=until)) is not None:
                    break

    async def run(
        self,
        redrive_id: str,
        *,
        interval: float = 0.2,
        on_progress: Callable[[Redrive], Any] | None = None,
    ) -> Redrive:
        """Drive a redrive here until it is finished or paused; returns it then.
        ``on_progress(redrive)`` is called after each step."""
        while True:
            redrive = await self.step(redrive_id)
            if on_progress is not None:
                on_progress(redrive)
            if not redrive.active:
                return redrive
            await asyncio.sleep(interval)

    def can_drive(self, redrive: Redrive) -> bool:
        """Whether this bus can drive ``redrive``: a reprocess needs its handlers
        (and its service's)."""
        if redrive.action != "reprocess":
            return True
        if redrive.where.service not in (None, self._core.service):
            return False
        names = self._core.registry.names()
        handler = redrive.where.handler_name
        return bool(names) and (handler is None or handler in names)

    async def run_all(self, *, interval: float = 0.5, stop: asyncio.Event | None = None) -> None:
        """Drive every active redrive in the store that this bus can drive, for as
        long as this runs (the dashboard and every ``RetryWorker`` run it in the
        background); returns soon after ``stop`` is set (a step under way stops
        before its next item), letting go of the redrives it holds so that another
        runner goes on with them at once. Runners cooperate: a redrive another
        runner holds is left to it. A store outage is logged once (and once more
        when the store is back); a failing redrive is logged, the others go on."""
        stop = stop or asyncio.Event()
        outage: _Outage = _Outage()
        held: set[str] = set()
        try:
            while not stop.is_set():
                await self._drive_once(interval, stop, outage, held)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            if held:
                await asyncio.shield(self._let_go_all(held))

    async def _drive_once(
        self, interval: float, stop: asyncio.Event, outage: _Outage, held: set[str]
    ) -> None:
        """One pass of ``run_all``: a step of each active redrive this bus can drive."""
        try:
            redrives = await self.list()
        except StoreUnavailable as exc:
            outage.failed(f"cannot list redrives, again in {interval:.1f}s: {exc}")
            return
        except Exception:
            logger.exception("cannot list redrives, again in %.1fs", interval)
            return
        outage.answered()
        for redrive in redrives:
            if stop.is_set():
                return
            if not redrive.active or not self.can_drive(redrive):
                continue
            try:
                after = await self.step(redrive.id, stop=stop)
            except StoreUnavailable as exc:
                outage.failed(f"redrive {redrive.id}: store unavailable: {exc}")
                continue
            except Exception:
                logger.exception("redrive %s: step failed", redrive.id)
                continue
            if after.runner == self.owner:
                held.add(redrive.id)
            else:
                held.discard(redrive.id)

    async def _let_go_all(self, redrive_ids: set[str]) -> None:
        for redrive_id in redrive_ids:
            try:
                await self.let_go(redrive_id)
            except StoreUnavailable as exc:
                logger.warning(
                    "redrive %s: could not let go (another runner takes over once its "
                    "lease runs out): %s",
                    redrive_id,
                    exc,
                )
            except Exception:
                logger.exception("redrive %s: could not let go", redrive_id)

    async def let_go(self, redrive_id: str) -> Redrive:
        """Give up this runner's lease on a redrive (after a step), so that another
        runner need not wait for it to run out; returns the redrive as stored. A
        redrive held by another runner, or none, is left as it is."""
        lock = self._steps.setdefault(redrive_id, asyncio.Lock())
        async with lock:
            while True:
                current = await self.get(redrive_id)
                if current.runner != self.owner:
                    return current
                saved = await self._save(replace(current, runner=None, runner_until=None))
                if saved is not None:
                    return saved

    async def _finish_step(self, redrive: Redrive, **changes: Any) -> Redrive:
        """Write a step's result. When the record changed meanwhile (a lease renewal,
        a pause, a cancel), the step's counts and position are added to it as it is
        now; its state change holds if the state is still the step's, and a final
        decision (completed, stopped) also holds over a pause."""
        if changes.get("state") in FINAL:
            changes.update(runner=None, runner_until=None)
        saved = await self._save(replace(redrive, **changes))
        if saved is not None:
            return saved
        done_delta = changes.get("done", redrive.done) - redrive.done
        failed_delta = changes.get("failed", redrive.failed) - redrive.failed
        new_state = changes.get("state")
        while True:
            current = await self.get(redrive.id)
            if current.state == redrive.state:
                merged = replace(current, **changes)
            elif current.state == "paused" and new_state in FINAL:
                merged = replace(current, **changes, resume_state=None)
            elif current.state == "paused" and new_state == "running":
                merged = replace(current, resume_state="running", message=changes["message"])
            else:
                merged = current
            merged = replace(
                merged,
                done=current.done + done_delta,
                failed=current.failed + failed_delta,
                cursor=changes.get("cursor", current.cursor),
                probe_ids=changes.get("probe_ids", current.probe_ids),
                probe_deliveries=changes.get("probe_deliveries", current.probe_deliveries),
                probe_since=changes.get("probe_since", current.probe_since),
                updated_at=self._core.clock.now(),
            )
            saved = await self._save(merged)
            if saved is not None:
                return saved

    def _allowance(self, redrive: Redrive, now: datetime) -> tuple[int, float]:
        """How many items this step may take, and the allowance left afterwards."""
        if redrive.rate is None:
            return UNLIMITED_BATCH, 1.0
        allowance = redrive.allowance
        if redrive.last_step_at is not None:
            elapsed = max(0.0, (now - redrive.last_step_at).total_seconds())
            allowance = min(allowance + elapsed * redrive.rate, max(1.0, redrive.rate))
        take = int(allowance)
        return take, allowance - take

    async def _take(
        self, redrive: Redrive, count: int, lost: asyncio.Event, *, probe: bool = False
    ) -> _Taken:
        """Requeue or reprocess up to ``count`` dead letters after the cursor
        (``probe``: requeued marked as the redrive's probe items)."""
        where = redrive.where.narrowed(cursor=redrive.cursor)
        items = await self._core.store.list_dead(where, limit=count, offset=0)
        taken = _Taken(cursor=redrive.cursor)
        started = time.monotonic()
        actor = redrive.created_by
        for item in items:
            if lost.is_set() or time.monotonic() - started > STEP_BUDGET:
                break
            taken.listed += 1
            taken.cursor = (item.created_at, item.id)
            if redrive.action == "requeue":
                try:
                    retry_item = await self._dead_letters.requeue(
                        item.id, actor=actor, metadata={PROBE_MARK: redrive.id} if probe else None
                    )
                except (ItemNotFound, ItemBusy):
                    continue  # requeued, deleted or being reprocessed by someone else
                taken.succeeded += 1
                taken.retry_ids.append(retry_item.id)
                taken.delivery_ids.append(
                    delivery_id(
                        retry_item.event_source,
                        retry_item.event_id,
                        retry_item.handler_name,
                        retry_item.service,
                    )
                )
                continue
            try:
                updated, ok = await self._dead_letters.attempt_reprocess(item.id, actor=actor)
            except (ItemNotFound, ItemBusy):
                continue
            except (UnknownHandler, OtherService) as exc:
                taken.failed += 1
                taken.first_error = taken.first_error or str(exc)
                continue
            if ok:
                taken.succeeded += 1
            else:
                taken.failed += 1
                taken.first_error = taken.first_error or f"{updated.error_type}: {updated.error}"
        return taken

    async def _run_step(self, redrive: Redrive, now: datetime, lost: asyncio.Event) -> Redrive:
        take, allowance = self._allowance(redrive, now)
        if take == 0:
            return await self._finish_step(redrive, allowance=allowance, last_step_at=now)
        taken = await self._take(redrive, take, lost)
        done, failed = redrive.done + taken.succeeded, redrive.failed + taken.failed
        if taken.listed == 0 and not lost.is_set():
            return await self._finish_step(
                redrive,
                state="completed",
                message=_summary(redrive.action, done, failed),
                finished_at=self._core.clock.now(),
                done=done,
                failed=failed,
            )
        return await self._finish_step(
            redrive,
            done=done,
            failed=failed,
            cursor=taken.cursor,
            allowance=allowance,
            last_step_at=now,
            message=_summary(redrive.action, done, failed),
        )

    async def _probe_step(self, redrive: Redrive, now: datetime, lost: asyncio.Event) -> Redrive:
        if redrive.action == "reprocess":
            # reprocessing answers at once: the probe is decided in this step
            taken = await self._take(redrive, redrive.probe, lost)
            if taken.listed == 0:
                return await self._nothing_matched(redrive, lost)
            return await self._probe_outcome(
                redrive,
                taken.succeeded + taken.failed,
                taken.failed,
                taken.first_error,
                done=redrive.done + taken.succeeded,
                failed=redrive.failed + taken.failed,
                cursor=taken.cursor,
            )
        if not redrive.probe_ids:
            taken = await self._take(redrive, redrive.probe, lost, probe=True)
            if taken.listed == 0:
                return await self._nothing_matched(redrive, lost)
            message = (
                f"probe: {len(taken.retry_ids)} requeued, waiting for a worker"
                if taken.retry_ids
                else "probe: nothing could be requeued (taken by others), trying again"
            )
            return await self._finish_step(
                redrive,
                done=redrive.done + taken.succeeded,
                probe_ids=tuple(taken.retry_ids),
                probe_deliveries=tuple(taken.delivery_ids),
                probe_since=now if taken.retry_ids else None,
                cursor=taken.cursor,
                message=message,
                last_step_at=now,
            )
        size = len(redrive.probe_ids)
        count = await self._probe_results(redrive, now)
        if count.failed:
            return await self._probe_outcome(redrive, size, count.failed, count.first_error)
        if not count.waiting and count.succeeded:
            return await self._probe_outcome(redrive, size, 0, "", gone=count.gone)
        if not count.waiting:
            # every item went without a success: no evidence either way, probe the next
            return await self._finish_step(
                redrive,
                probe_ids=(),
                probe_deliveries=(),
                probe_since=None,
                message=f"probe: {count.gone} of {size} gone without a success "
                "(deleted by someone?): neither passed nor failed, probing the next items",
            )
        since = redrive.probe_since or redrive.last_step_at or redrive.updated_at
        if redrive.probe_timeout is not None and now - since >= timedelta(
            seconds=redrive.probe_timeout
        ):
            return await self._finish_step(
                redrive,
                state="stopped",
                message=f"probe timed out after {duration_text(redrive.probe_timeout)}: "
                f"{count.handled} of {size} handled"
                + _gone_note(count.gone)
                + " (the rest stay queued)",
                finished_at=self._core.clock.now(),
            )
        idle = await self._idle_services(count.waiting, now)
        if idle:
            message = (
                f"no worker of service {', '.join(idle)} is running: the probe waits for one "
                f"({count.handled} of {size} handled)"
            )
        else:
            message = f"probe: {count.handled} of {size} handled, waiting for a worker"
        return await self._finish_step(redrive, message=message + _gone_note(count.gone))

    async def _idle_services(
        self, waiting: builtins.list[RetryItem], now: datetime
    ) -> builtins.list[str]:
        """The services of the waiting probe items that have no live worker
        running their handler (a heartbeat naming no handlers counts as running
        all)."""
        idle = []
        wanted: dict[str, set[str]] = {}
        for item in waiting:
            wanted.setdefault(item.service, set()).add(item.handler_name)
        for service, handlers in sorted(wanted.items()):
            live = [b for b in await self._core.store.list_workers(service) if b.live_at(now)]
            if not any(not b.handlers or handlers & set(b.handlers) for b in live):
                idle.append(service)
        return idle

    async def _nothing_matched(self, redrive: Redrive, lost: asyncio.Event) -> Redrive:
        if lost.is_set():
            return await self.get(redrive.id)
        return await self._finish_step(
            redrive,
            state="completed",
            message=_summary(redrive.action, redrive.done, redrive.failed)
            if redrive.done or redrive.failed
            else "nothing matched",
            finished_at=self._core.clock.now(),
        )

    async def _probe_outcome(
        self,
        redrive: Redrive,
        size: int,
        failures: int,
        error: str,
        *,
        gone: int = 0,
        **changes: Any,
    ) -> Redrive:
        if failures:
            return await self._finish_step(
                redrive,
                state="stopped",
                message=f"probe failed: {failures} of {size} failed again ({error})",
                finished_at=self._core.clock.now(),
                **changes,
            )
        return await self._finish_step(
            redrive,
            state="running",
            message=f"probe passed: {size - gone} of {size} succeeded" + _gone_note(gone),
            allowance=1.0,
            last_step_at=None,
            **changes,
        )

    async def _probe_results(self, redrive: Redrive, now: datetime) -> _ProbeCount:
        """How the requeued probe items went. An item still queued at attempt 1
        is waiting; one rescheduled (attempt > 1) or back in the dead letter
        queue failed again; one gone from both succeeded if the store remembers
        its success (``PROBE_MARK``), else it is gone: deleted by someone, most
        likely, and counted as neither."""
        count = _ProbeCount()
        gone: list[str] = []
        for retry_id in redrive.probe_ids:
            item = await self._core.store.get_retry(retry_id)
            if item is not None:
                if item.attempt > 1:
                    count.failed += 1
                    count.first_error = count.first_error or f"{item.error_type}: {item.error}"
                else:
                    count.waiting.append(item)
                continue
            dead = await self._core.store.get_dead(dead_letter_id_for(retry_id))
            if dead is not None:
                count.failed += 1
                count.first_error = count.first_error or f"{dead.error_type}: {dead.error}"
                continue
            gone.append(retry_id)
        if gone:
            ids = dict(zip(redrive.probe_ids, redrive.probe_deliveries, strict=False))
            remembered = await self._core.store.remembered(ids.values(), now) if ids else set()
            for retry_id in gone:
                if ids.get(retry_id) in remembered:
                    count.succeeded += 1
                else:
                    count.gone += 1
        return count


def _gone_note(gone: int) -> str:
    return f"; {gone} gone without a success (deleted by someone?)" if gone else ""


class _Outage:
    """Logs a store outage met while driving redrives once, and its end once."""

    def __init__(self) -> None:
        self.since: float | None = None

    def failed(self, message: str) -> None:
        if self.since is None:
            self.since = time.monotonic()
            logger.warning("%s (logged once until the store answers)", message)
        else:
            logger.debug("%s", message)

    def answered(self) -> None:
        if self.since is not None:
            logger.info(
                "store is back after %.1fs: driving redrives again", time.monotonic() - self.since
            )
            self.since = None


def _summary(action: str, done: int, failed: int) -> str:
    verb = "requeued" if action == "requeue" else "reprocessed"
    return f"{done} {verb}" + (f", {failed} failed again" if failed else "")
