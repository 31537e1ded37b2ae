"""The tables people read (Rich). Imported only by commands that print them, so
that the worker never loads Rich."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .._groups import FailureGroup, GroupCount
from .._records import DeadLetterItem, RetryItem
from .._stats import Stats

__all__ = [
    "console",
    "count_table",
    "dead_letter_detail",
    "dead_letter_table",
    "duration",
    "failure_group_table",
    "retry_table",
    "stats_table",
]

_PIPE_WIDTH = 160
_ERROR_WIDTH = 48


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr); wide when piped, so tables are not squeezed."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else _PIPE_WIDTH
    return Console(stderr=stderr, width=width, highlight=False)


def duration(seconds: float) -> str:
    """``0.4s``, ``12s``, ``3m05s``, ``2h10m``, ``4d3h``."""
    seconds = abs(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600}h"


def _ago(moment: datetime, now: datetime) -> str:
    return f"{duration((now - moment).total_seconds())} ago"


def _due(moment: datetime, now: datetime) -> str:
    seconds = (moment - now).total_seconds()
    return f"in {duration(seconds)}" if seconds > 0 else f"due {duration(seconds)} ago"


def _short(text: str, width: int = _ERROR_WIDTH) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def stats_table(stats: Stats, url: str) -> Table:
    """``bus.stats()`` as a two-column table titled with the store URL."""
    table = Table(title="retrybus stats", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("store", escape(url), end_section=True)
    table.add_row("retry queue size", str(stats.retry_queue_size))
    table.add_row("  due within a minute", str(stats.due_within_minute))
    table.add_row("  due within an hour", str(stats.due_within_hour))
    table.add_row("dead letters", str(stats.dead_letter_queue_size))
    table.add_row("  unprocessed", str(stats.unprocessed_dead_letters))
    table.add_row("retries scheduled", str(stats.retries_scheduled))
    table.add_row("retries succeeded", str(stats.retries_succeeded))
    table.add_row("retries dead-lettered", str(stats.retries_dead_lettered))
    table.add_row("retry success rate", _percent(stats.retry_success_rate))
    average = stats.average_attempts
    table.add_row("average attempts", "—" if average is None else f"{average:.2f}")
    return table


def dead_letter_table(items: Sequence[DeadLetterItem], now: datetime, title: str) -> Table:
    """Dead letters, one per row, newest first."""
    table = Table(title=escape(title), title_justify="left")
    table.add_column("id", no_wrap=True, style="cyan")
    table.add_column("created", no_wrap=True)
    table.add_column("event type", no_wrap=True)
    table.add_column("handler", no_wrap=True)
    table.add_column("retries", justify="right")
    table.add_column("reason", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis")
    table.add_column("processed", justify="center")
    for item in items:
        table.add_row(
            item.id,
            _ago(item.created_at, now),
            escape(item.event_type),
            escape(item.handler_name),
            str(item.attempt),
            escape(item.reason),
            escape(_short(item.error)),
            "yes" if item.processed else "no",
        )
    return table


def retry_table(items: Sequence[RetryItem], now: datetime, title: str) -> Table:
    """Retry items, one per row, by next retry."""
    table = Table(title=escape(title), title_justify="left")
    table.add_column("id", no_wrap=True, style="cyan")
    table.add_column("next retry", no_wrap=True)
    table.add_column("event type", no_wrap=True)
    table.add_column("handler", no_wrap=True)
    table.add_column("retry", justify="right")
    table.add_column("last error", no_wrap=True, overflow="ellipsis")
    table.add_column("leased by")
    for item in items:
        leased = (
            item.lease_owner
            if item.lease_owner and item.lease_until and item.lease_until > now
            else ""
        )
        table.add_row(
            item.id,
            _due(item.next_retry, now),
            escape(item.event_type),
            escape(item.handler_name),
            f"{item.attempt}/{item.max_retries}",
            escape(_short(item.error)),
            escape(leased or ""),
        )
    return table


def dead_letter_detail(item: DeadLetterItem, now: datetime) -> RenderableType:
    """One dead letter in full: its fields, the event's data, metadata and traceback."""
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    rows: list[tuple[str, str]] = [
        ("id", item.id),
        ("reason", item.reason),
        ("handler", item.handler_name),
        ("error", f"{item.error_type or 'error'}: {item.error}"),
        ("retries", f"{item.attempt} (max {item.max_retries})"),
        ("processed", f"yes, {item.processed_at.isoformat()}" if item.processed_at else "no"),
        ("created", f"{item.created_at.isoformat()} ({_ago(item.created_at, now)})"),
        (
            "first failed",
            item.first_failed_at.isoformat() if item.first_failed_at else "—",
        ),
        ("event id", item.event_id),
        ("event type", item.event_type),
        ("event source", item.event_source),
        ("event time", item.event_timestamp.isoformat()),
    ]
    if item.event_subject is not None:
        rows.append(("event subject", item.event_subject))
    rows.extend((f"extension {k}", v) for k, v in item.event_extensions.items())
    for name, value in rows:
        fields.add_row(name, Text(value))
    parts: list[RenderableType] = [
        fields,
        Text("\nevent data", style="bold"),
        Text(json.dumps(item.event_data, indent=2, ensure_ascii=False)),
    ]
    if item.metadata:
        parts += [
            Text("\nmetadata", style="bold"),
            Text(json.dumps(dict(item.metadata), indent=2, ensure_ascii=False, default=str)),
        ]
    if item.traceback:
        parts += [Text("\ntraceback", style="bold"), Text(item.traceback.rstrip(), style="dim")]
    return Group(*parts)


def failure_group_table(groups: Sequence[FailureGroup], now: datetime, title: str) -> Table:
    """Failure groups, one per row, largest first."""
    table = Table(title=escape(title), title_justify="left")
    table.add_column("count", justify="right", style="bold")
    table.add_column("handler", no_wrap=True)
    table.add_column("error type", no_wrap=True)
    table.add_column("message shape", overflow="ellipsis")
    table.add_column("first", no_wrap=True)
    table.add_column("last", no_wrap=True)
    table.add_column("group (--filter group=…)", no_wrap=True, style="cyan")
    for group in groups:
        table.add_row(
            str(group.count),
            escape(group.handler_name),
            escape(group.error_type.rsplit(".", 1)[-1] or "—"),
            escape(_short(group.shape, 60)),
            _ago(group.first_at, now),
            _ago(group.last_at, now),
            group.key,
        )
    return table


def count_table(
    counts: Sequence[GroupCount], by: str, now: datetime, title: str, *, due: bool = False
) -> Table:
    """Counts per value of one field, largest first (``due``: the times are next retries)."""
    when = _due if due else _ago
    table = Table(title=escape(title), title_justify="left")
    table.add_column("count", justify="right", style="bold")
    table.add_column(by, no_wrap=True)
    table.add_column("first due" if due else "first", no_wrap=True)
    table.add_column("last due" if due else "last", no_wrap=True)
    for count in counts:
        table.add_row(
            str(count.count), escape(count.key), when(count.first_at, now), when(count.last_at, now)
        )
    return table
