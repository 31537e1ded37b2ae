"""Redrives: requeue (or reprocess) every dead letter matching a filter, at a
bounded rate, after an optional probe, with progress, pause, resume and cancel.

A redrive's state is a control record in the store, so it survives the process
that started it: whoever runs redrives (the dashboard, ``retrybus dlq requeue
--filter … --rate``, ``retrybus dlq redrive resume``) picks it up where it
stopped. A runner leases the redrive it is driving, so two runners never drive
one at once, and a runner that dies lets go when its lease runs out.

States: ``probing`` → ``running`` → ``completed``; ``paused`` (and back);
``stopped`` (the probe failed again) and ``cancelled`` are final.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._errors import ItemNotFound, RetrybusError, UnknownHandler
from ._filters import DeadLetterFilter
from ._records import dead_letter_id_for

if TYPE_CHECKING:
    from ._bus import EventBus

__all__ = ["Redrive", "Redrives"]

PREFIX = "redrive:"
ACTIONS = ("requeue", "reprocess")
ACTIVE = ("probing", "running")
FINAL = ("completed", "stopped", "cancelled")
STATES = (*ACTIVE, "paused", *FINAL)
RUNNER_LEASE = 30.0
# items taken per step without a rate limit
UNLIMITED_BATCH = 200


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True, slots=True, kw_only=True)
class Redrive:
    """One redrive, as stored. ``done`` counts dead letters requeued (or reprocessed
    successfully), ``failed`` reprocesses that failed again; ``total`` is how many
    matched when it started (those created later are never taken)."""

    id: str
    action: str
    where: DeadLetterFilter
    rate: float | None
    probe: int
    state: str
    total: int
    done: int = 0
    failed: int = 0
    probe_ids: tuple[str, ...] = ()
    message: str = ""
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    resume_state: str | None = None
    runner: str | None = None
    runner_until: datetime | None = None
    allowance: float = 1.0
    last_step_at: datetime | None = None
    version: int = 0

    @property
    def active(self) -> bool:
        """Still to be driven (probing or running)."""
        return self.state in ACTIVE

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    @property
    def progress(self) -> float:
        """Share of ``total`` dealt with, 0.0 to 1.0."""
        if self.total <= 0:
            return 1.0 if self.finished else 0.0
        return min(1.0, (self.done + self.failed) / self.total)

    def to_dict(self) -> dict[str, Any]:
        """The redrive as stored (JSON-ready)."""
        return {
            "id": self.id,
            "action": self.action,
            "where": self.where.to_dict(),
            "rate": self.rate,
            "probe": self.probe,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "probe_ids": list(self.probe_ids),
            "message": self.message,
            "created_by": self.created_by,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": _iso(self.finished_at),
            "resume_state": self.resume_state,
            "runner": self.runner,
            "runner_until": _iso(self.runner_until),
            "allowance": self.allowance,
            "last_step_at": _iso(self.last_step_at),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], version: int) -> Redrive:
        created_at = datetime.fromisoformat(data["created_at"])
        updated_at = datetime.fromisoformat(data["updated_at"])
        return cls(
            id=data["id"],
            action=data["action"],
            where=DeadLetterFilter.from_dict(data["where"]),
            rate=data.get("rate"),
            probe=int(data.get("probe", 0)),
            state=data["state"],
            total=int(data["total"]),
            done=int(data.get("done", 0)),
            failed=int(data.get("failed", 0)),
            probe_ids=tuple(data.get("probe_ids", ())),
            message=data.get("message", ""),
            created_by=data.get("created_by"),
            created_at=created_at,
            updated_at=updated_at,
            finished_at=_time(data.get("finished_at")),
            resume_state=data.get("resume_state"),
            runner=data.get("runner"),
            runner_until=_time(data.get("runner_until")),
            allowance=float(data.get("allowance", 1.0)),
            last_step_at=_time(data.get("last_step_at")),
            version=version,
        )


class RedriveConflict(RetrybusError):
    """The redrive changed under this operation (another process acted on it)."""


def parse_rate(text: str | float | None) -> float | None:
    """A rate as ``10``, ``10/s``, ``600/m`` or ``3600/h`` (items per second), or None."""
    if text is None:
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower()
        per = 1.0
        for suffix, seconds in (("/s", 1.0), ("/m", 60.0), ("/min", 60.0), ("/h", 3600.0)):
            if raw.endswith(suffix):
                raw, per = raw[: -len(suffix)], seconds
                break
        try:
            value = float(raw) / per
        except ValueError:
            raise ValueError(
                f"not a rate: {text!r} (use items per second: 10, 10/s, 600/m)"
            ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a rate must be a number of items per second > 0, got {text!r}")
    return value


class Redrives:
    """``bus.redrives``: start, watch and steer redrives of the dead letter queue.

    >>> redrive = await bus.redrives.start(DeadLetterFilter(handler_name="Mailer"),
    ...                                    rate=10, probe=5, actor="alice")
    >>> await bus.redrives.run(redrive.id)   # drive it here until it ends or is paused
    """

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self.owner = f"redrive-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # starting and steering -------------------------------------------------

    async def start(
        self,
        where: DeadLetterFilter | None = None,
        *,
        action: str = "requeue",
        rate: float | str | None = None,
        probe: int = 0,
        actor: str | None = None,
    ) -> Redrive:
        """Create a redrive of the dead letters matching ``where`` now.

        ``rate`` bounds it to that many items per second (``10``, ``"600/m"``);
        ``probe`` first takes that many items alone and goes on only once they
        have succeeded (for ``requeue``: once a worker has handled them), stopping
        for good if any fails again. ``action="reprocess"`` calls the handlers in
        the process that runs the redrive, which must subscribe them.
        """
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0:
            raise ValueError(f"probe must be an int >= 0, got {probe!r}")
        if where is not None and not isinstance(where, DeadLetterFilter):
            raise TypeError(f"where must be a DeadLetterFilter, got {where!r}")
        per_second = parse_rate(rate)
        now = self._bus.clock.now()
        selected = (where or DeadLetterFilter()).narrowed(
            created_before=now + timedelta(microseconds=1)
        )
        if action == "reprocess":
            selected = replace(selected, processed=False)
        total = await self._bus.store.count_dead(selected)
        redrive = Redrive(
            id=f"redrive_{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:8]}",
            action=action,
            where=selected,
            rate=per_second,
            probe=probe,
            state="probing" if probe else "running",
            total=total,
            created_by=actor,
            created_at=now,
            updated_at=now,
        )
        version = await self._bus.store.put_control(
            PREFIX + redrive.id, redrive.to_dict(), version=0
        )
        if version is None:  # pragma: no cover - ids are unique
            raise RedriveConflict(f"redrive {redrive.id} exists already")
        return replace(redrive, version=version)

    async def get(self, redrive_id: str) -> Redrive:
        """The redrive with this id; raises ``ItemNotFound``."""
        record = await self._bus.store.get_control(PREFIX + redrive_id)
        if record is None:
            raise ItemNotFound(redrive_id)
        return Redrive.from_dict(dict(record.value), record.version)

    async def list(self) -> list[Redrive]:
        """Every redrive the store keeps, newest first."""
        records = await self._bus.store.list_control(PREFIX)
        redrives = [Redrive.from_dict(dict(r.value), r.version) for r in records]
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
        await self._bus.store.delete_control(PREFIX + redrive_id)

    def _paused(self, redrive: Redrive, now: datetime) -> Redrive:
        if not redrive.active:
            raise ValueError(f"redrive {redrive.id} is {redrive.state}, not active: cannot pause")
        return replace(
            redrive, state="paused", resume_state=redrive.state, message="paused", updated_at=now
        )

    def _resumed(self, redrive: Redrive, now: datetime) -> Redrive:
        if redrive.state != "paused":
            raise ValueError(f"redrive {redrive.id} is {redrive.state}, not paused: cannot resume")
        return replace(
            redrive,
            state=redrive.resume_state or "running",
            resume_state=None,
            message="resumed",
            allowance=1.0,
            last_step_at=None,
            updated_at=now,
        )

    def _cancelled(self, redrive: Redrive, now: datetime) -> Redrive:
        if redrive.finished:
            raise ValueError(f"redrive {redrive.id} is {redrive.state} already")
        return replace(
            redrive, state="cancelled", message="cancelled", finished_at=now, updated_at=now
        )

    async def _change(
        self, redrive_id: str, change: Callable[[Redrive, datetime], Redrive]
    ) -> Redrive:
        while True:
            current = await self.get(redrive_id)
            changed = change(current, self._bus.clock.now())
            saved = await self._save(changed)
            if saved is not None:
                return saved

    async def _save(self, redrive: Redrive) -> Redrive | None:
        version = await self._bus.store.put_control(
            PREFIX + redrive.id, redrive.to_dict(), version=redrive.version
        )
        return None if version is None else replace(redrive, version=version)

    # driving ---------------------------------------------------------------

    async def step(self, redrive_id: str) -> Redrive:
        """Advance one redrive by what its rate allows now, if no other runner holds
        it. Returns it as stored afterwards."""
        redrive = await self.get(redrive_id)
        if not redrive.active:
            return redrive
        now = self._bus.clock.now()
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
        if held.state == "probing":
            return await self._probe_step(held, now)
        return await self._run_step(held, now)

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

    async def run_all(self, *, interval: float = 0.5, stop: asyncio.Event | None = None) -> None:
        """Drive every active redrive in the store, for as long as this runs (the
        dashboard runs it in the background). Reprocess redrives are driven only when
        this bus subscribes handlers."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            for redrive in await self.list():
                if not redrive.active:
                    continue
                if redrive.action == "reprocess" and not self._bus.handler_names:
                    continue
                await self.step(redrive.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _finish_step(self, redrive: Redrive, **changes: Any) -> Redrive:
        """Write a step's result. When the redrive changed meanwhile (paused or
        cancelled elsewhere), the step's counts are added to the record as it is now,
        and its other changes apply only if the record is still in the same state."""
        saved = await self._save(replace(redrive, **changes))
        if saved is not None:
            return saved
        done_delta = changes.get("done", redrive.done) - redrive.done
        failed_delta = changes.get("failed", redrive.failed) - redrive.failed
        while True:
            current = await self.get(redrive.id)
            # a step's state change holds only if nobody changed the state meanwhile
            merged = replace(current, **changes) if current.state == redrive.state else current
            merged = replace(
                merged,
                done=current.done + done_delta,
                failed=current.failed + failed_delta,
                probe_ids=changes.get("probe_ids", current.probe_ids),
                updated_at=self._bus.clock.now(),
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
        self, redrive: Redrive, count: int, actor: str | None
    ) -> tuple[int, int, builtins.list[str], str]:
        """Requeue or reprocess up to ``count`` matching dead letters.

        Returns (succeeded, failed, the new retry items' ids (requeue) or the ids
        tried (reprocess), the first error); no ids and nothing failed means
        nothing matched any more."""
        offset = redrive.failed if redrive.action == "reprocess" else 0
        items = await self._bus.store.list_dead(redrive.where, limit=count, offset=offset)
        succeeded = failed = 0
        ids: list[str] = []
        first_error = ""
        for item in items:
            if redrive.action == "requeue":
                try:
                    retry_item = await self._bus.dead_letters.requeue(item.id, actor=actor)
                except ItemNotFound:
                    ids.append("")  # requeued or deleted by someone else meanwhile
                    continue
                succeeded += 1
                ids.append(retry_item.id)
                continue
            ids.append(item.id)
            try:
                updated, ok = await self._bus.dead_letters._reprocess(item.id, actor)
            except ItemNotFound:
                ids[-1] = ""
                continue
            except UnknownHandler as exc:
                failed += 1
                first_error = first_error or str(exc)
                continue
            if ok:
                succeeded += 1
            else:
                failed += 1
                first_error = first_error or f"{updated.error_type}: {updated.error}"
        return succeeded, failed, ids, first_error

    async def _run_step(self, redrive: Redrive, now: datetime) -> Redrive:
        take, allowance = self._allowance(redrive, now)
        if take == 0:
            return await self._finish_step(redrive, allowance=allowance, last_step_at=now)
        actor = redrive.created_by
        succeeded, failed, ids, _error = await self._take(redrive, take, actor)
        done, failures = redrive.done + succeeded, redrive.failed + failed
        if not ids and not failed:
            return await self._finish_step(
                redrive,
                state="completed",
                message=_summary(redrive.action, done, failures),
                finished_at=self._bus.clock.now(),
                done=done,
                failed=failures,
            )
        return await self._finish_step(
            redrive,
            done=done,
            failed=failures,
            allowance=allowance,
            last_step_at=now,
            message=_summary(redrive.action, done, failures),
        )

    async def _probe_step(self, redrive: Redrive, now: datetime) -> Redrive:
        if not redrive.probe_ids:
            succeeded, failed, ids, error = await self._take(
                redrive, redrive.probe, redrive.created_by
            )
            ids = [retry_id for retry_id in ids if retry_id]
            if not ids:
                return await self._finish_step(
                    redrive,
                    state="completed",
                    message="nothing matched",
                    finished_at=self._bus.clock.now(),
                )
            if redrive.action == "reprocess":
                return await self._probe_outcome(
                    redrive, len(ids), failed, error, done=succeeded, failures=failed, ids=ids
                )
            return await self._finish_step(
                redrive,
                done=redrive.done + succeeded,
                probe_ids=tuple(ids),
                message=f"probe: {len(ids)} requeued, waiting for a worker",
                last_step_at=now,
            )
        handled, failed, error = await self._probe_results(redrive.probe_ids)
        if failed or handled == len(redrive.probe_ids):
            return await self._probe_outcome(redrive, len(redrive.probe_ids), failed, error)
        return await self._finish_step(
            redrive,
            message=f"probe: {handled} of {len(redrive.probe_ids)} handled, waiting for a worker",
        )

    async def _probe_outcome(
        self,
        redrive: Redrive,
        size: int,
        failed: int,
        error: str,
        *,
        done: int = 0,
        failures: int = 0,
        ids: builtins.list[str] | None = None,
    ) -> Redrive:
        changes: dict[str, Any] = {"done": redrive.done + done, "failed": redrive.failed + failures}
        if ids is not None:
            changes["probe_ids"] = tuple(ids)
        if failed:
            return await self._finish_step(
                redrive,
                state="stopped",
                message=f"probe failed: {failed} of {size} failed again ({error})",
                finished_at=self._bus.clock.now(),
                **changes,
            )
        return await self._finish_step(
            redrive,
            state="running",
            message=f"probe passed: {size} of {size} succeeded",
            allowance=1.0,
            last_step_at=None,
            **changes,
        )

    async def _probe_results(self, retry_ids: tuple[str, ...]) -> tuple[int, int, str]:
        """How the requeued probe items went: (handled, failed again, first error).

        An item still queued at attempt 1 is waiting; one rescheduled (attempt > 1)
        or back in the dead letter queue failed again; one gone from both succeeded."""
        handled = failed = 0
        first_error = ""
        for retry_id in retry_ids:
            item = await self._bus.store.get_retry(retry_id)
            if item is not None:
                if item.attempt > 1:
                    handled += 1
                    failed += 1
                    first_error = first_error or f"{item.error_type}: {item.error}"
                continue
            dead = await self._bus.store.get_dead(dead_letter_id_for(retry_id))
            handled += 1
            if dead is not None:
                failed += 1
                first_error = first_error or f"{dead.error_type}: {dead.error}"
        return handled, failed, first_error


def _summary(action: str, done: int, failed: int) -> str:
    verb = "requeued" if action == "requeue" else "reprocessed"
    return f"{done} {verb}" + (f", {failed} failed again" if failed else "")
