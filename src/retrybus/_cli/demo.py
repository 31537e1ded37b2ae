"""``retrybus demo``: two simulated services exchanging events through one
SQLite file, each with its own worker, whose handlers fail now and then.

The ``social`` service publishes likes and comments to its own handlers,
``SocialStatisticsHandler`` and ``FeedUpdateHandler``, which hit a "connection
timeout" now and then and succeed on a later retry. The comments also reach the
``notifications`` service, whose ``CommentNotificationHandler`` emails the
post's author: the "email service unavailable" for some fails for good
(dead-lettered after its retries), a user without an email address
(``PermanentError``) is dead-lettered at once. Each email sent is published as
``notification.sent``, which social's ``NotificationCounter`` counts. Events
cross through the store: each service's worker registers its subscriptions,
then claims only its own service's deliveries. The real buses, store and
workers do the rest, and every number shown comes from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .._bus import EventBus
from .._errors import PermanentError
from .._event import Event
from .._policy import ExponentialBackoff
from .._worker import RetryWorker
from .demo_view import Crossing, DeadLetterKey, Snapshot, Successes, Tally, make_view, print_report
from .session import CliError, open_store_url

__all__ = ["DemoSettings", "run_demo"]

SOCIAL = "social"
NOTIFICATIONS = "notifications"
SOURCE = "SocialService"
NOTIFICATIONS_SOURCE = "NotificationService"
SENT = "notification.sent"
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


# the simulated services --------------------------------------------------------


class _SimulatedHandler:
    """A handler whose failures are drawn per event from the demo's seed, so a
    delivery that fails transiently fails the same number of times on every run.
    It counts the deliveries it handled (``successes``)."""

    name: ClassVar[str]
    patterns: ClassVar[tuple[str, ...]]

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._calls: Counter[int] = Counter()
        self.successes = Successes()

    async def __call__(self, event: Event) -> None:
        seq = int(event.data["seq"])
        self._calls[seq] += 1
        call = self._calls[seq]
        draw = random.Random(f"{self._seed}:{self.name}:{seq}").random()
        await asyncio.sleep(0.001)  # a database or network round trip
        await self._handle(event, draw, call)
        self.successes.add(call)

    async def _handle(self, event: Event, draw: float, call: int) -> None:
        """Handle ``event`` on the ``call``-th call for it (1: the first), or raise;
        ``draw`` in [0, 1) decides which."""
        raise NotImplementedError


class SocialStatisticsHandler(_SimulatedHandler):
    """Counts likes and comments per post; its database times out now and then."""

    name = "SocialStatisticsHandler"
    patterns = ("like.added", "comment.created")

    async def _handle(self, event: Event, draw: float, call: int) -> None:
        if call <= (2 if draw < 0.02 else 1 if draw < 0.08 else 0):
            raise TimeoutError("connection timeout")


class FeedUpdateHandler(_SimulatedHandler):
    """Puts the activity into followers' feeds; the feed cache times out now and then."""

    name = "FeedUpdateHandler"
    patterns = ("like.added", "comment.created")

    async def _handle(self, event: Event, draw: float, call: int) -> None:
        if call <= (1 if draw < 0.05 else 0):
            raise TimeoutError("connection timeout")


class NotificationCounter(_SimulatedHandler):
    """Counts the notifications each user was sent, for the badge on their
    profile (``counted``: how often each comment's notification was counted);
    its database times out now and then."""

    name = "NotificationCounter"
    patterns = (SENT,)

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.counted: Counter[int] = Counter()

    async def _handle(self, event: Event, draw: float, call: int) -> None:
        if call <= (1 if draw < 0.04 else 0):
            raise TimeoutError("connection timeout")
        self.counted[int(event.data["comment_id"])] += 1


class CommentNotificationHandler(_SimulatedHandler):
    """Emails the post's author about a comment, then announces it (``SENT``);
    the email service is down for some, and some users have no email address."""

    name = "CommentNotificationHandler"
    patterns = ("comment.created",)

    def __init__(self, seed: int, announce: Callable[[Event], Awaitable[None]]) -> None:
        super().__init__(seed)
        self._announce = announce

    async def _handle(self, event: Event, draw: float, call: int) -> None:
        author = event.data["author_id"]
        if draw < 0.05:
            raise ConnectionError("email service unavailable")
        if draw < 0.065:
            raise PermanentError(f"user {author} has no email address")
        data = {key: event.data[key] for key in ("seq", "comment_id", "post_id", "author_id")}
        await self._announce(
            Event(
                SENT,
                {**data, "channel": "email"},
                source=NOTIFICATIONS_SOURCE,
                subject=f"users/{author}",
            )
        )


def social_events(count: int, seed: int) -> Iterator[Event]:
    """``count`` events of the social service: about 70 % likes, 30 % comments."""
    rng = random.Random(seed)
    for seq in range(count):
        post_id = rng.randint(1, 500)
        data: dict[str, object] = {"seq": seq, "post_id": post_id, "user_id": rng.randint(1, 5000)}
        if rng.random() < 0.7:
            yield Event("like.added", data, source=SOURCE, subject=f"posts/{post_id}")
        else:
            data |= {"comment_id": seq, "author_id": rng.randint(1, 5000), "text": "Nice post!"}
            yield Event("comment.created", data, source=SOURCE, subject=f"posts/{post_id}")


@dataclass(frozen=True, slots=True)
class DemoServices:
    """The demo's two buses on one SQLite file, their handlers subscribed."""

    social: EventBus
    notifications: EventBus
    counter: NotificationCounter
    handlers: dict[str, tuple[_SimulatedHandler, ...]]

    @property
    def buses(self) -> tuple[EventBus, ...]:
        return (self.social, self.notifications)

    def successes(self) -> dict[str, dict[str, Successes]]:
        """Each service's handlers' own counts, by service then handler."""
        return {
            service: {handler.name: handler.successes for handler in handlers}
            for service, handlers in self.handlers.items()
        }


def build_services(url: str, seed: int, tally: Tally) -> DemoServices:
    """The ``social`` and ``notifications`` buses on the SQLite store at ``url``
    (a store each, as two processes would have), publishing into ``tally``."""
    social = EventBus(open_store_url(url), service=SOCIAL, default_policy=POLICY)
    notifications = EventBus(open_store_url(url), service=NOTIFICATIONS, default_policy=POLICY)

    async def announce(event: Event) -> None:
        tally.add(NOTIFICATIONS, await notifications.publish(event))

    counter = NotificationCounter(seed)
    handlers: dict[str, tuple[_SimulatedHandler, ...]] = {
        SOCIAL: (SocialStatisticsHandler(seed), FeedUpdateHandler(seed), counter),
        NOTIFICATIONS: (CommentNotificationHandler(seed, announce),),
    }
    for bus in (social, notifications):
        for handler in handlers[bus.service]:
            bus.subscribe(handler.patterns, handler, name=handler.name)
    return DemoServices(social, notifications, counter, handlers)


async def publish_all(bus: EventBus, settings: DemoSettings, tally: Tally) -> None:
    """Publish the events at ``settings.rate`` per second, many at a time."""
    slots = asyncio.Semaphore(_PUBLISHERS)
    start = time.monotonic()

    async def publish(event: Event) -> None:
        try:
            tally.add(bus.service, await bus.publish(event))
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
    """Run the demo; True when every delivery ended in success or the DLQ in time
    and each notification sent was counted once."""
    url = f"sqlite:///{settings.db}"
    reset_database(settings.db)
    tally = Tally(settings.events, source=SOCIAL)
    demo = build_services(url, settings.seed, tally)
    social = demo.social
    view = make_view(settings.progress, settings.events)
    started = time.monotonic()
    with _quiet_library_logs():
        async with contextlib.AsyncExitStack() as stack:
            for bus in demo.buses:
                await stack.enter_async_context(bus)
            # each service's worker stores its subscriptions as it starts: before
            # the first publish, so that the comments reach notifications
            workers = [RetryWorker(bus, check_interval=_TICK, concurrency=32) for bus in demo.buses]
            for worker in workers:
                await stack.enter_async_context(worker)
            publisher = asyncio.create_task(publish_all(social, settings, tally))
            with view:
                while True:
                    await asyncio.wait({publisher}, timeout=_TICK)
                    if publisher.done():
                        publisher.result()  # re-raises what stopped the publishing
                    snapshot = Snapshot.of(
                        tally, demo.successes(), await social.services.overview()
                    )
                    view.update(snapshot)
                    finished = tally.done and snapshot.queued == 0
                    if finished or time.monotonic() - started > settings.timeout:
                        break
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            for worker in workers:
                await worker.stop()
            snapshot = Snapshot.of(tally, demo.successes(), await social.services.overview())
            stats = await social.stats()
            groups = await _dead_letters_by_reason(social)
    elapsed = time.monotonic() - started
    crossing = _crossing(demo, tally)
    return print_report(snapshot, crossing, stats, groups, url, elapsed, finished)


def _crossing(demo: DemoServices, tally: Tally) -> Crossing:
    """How the notifications sent reached social's counter."""
    counts = demo.counter.counted.values()
    return Crossing(
        event_type=SENT,
        publisher=NOTIFICATIONS,
        handler=f"{SOCIAL}/{NotificationCounter.name}",
        published=tally.published[NOTIFICATIONS, SENT],
        counted_once=sum(1 for n in counts if n == 1),
        counted_more=sum(1 for n in counts if n > 1),
    )


async def _dead_letters_by_reason(bus: EventBus) -> Counter[DeadLetterKey]:
    groups: Counter[DeadLetterKey] = Counter()
    offset = 0
    while page := await bus.dead_letters.list(500, offset):
        groups.update((item.service, item.reason, item.handler_name, item.error) for item in page)
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
