"""What ``retrybus demo`` shows: live progress while it runs, then the report,
one row per service (and one per handler under it in the report)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._bus import PublishResult
from .._services import HandlerLoad, ServiceSummary
from .._stats import Stats
from . import views

__all__ = [
    "Crossing",
    "HandlerCounts",
    "ServiceCounts",
    "Snapshot",
    "Successes",
    "Tally",
    "make_view",
    "print_report",
]

#: a dead letter as the report groups them: service, reason, handler, error
DeadLetterKey = tuple[str, str, str, str]


@dataclass
class Successes:
    """A handler's own count of the deliveries it handled: on its first call for
    the delivery, or on a later one (a retry)."""

    first: int = 0
    on_retry: int = 0

    def add(self, call: int) -> None:
        """Count a delivery handled on its ``call``-th call (1: the first)."""
        if call == 1:
            self.first += 1
        else:
            self.on_retry += 1


@dataclass
class Tally:
    """What the publish results said: the events each service published, and the
    deliveries recorded for each handler (``service``, ``handler``): those of the
    publishing service's own handlers, and those routed to other services'.
    ``total`` events are to be published by ``source``."""

    total: int
    source: str
    done: bool = False
    published: Counter[tuple[str, str]] = field(default_factory=Counter)
    deliveries: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, service: str, result: PublishResult) -> None:
        """Count what ``result``, a publish by ``service``'s bus, recorded."""
        self.published[service, result.event.type] += 1
        for names in (result.succeeded, result.retrying, result.dead_lettered, result.pending):
            self.deliveries.update((service, name) for name in names)
        for label in result.routed:  # service/handler: a service name never holds a "/"
            service_name, handler = label.split("/", 1)
            self.deliveries[service_name, handler] += 1

    def events_of(self, service: str) -> dict[str, int]:
        """The events ``service`` published, by type, the most published first."""
        mine = [(kind, n) for (who, kind), n in self.published.items() if who == service]
        return dict(sorted(mine, key=lambda kind_count: (-kind_count[1], kind_count[0])))


@dataclass(frozen=True, slots=True)
class HandlerCounts:
    """One handler's deliveries and where each ended: ``deliveries`` recorded for
    it (the publish results), handled on the first call or on a retry (the
    handler's own count), still in the retry queue (``queued``) and dead-lettered
    (the store: ``bus.services.overview()``)."""

    service: str
    handler: str
    deliveries: int
    succeeded_first: int
    succeeded_on_retry: int
    queued: int
    dead_lettered: int

    @classmethod
    def of(cls, tally: Tally, successes: Successes, load: HandlerLoad) -> HandlerCounts:
        """Combine the publish results, the handler's count and the store's."""
        key = (load.service, load.handler_name)
        return cls(
            service=load.service,
            handler=load.handler_name,
            deliveries=tally.deliveries[key],
            succeeded_first=successes.first,
            succeeded_on_retry=successes.on_retry,
            queued=load.queued,
            dead_lettered=load.dead_unprocessed + load.dead_processed,
        )

    @property
    def succeeded(self) -> int:
        """Deliveries handled, first time or on a retry."""
        return self.succeeded_first + self.succeeded_on_retry

    @property
    def ended(self) -> int:
        """Deliveries handled, queued or dead-lettered."""
        return self.succeeded + self.queued + self.dead_lettered

    @property
    def accounted(self) -> bool:
        """Every delivery was handled, waits in the retry queue or is a dead letter."""
        return self.deliveries == self.ended


@dataclass(frozen=True, slots=True)
class ServiceCounts:
    """One service: its live workers and its handlers' counts, and their sums."""

    service: str
    workers: int
    handlers: tuple[HandlerCounts, ...]

    def _sum(self, what: str) -> int:
        return sum(getattr(handler, what) for handler in self.handlers)

    @property
    def deliveries(self) -> int:
        return self._sum("deliveries")

    @property
    def succeeded_first(self) -> int:
        return self._sum("succeeded_first")

    @property
    def succeeded_on_retry(self) -> int:
        return self._sum("succeeded_on_retry")

    @property
    def succeeded(self) -> int:
        return self._sum("succeeded")

    @property
    def queued(self) -> int:
        return self._sum("queued")

    @property
    def dead_lettered(self) -> int:
        return self._sum("dead_lettered")

    @property
    def ended(self) -> int:
        return self._sum("ended")

    @property
    def accounted(self) -> bool:
        """Every delivery to each of its handlers is accounted for."""
        return all(handler.accounted for handler in self.handlers)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The counts on screen: the publish results, the handlers' counts and
    ``bus.services.overview()``, per service."""

    total: int
    published: int
    events: Mapping[str, Mapping[str, int]]
    services: tuple[ServiceCounts, ...]

    @classmethod
    def of(
        cls,
        tally: Tally,
        successes: Mapping[str, Mapping[str, Successes]],
        summaries: Sequence[ServiceSummary],
    ) -> Snapshot:
        """The services and handlers of ``successes`` (service → handler → its
        count), in its order, with what the store says of each (``summaries``)."""
        by_service = {summary.service: summary for summary in summaries}
        services = []
        for service, handlers in successes.items():
            summary = by_service.get(service)
            loads = {} if summary is None else {h.handler_name: h.load for h in summary.handlers}
            counts = tuple(
                HandlerCounts.of(
                    tally,
                    handled,
                    loads.get(name) or HandlerLoad(service=service, handler_name=name),
                )
                for name, handled in handlers.items()
            )
            workers = 0 if summary is None else len(summary.workers)
            services.append(ServiceCounts(service, workers, counts))
        return cls(
            total=tally.total,
            published=sum(tally.events_of(tally.source).values()),
            events={service: tally.events_of(service) for service in successes},
            services=tuple(services),
        )

    @property
    def queued(self) -> int:
        """Deliveries still in the retry queue, of every service."""
        return sum(service.queued for service in self.services)

    @property
    def accounted(self) -> bool:
        """Every delivery of every service is accounted for."""
        return all(service.accounted for service in self.services)


@dataclass(frozen=True, slots=True)
class Crossing:
    """Events one service (``publisher``) published for a handler of another
    (``handler``, as ``service/handler``), and how many of them that handler
    counted once, and more than once: the services exchanging events through
    the store."""

    event_type: str
    publisher: str
    handler: str
    published: int
    counted_once: int
    counted_more: int

    @property
    def ok(self) -> bool:
        """Each event published was counted, once."""
        return self.counted_once == self.published and not self.counted_more


class View(Protocol):
    def __enter__(self) -> object: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def update(self, snapshot: Snapshot) -> None: ...


def make_view(progress: bool | None, total: int) -> View:
    """A live Rich display, or plain lines once a second (when stdout is not a terminal)."""
    if progress is None:
        progress = sys.stdout.isatty()
    return LiveView(total) if progress else PlainView()


def _services_table(snapshot: Snapshot) -> Table:
    table = Table(box=None, padding=(0, 2), header_style="bold")
    table.add_column("service")
    table.add_column("live workers", justify="right")
    table.add_column("succeeded", justify="right")
    table.add_column("queued", justify="right")
    table.add_column("dead-lettered", justify="right")
    for s in snapshot.services:
        table.add_row(
            f"[cyan]{escape(s.service)}[/]",
            f"{s.workers:,}",
            f"[green]{s.succeeded:,}[/]",
            f"[yellow]{s.queued:,}[/]",
            f"[red]{s.dead_lettered:,}[/]",
        )
    return table


class LiveView:
    """A progress bar for publishing and a row of counts per service, redrawn as
    they change."""

    def __init__(self, total: int) -> None:
        self._progress = Progress(
            TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._task = self._progress.add_task("publishing", total=total)
        self._snapshot: Snapshot | None = None
        self._live = Live(self, refresh_per_second=10, console=views.console(), transient=False)

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = [self._progress]
        if self._snapshot is not None:
            parts.append(_services_table(self._snapshot))
        return Group(*parts)

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.__exit__(exc_type, exc, tb)

    def update(self, snapshot: Snapshot) -> None:
        """Show ``snapshot``."""
        self._snapshot = snapshot
        self._progress.update(self._task, completed=snapshot.published)


class PlainView:
    """One line of counts a second, for logs and pipes."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._last: Snapshot | None = None

    def __enter__(self) -> PlainView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._last is not None and exc is None:
            self._print(self._last)

    def update(self, snapshot: Snapshot) -> None:
        """Print ``snapshot`` if a second has passed since the last line."""
        self._last = snapshot
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval
            self._print(snapshot)

    @staticmethod
    def _print(snapshot: Snapshot) -> None:
        parts = [f"published {snapshot.published}/{snapshot.total}"]
        parts.extend(
            f"{s.service}: workers {s.workers}  succeeded {s.succeeded}  queued {s.queued}  "
            f"dead-lettered {s.dead_lettered}"
            for s in snapshot.services
        )
        print(" | ".join(parts), flush=True)


def print_report(
    snapshot: Snapshot,
    crossing: Crossing,
    stats: Stats,
    dead_letters: Counter[DeadLetterKey],
    url: str,
    elapsed: float,
    finished: bool,
) -> bool:
    """Print what each service published, where every delivery to each of its
    handlers ended, the events that crossed back, the stats and the DLQ by
    reason; True if every delivery is accounted for, each crossing event was
    counted once and no retry is left waiting."""
    out = views.console()
    out.print()
    deliveries = sum(s.deliveries for s in snapshot.services)
    out.print(
        f"Published in {elapsed:.1f}s, [bold]{deliveries:,}[/] deliveries to the handlers of "
        f"{len(snapshot.services)} services:"
    )
    out.print(_published_table(snapshot))
    out.print()
    out.print(_outcome_table(snapshot))
    out.print()
    out.print(_crossing_line(crossing), soft_wrap=True)
    if not finished:
        out.print(
            f"[yellow]Gave up waiting: {snapshot.queued} deliveries still queued "
            "(a worker would finish them).[/]"
        )
    out.print()
    out.print(views.stats_table(stats, url))
    out.print()
    out.print(_reason_table(dead_letters))
    out.print()
    out.print("Inspect what the demo left behind:")
    for command in _suggestions(snapshot, url):
        out.print(f"  {escape(command)}", soft_wrap=True)
    return finished and snapshot.accounted and crossing.ok


def _published_table(snapshot: Snapshot) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="cyan")
    table.add_column(justify="right")
    table.add_column()
    for service, events in snapshot.events.items():
        kinds = ", ".join(f"{count:,} {kind}" for kind, count in events.items()) or "—"
        table.add_row(escape(service), f"{sum(events.values()):,} events", escape(kinds))
    return table


def _outcome_table(snapshot: Snapshot) -> Table:
    # two-line headings and the mark beside the service: it fits 80 columns
    table = Table(box=None, padding=(0, 1), header_style="bold")
    table.add_column("service\n  handler", no_wrap=True)
    for heading in ("deliveries", "first\ntime", "on a\nretry", "dead-\nlettered", "still\nqueued"):
        table.add_column(heading, justify="right")
    for s in snapshot.services:
        mark = "[green]✓ nothing lost[/]" if s.accounted else "[red]✗ unaccounted[/]"
        table.add_row(f"[cyan]{escape(s.service)}[/] {mark}", *_numbers(s), style="bold")
        for h in s.handlers:
            table.add_row(f"  {escape(h.handler)}", *_numbers(h))
    return table


def _numbers(counts: HandlerCounts | ServiceCounts) -> list[str]:
    return [
        f"{counts.deliveries:,}",
        f"{counts.succeeded_first:,}",
        f"{counts.succeeded_on_retry:,}",
        f"{counts.dead_lettered:,}",
        f"{counts.queued:,}",
    ]


def _crossing_line(c: Crossing) -> str:
    what = f"{c.published:,} {escape(c.event_type)} from {escape(c.publisher)}"
    if c.ok:
        return f"[green]✓[/] {what}, each counted once by {escape(c.handler)}"
    return (
        f"[red]✗[/] {what}: {c.counted_once:,} counted once and {c.counted_more:,} more "
        f"than once by {escape(c.handler)}"
    )


def _suggestions(snapshot: Snapshot, url: str) -> list[str]:
    commands = [f"retrybus services --store {url}", f"retrybus stats --store {url}"]
    dead = [s.service for s in snapshot.services if s.dead_lettered]
    commands.extend(f"retrybus dlq list --store {url} --filter service={s}" for s in dead)
    if not dead:
        commands.append(f"retrybus dlq list --store {url}")
    return commands


def _reason_table(dead_letters: Counter[DeadLetterKey]) -> Table:
    table = Table(title="dead letters by reason", title_justify="left")
    table.add_column("service", no_wrap=True)
    table.add_column("reason")
    table.add_column("handler", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("error (most common)")
    groups: dict[tuple[str, str, str], Counter[str]] = {}
    for (service, reason, handler, error), count in dead_letters.items():
        groups.setdefault((service, reason, handler), Counter())[error] += count
    ranked = sorted(groups.items(), key=lambda group: -group[1].total())
    for (service, reason, handler), errors in ranked:
        table.add_row(
            escape(service),
            escape(reason),
            escape(handler),
            f"{errors.total():,}",
            escape(errors.most_common(1)[0][0]),
        )
    if not groups:
        table.add_row("—", "—", "—", "0", "")
    return table
