"""``retrybus demo``: a simulated social service whose handlers fail now and then.

Likes and comments are published to three handlers named as in the seed.
``SocialStatisticsHandler`` and ``FeedUpdateHandler`` hit a "connection
timeout" now and then and succeed on a later retry;
``CommentNotificationHandler`` sometimes finds the "email service unavailable"
for good (dead-lettered after its retries) or a user without an email address
(``PermanentError``: dead-lettered at once). The real bus, SQLite store and
worker do the rest, and every number shown comes from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .._bus import EventBus
from .._errors import PermanentError
from .._event import Event
from .._policy import ExponentialBackoff
from .._worker import RetryWorker
from .demo_view import Snapshot, Tally, make_view, print_report
from .session import CliError, open_store_url

__all__ = ["DemoSettings", "run_demo"]

SOURCE = "SocialService"
#: short delays so the demo's retries finish in a second: 0.05 s, 0.1 s, 0.2 s
POLICY = ExponentialBackoff(max_retries=3, initial_delay=0.05, max_delay=0.5)
_PUBLISHERS = 64
_TICK = 0.1


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """``retrybus demo``'s options (their defaults are on the command)."""

    db: Path
    events: int
    rate: float
    seed: int
    progress: bool | None
    timeout: float


# the simulated service ---------------------------------------------------------


class _SimulatedHandler:
    """A handler whose failures are drawn per event from the demo's seed, so a
    delivery that fails transiently fails the same number of times on every run."""

    name: ClassVar[str]
    patterns: ClassVar[tuple[str, ...]]

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._calls: Counter[int] = Counter()

    def _roll(self, event: Event) -> tuple[float, int]:
        """This event's draw in [0, 1) and which call of the handler for it this is."""
        seq = int(event.data["seq"])
        self._calls[seq] += 1
        return random.Random(f"{self._seed}:{self.name}:{seq}").random(), self._calls[seq]

    async def _work(self) -> None:
        await asyncio.sleep(0.001)  # a database or network round trip


class SocialStatisticsHandler(_SimulatedHandler):
    """Counts likes and comments per post; its database times out now and then."""

    name = "SocialStatisticsHandler"
    patterns = ("like.added", "comment.created")

    async def __call__(self, event: Event) -> None:
        draw, call = self._roll(event)
        await self._work()
        if call <= (2 if draw < 0.02 else 1 if draw < 0.08 else 0):
            raise TimeoutError("connection timeout")


class FeedUpdateHandler(_SimulatedHandler):
    """Puts the activity into followers' feeds; the feed cache times out now and then."""

    name = "FeedUpdateHandler"
    patterns = ("like.added", "comment.created")

    async def __call__(self, event: Event) -> None:
        draw, call = self._roll(event)
        await self._work()
        if call <= (1 if draw < 0.05 else 0):
            raise TimeoutError("connection timeout")


class CommentNotificationHandler(_SimulatedHandler):
    """Emails the post's author about a comment; the email service is down for
    some, and some users have no email address."""

    name = "CommentNotificationHandler"
    patterns = ("comment.created",)

    async def __call__(self, event: Event) -> None:
        draw, _ = self._roll(event)
        await self._work()
        if draw < 0.05:
            raise ConnectionError("email service unavailable")
        if draw < 0.065:
            raise PermanentError(f"user {event.data['author_id']} has no email address")


def social_events(count: int, seed: int) -> Iterator[Event]:
    """``count`` events of the service: about 70 % likes, 30 % comments."""
    rng = random.Random(seed)
    for seq in range(count):
        post_id = rng.randint(1, 500)
        data: dict[str, object] = {"seq": seq, "post_id": post_id, "user_id": rng.randint(1, 5000)}
        if rng.random() < 0.7:
            yield Event("like.added", data, source=SOURCE, subject=f"posts/{post_id}")
        else:
            data |= {"comment_id": seq, "author_id": rng.randint(1, 5000), "text": "Nice post!"}
            yield Event("comment.created", data, source=SOURCE, subject=f"posts/{post_id}")


# running it --------------------------------------------------------------------


def build_bus(url: str, seed: int) -> EventBus:
    """The demo's bus on the SQLite store at ``url``, its three handlers subscribed."""
    bus = EventBus(open_store_url(url), default_policy=POLICY)
    for handler_class in (SocialStatisticsHandler, FeedUpdateHandler, CommentNotificationHandler):
        handler = handler_class(seed)
        bus.subscribe(handler.patterns, handler, name=handler.name)
    return bus


async def publish_all(bus: EventBus, settings: DemoSettings, tally: Tally) -> None:
    """Publish the events at ``settings.rate`` per second, many at a time."""
    slots = asyncio.Semaphore(_PUBLISHERS)
    start = time.monotonic()

    async def publish(event: Event) -> None:
        try:
            tally.add(await bus.publish(event))
        finally:
            slots.release()

    async with asyncio.TaskGroup() as group:
        for index, event in enumerate(social_events(settings.events, settings.seed)):
            if settings.rate:
                ahead = start + index / settings.rate - time.monotonic()
                if ahead > 0.005:
                    await asyncio.sleep(ahead)
            await slots.acquire()
            group.create_task(publish(event))
    tally.done = True


async def run_demo(settings: DemoSettings) -> bool:
    """Run the demo; True when every delivery ended in success or the DLQ in time."""
    url = f"sqlite:///{settings.db}"
    reset_database(settings.db)
    bus = build_bus(url, settings.seed)
    tally = Tally(settings.events)
    view = make_view(settings.progress, settings.events)
    started = time.monotonic()
    with _quiet_library_logs():
        async with bus, RetryWorker(bus, check_interval=_TICK, concurrency=32) as worker:
            publisher = asyncio.create_task(publish_all(bus, settings, tally))
            with view:
                while True:
                    await asyncio.wait({publisher}, timeout=_TICK)
                    if publisher.done():
                        publisher.result()  # re-raises what stopped the publishing
                    stats = await bus.stats()
                    view.update(Snapshot.of(tally, stats))
                    finished = tally.done and stats.retry_queue_size == 0
                    if finished or time.monotonic() - started > settings.timeout:
                        break
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            await worker.stop()
            stats = await bus.stats()
            groups = await _dead_letters_by_reason(bus)
    elapsed = time.monotonic() - started
    return print_report(Snapshot.of(tally, stats), stats, groups, url, elapsed, finished)


async def _dead_letters_by_reason(bus: EventBus) -> Counter[tuple[str, str, str]]:
    groups: Counter[tuple[str, str, str]] = Counter()
    offset = 0
    while page := await bus.dead_letters.list(500, offset):
        groups.update((item.reason, item.handler_name, item.error) for item in page)
        offset += len(page)
    return groups


def reset_database(path: Path) -> None:
    """Remove the demo database left by an earlier run (refusing any other file)."""
    if not path.exists():
        return
    if path.is_dir() or not _is_retrybus_database(path):
        raise CliError(f"refusing to replace {path}: it is not a retrybus database (choose --db)")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _is_retrybus_database(path: Path) -> bool:
    if path.stat().st_size == 0:
        return True
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.Error:
        return False
    return {"retry_queue", "dead_letter_queue"} <= {row[0] for row in rows}


@contextlib.contextmanager
def _quiet_library_logs() -> Iterator[None]:
    # The bus logs a warning per dead letter; the demo shows them in its table instead.
    library = logging.getLogger("retrybus")
    handler = logging.NullHandler()
    library.addHandler(handler)
    propagate, library.propagate = library.propagate, False
    try:
        yield
    finally:
        library.propagate = propagate
        library.removeHandler(handler)
