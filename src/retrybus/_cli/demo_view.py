"""What ``retrybus demo`` shows: live progress while it runs, then the report."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._bus import PublishResult
from .._stats import Stats
from . import views

__all__ = ["Snapshot", "Tally", "make_view", "print_report"]


@dataclass
class Tally:
    """What the publish results said: each delivery's first outcome."""

    total: int
    published: int = 0
    deliveries: int = 0
    first_succeeded: int = 0
    first_retrying: int = 0
    first_dead_lettered: int = 0
    done: bool = False
    by_type: Counter[str] = field(default_factory=Counter)

    def add(self, result: PublishResult) -> None:
        self.published += 1
        self.by_type[result.event.type] += 1
        self.first_succeeded += len(result.succeeded)
        self.first_retrying += len(result.retrying)
        self.first_dead_lettered += len(result.dead_lettered)
        self.deliveries += len(result.succeeded) + len(result.retrying) + len(result.dead_lettered)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The counts on screen: publish results plus ``bus.stats()``."""

    total: int
    published: int
    likes: int
    comments: int
    deliveries: int
    succeeded_first: int
    succeeded_on_retry: int
    retrying: int
    dead_lettered: int

    @classmethod
    def of(cls, tally: Tally, stats: Stats) -> Snapshot:
        """Combine what the publish results said with what the store counts."""
        return cls(
            total=tally.total,
            published=tally.published,
            likes=tally.by_type["like.added"],
            comments=tally.by_type["comment.created"],
            deliveries=tally.deliveries,
            succeeded_first=tally.first_succeeded,
            succeeded_on_retry=stats.retries_succeeded,
            retrying=stats.retry_queue_size,
            dead_lettered=stats.dead_letter_queue_size,
        )

    @property
    def succeeded(self) -> int:
        """Deliveries that succeeded, first time or on a retry."""
        return self.succeeded_first + self.succeeded_on_retry

    @property
    def accounted(self) -> bool:
        """Every delivery succeeded, is waiting for a retry or is a dead letter."""
        return self.deliveries == self.succeeded + self.retrying + self.dead_lettered


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


def _counts(snapshot: Snapshot) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    table.add_row("published", f"{snapshot.published:,}", f"of {snapshot.total:,} events")
    table.add_row(
        "succeeded",
        f"[green]{snapshot.succeeded:,}[/]",
        f"{snapshot.succeeded_first:,} first time, {snapshot.succeeded_on_retry:,} on a retry",
    )
    table.add_row("retrying", f"[yellow]{snapshot.retrying:,}[/]", "in the retry queue now")
    table.add_row(
        "dead-lettered", f"[red]{snapshot.dead_lettered:,}[/]", "in the dead letter queue"
    )
    return table


class LiveView:
    """A progress bar for publishing and the counts, redrawn as they change."""

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
            parts.append(_counts(self._snapshot))
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
    def _print(s: Snapshot) -> None:
        print(
            f"published {s.published}/{s.total}  succeeded {s.succeeded}  "
            f"retrying {s.retrying}  dead-lettered {s.dead_lettered}",
            flush=True,
        )


def print_report(
    snapshot: Snapshot,
    stats: Stats,
    dead_letters: Counter[tuple[str, str, str]],
    url: str,
    elapsed: float,
    finished: bool,
) -> bool:
    """Print where every delivery ended, the stats and the DLQ by reason; True if
    every delivery is accounted for and no retry is left waiting."""
    out = views.console()
    out.print()
    out.print(
        f"Published [bold]{snapshot.published:,}[/] events ({snapshot.likes:,} like.added, "
        f"{snapshot.comments:,} comment.created) in {elapsed:.1f}s: "
        f"{snapshot.deliveries:,} deliveries to handlers."
    )
    _print_outcomes(out, snapshot)
    if not finished:
        out.print(
            f"[yellow]Gave up waiting: {snapshot.retrying} retries still queued "
            "(a worker would finish them).[/]"
        )
    out.print()
    out.print(views.stats_table(stats, url))
    out.print()
    out.print(_reason_table(dead_letters))
    out.print()
    out.print("Inspect what the demo left behind:")
    out.print(f"  retrybus stats --store {escape(url)}", soft_wrap=True)
    out.print(f"  retrybus dlq list --store {escape(url)}", soft_wrap=True)
    return finished and snapshot.accounted


def _print_outcomes(out: Console, s: Snapshot) -> None:
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column()
    table.add_column(justify="right")
    table.add_row("succeeded first time", f"{s.succeeded_first:,}")
    table.add_row("succeeded on a retry", f"{s.succeeded_on_retry:,}")
    table.add_row("dead-lettered", f"{s.dead_lettered:,}")
    table.add_row("still retrying", f"{s.retrying:,}")
    mark = "[green]✓ nothing lost[/]" if s.accounted else "[red]✗ deliveries unaccounted for[/]"
    table.add_row(
        f"[bold]total[/] {mark}", f"[bold]{s.succeeded + s.dead_lettered + s.retrying:,}[/]"
    )
    out.print(table)


def _reason_table(dead_letters: Counter[tuple[str, str, str]]) -> Table:
    table = Table(title="dead letters by reason", title_justify="left")
    table.add_column("reason")
    table.add_column("handler", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("error (most common)")
    groups: dict[tuple[str, str], Counter[str]] = {}
    for (reason, handler, error), count in dead_letters.items():
        groups.setdefault((reason, handler), Counter())[error] += count
    ranked = sorted(groups.items(), key=lambda group: -group[1].total())
    for (reason, handler), errors in ranked:
        table.add_row(
            escape(reason),
            escape(handler),
            f"{errors.total():,}",
            escape(errors.most_common(1)[0][0]),
        )
    if not groups:
        table.add_row("—", "—", "0", "")
    return table
