"""The tables people read (Rich). Imported only by commands that print them, so
that the worker never loads Rich."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from rich.cells import cell_len
from rich.console import (
    Console,
    ConsoleOptions,
    Group,
    JustifyMethod,
    RenderableType,
    RenderResult,
)
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .._event_types import Reading
from .._groups import FailureGroup, GroupCount
from .._records import DeadLetterItem, RetryItem
from .._services import (
    DEFAULT_SERVICE,
    HandlerSummary,
    ServiceSummary,
    StoredSubscription,
    WorkerBeat,
)
from .._stats import Stats
from .._transports.base import ServiceTopology, TransportReport

__all__ = [
    "SHOWN_BYTES",
    "Column",
    "FittedTable",
    "console",
    "count_table",
    "dead_letter_detail",
    "dead_letter_table",
    "duration",
    "failure_group_table",
    "handler_table",
    "retry_table",
    "services_view",
    "stats_table",
    "transport_view",
    "worker_table",
]

_PIPE_WIDTH = 160
_ERROR_WIDTH = 48
#: how much of an event's data, metadata or traceback ``dlq show`` prints
#: without ``--full``
SHOWN_BYTES = 64 * 1024
# each cell has a space either side, and each column a rule on its left (the
# last also one on its right)
_CELL_PADDING = 2
_RULE = 1

Row = TypeVar("Row")
QueueRecord = TypeVar("QueueRecord", RetryItem, DeadLetterItem)


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


@dataclass(frozen=True)
class Column(Generic[Row]):
    """A column of a ``FittedTable``: its header, its cell in each row, and how it
    gives way when the console is too narrow for every column."""

    header: str
    cell: Callable[[Row], str]
    #: when the columns do not fit, they are dropped by this number, 1 first;
    #: None: never (an id a person copies)
    drop: int | None = None
    #: the narrowest this column may wrap to; None: it never wraps (ids, times)
    wraps_to: int | None = None
    justify: JustifyMethod = "left"
    style: str = ""


def _table_width(content_widths: Iterable[int]) -> int:
    """How wide a table is whose columns hold text this wide."""
    return sum(width + _CELL_PADDING + _RULE for width in content_widths) + _RULE


class FittedTable:
    """A table that fits the console it is printed on.

    While its columns would not fit even wrapped, the next by ``Column.drop`` is
    left out; then the columns that wrap are narrowed, the widest first. The
    columns that never wrap (ids) are shown whole on one line.
    """

    def __init__(
        self,
        title: str,
        columns: Sequence[Column[Row]],
        rows: Sequence[Row],
        *,
        caption: str | None = None,
    ) -> None:
        self.title = title
        self.caption = caption
        self.columns: list[Column[Any]] = list(columns)
        self.cells = [[column.cell(row) for column in columns] for row in rows]
        texts = [
            [column.header, *(row[index] for row in self.cells)]
            for index, column in enumerate(self.columns)
        ]
        self.widest = [max(map(cell_len, column)) for column in texts]
        self.longest_word = [
            max(cell_len(word) for text in column for word in [*text.split(), ""])
            for column in texts
        ]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)

    def table(self, width: int) -> Table:
        """The table as it fits in ``width`` columns of text."""
        widths = self.layout(width)
        table = Table(
            title=escape(self.title),
            title_justify="left",
            caption=None if self.caption is None else escape(self.caption),
            caption_justify="left",
        )
        for index, content_width in widths.items():
            column = self.columns[index]
            table.add_column(
                column.header,
                justify=column.justify,
                style=column.style,
                no_wrap=column.wraps_to is None,
                overflow="fold",
                max_width=content_width,
            )
        for row in self.cells:
            table.add_row(*(Text(row[index]) for index in widths))
        return table

    def layout(self, width: int) -> dict[int, int]:
        """The columns to show in ``width`` columns of text (by index, in order),
        each with the width of its text."""
        shown = self._shown(width)
        widths = {index: self.widest[index] for index in shown}
        wrapping = [i for i in shown if self.columns[i].wraps_to is not None]
        excess = _table_width(widths.values()) - width
        # wrap between words first; cut words only if that is not enough
        excess = self._narrow(widths, wrapping, self._unbroken, excess)
        self._narrow(widths, wrapping, self._least, excess)
        return widths

    @staticmethod
    def _narrow(
        widths: dict[int, int], indexes: list[int], floor: Callable[[int], int], excess: int
    ) -> int:
        """Narrow the widest of these columns, one character at a time, until
        ``excess`` characters are saved or each is at its floor; what is left."""
        while excess > 0:
            narrowable = [i for i in indexes if widths[i] > floor(i)]
            if not narrowable:
                break
            widest = max(widths[i] for i in narrowable)
            for index in (i for i in narrowable if widths[i] == widest):
                if excess > 0:
                    widths[index] -= 1
                    excess -= 1
        return excess

    def _least(self, index: int) -> int:
        """The narrowest column ``index`` may be."""
        wraps_to = self.columns[index].wraps_to
        return self.widest[index] if wraps_to is None else min(self.widest[index], wraps_to)

    def _unbroken(self, index: int) -> int:
        """The narrowest column ``index`` may be without cutting a word."""
        return max(self._least(index), self.longest_word[index])

    def _shown(self, width: int) -> list[int]:
        shown = list(range(len(self.columns)))
        droppable = sorted(
            (column.drop, index) for index, column in enumerate(self.columns) if column.drop
        )
        for _, index in droppable:
            if _table_width(self._least(i) for i in shown) <= width:
                break
            shown.remove(index)
        return shown


def stats_table(stats: Stats, url: str) -> Table:
    """``bus.stats()`` as a two-column table titled with the store URL."""
    table = Table(title="retrybus stats", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("store", escape(url), end_section=True)
    table.add_row("retry queue size", str(stats.retry_queue_size))
    table.add_row("  retries", str(stats.retry_queue_retries))
    table.add_row("  pending deliveries", str(stats.retry_queue_pending))
    table.add_row("  scheduled deliveries", str(stats.retry_queue_scheduled))
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


def _service_column(
    items: Sequence[QueueRecord], *, wraps_to: int, drop: int
) -> list[Column[QueueRecord]]:
    """The column naming each record's service, when the records are not all of
    the default service (they come from several services, or from another one);
    else none: a store of one service shows its tables as before services."""
    if all(item.service == DEFAULT_SERVICE for item in items):
        return []
    return [Column("service", lambda item: item.service, wraps_to=wraps_to, drop=drop)]


def dead_letter_table(items: Sequence[DeadLetterItem], now: datetime, title: str) -> FittedTable:
    """Dead letters, one per row, newest first, with a service column when not all
    are of the default service; in a narrow console the retries, creation times,
    event types, reasons, processed marks, services and handlers give way (in that
    order) so that each id stays whole."""
    columns: list[Column[DeadLetterItem]] = [
        Column("id", lambda item: item.id, style="cyan"),
        Column("created", lambda item: _ago(item.created_at, now), drop=2),
        Column("event type", lambda item: item.event_type, wraps_to=10, drop=3),
        *_service_column(items, wraps_to=10, drop=6),
        Column("handler", lambda item: item.handler_name, wraps_to=10, drop=7),
        Column("retries", lambda item: str(item.attempt), justify="right", drop=1),
        Column("reason", lambda item: item.reason, wraps_to=10, drop=4),
        Column("error", lambda item: _short(item.error), wraps_to=10, drop=8),
        Column(
            "processed", lambda item: "yes" if item.processed else "no", justify="center", drop=5
        ),
    ]
    return FittedTable(title, columns, items)


def retry_table(items: Sequence[RetryItem], now: datetime, title: str) -> FittedTable:
    """Retry items, one per row, by next retry, with each one's kind (retry,
    pending, scheduled) and a service column when not all are of the default
    service; in a narrow console the lease owners, event types, retry counts,
    kinds, next retries, services and handlers give way (in that order) so that
    each id stays whole."""

    def leased_by(item: RetryItem) -> str:
        if item.lease_owner and item.lease_until and item.lease_until > now:
            return item.lease_owner
        return ""

    columns: list[Column[RetryItem]] = [
        Column("id", lambda item: item.id, style="cyan"),
        Column("kind", lambda item: item.kind(now), drop=4),
        Column("next retry", lambda item: _due(item.next_retry, now), wraps_to=8, drop=5),
        Column("event type", lambda item: item.event_type, wraps_to=8, drop=2),
        *_service_column(items, wraps_to=8, drop=6),
        Column("handler", lambda item: item.handler_name, wraps_to=8, drop=7),
        Column("retry", lambda item: f"{item.attempt}/{item.max_retries}", justify="right", drop=3),
        Column("last error", lambda item: _short(item.error), wraps_to=8, drop=8),
        Column("leased by", leased_by, wraps_to=8, drop=1),
    ]
    return FittedTable(title, columns, items)


def dead_letter_detail(
    item: DeadLetterItem, now: datetime, *, full: bool = False, reading: Reading | None = None
) -> Group:
    """One dead letter: its fields, the event's data, metadata and traceback; the
    last three cut after their first ``SHOWN_BYTES`` (with a line saying so)
    unless ``full``. With the ``reading`` of an app that registers its type: the
    stored and current versions, and the data as a handler gets it (upcast), or
    the reason it would be dead-lettered."""
    parts: list[RenderableType] = [_dead_letter_fields(item, now, reading)]
    parts += _json_section("event data", item.event_data, full)
    if reading is not None and reading.current_version is not None:
        if reading.error is not None:
            parts += _text_section("as this app reads it", reading.error, full=True, style="red")
        elif reading.upcast:
            parts += _json_section(
                f"as this app reads it (upcast to v{reading.current_version})", reading.data, full
            )
    if item.metadata:
        parts += _json_section("metadata", dict(item.metadata), full)
    if item.traceback:
        parts += _text_section("traceback", item.traceback.rstrip(), full, style="dim")
    return Group(*parts)


def _dead_letter_fields(item: DeadLetterItem, now: datetime, reading: Reading | None) -> Table:
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
    if reading is not None and reading.current_version is not None:
        rows.append(
            ("version", f"stored {reading.stored_version}, current {reading.current_version}")
        )
    rows.extend((f"extension {k}", v) for k, v in item.event_extensions.items())
    for name, value in rows:
        fields.add_row(name, Text(value))
    return fields


def _json_section(title: str, value: Any, full: bool) -> list[RenderableType]:
    if full:
        return _section(title, json.dumps(value, indent=2, ensure_ascii=False, default=str))
    head = _indented_json_head(value, SHOWN_BYTES)
    if _utf8_len(head) <= SHOWN_BYTES:  # then the encoder did not stop early: all of it
        return _section(title, head)
    # the compact form, which the C encoder writes fast, gives the size
    compact = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    return _section(title, _utf8_head(head), cut_from=f"{_size(_utf8_len(compact))} as JSON")


def _text_section(title: str, text: str, full: bool, *, style: str) -> list[RenderableType]:
    if full or _utf8_len(text) <= SHOWN_BYTES:
        return _section(title, text, style=style)
    return _section(title, _utf8_head(text), style=style, cut_from=_size(_utf8_len(text)))


def _section(
    title: str, text: str, *, style: str = "", cut_from: str | None = None
) -> list[RenderableType]:
    parts: list[RenderableType] = [Text(f"\n{title}", style="bold"), Text(text, style=style)]
    if cut_from is not None:
        parts.append(
            Text(
                f"[{title}: the first {_size(SHOWN_BYTES)} of {cut_from} are shown; "
                "--full prints all of it]",
                style="yellow",
            )
        )
    return parts


def _indented_json_head(value: Any, limit: int) -> str:
    """``value`` as indented JSON, whole or cut after a little more than ``limit``
    characters: the encoder stops there, so a huge value costs no more than a small one."""
    encoder = json.JSONEncoder(indent=2, ensure_ascii=False, default=str)
    chunks: list[str] = []
    length = 0
    for chunk in encoder.iterencode(value):
        chunks.append(chunk)
        length += len(chunk)
        if length > limit:
            break
    return "".join(chunks)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _utf8_head(text: str) -> str:
    """The start of ``text`` whose UTF-8 form takes at most ``SHOWN_BYTES``."""
    head = text[:SHOWN_BYTES].encode("utf-8", "surrogatepass")[:SHOWN_BYTES]
    return head.decode("utf-8", "ignore")


def _size(count: int) -> str:
    """``812 bytes``, ``64 KB``, ``10.5 MB`` (of 1024)."""
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.0f} KB"
    return f"{count / (1024 * 1024):.1f} MB"


def failure_group_table(groups: Sequence[FailureGroup], now: datetime, title: str) -> FittedTable:
    """Failure groups, one per row, largest first; in a narrow console the first
    and last times, error types, handlers and message shapes give way (in that
    order) so that each group's key stays whole."""
    columns: list[Column[FailureGroup]] = [
        Column("count", lambda group: str(group.count), justify="right", style="bold"),
        Column("handler", lambda group: group.handler_name, wraps_to=10, drop=4),
        Column(
            "error type",
            lambda group: group.error_type.rsplit(".", 1)[-1] or "—",
            wraps_to=10,
            drop=3,
        ),
        Column("message shape", lambda group: _short(group.shape, 60), wraps_to=12, drop=5),
        Column("first", lambda group: _ago(group.first_at, now), drop=1),
        Column("last", lambda group: _ago(group.last_at, now), drop=2),
        Column("group", lambda group: group.key, style="cyan"),
    ]
    caption = "--filter group=KEY selects a group's dead letters in other commands"
    return FittedTable(title, columns, groups, caption=caption)


def count_table(
    counts: Sequence[GroupCount], by: str, now: datetime, title: str, *, due: bool = False
) -> FittedTable:
    """Counts per value of one field, largest first (``due``: the times are next
    retries); in a narrow console the first and then the last times give way."""
    when = _due if due else _ago
    columns: list[Column[GroupCount]] = [
        Column("count", lambda count: str(count.count), justify="right", style="bold"),
        Column(by, lambda count: count.key),
        Column("first due" if due else "first", lambda count: when(count.first_at, now), drop=1),
        Column("last due" if due else "last", lambda count: when(count.last_at, now), drop=2),
    ]
    return FittedTable(title, columns, counts)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def services_view(
    summaries: Sequence[ServiceSummary], url: str, broker: str | None = None
) -> Group:
    """``bus.services.overview()`` as people read it, under a title naming the
    store (and ``broker``, the URL of the bus's transport, when it has one): per
    service a header line (its name, and ``WARNING no live worker`` when work
    waits and no worker of it is live), a line of its totals (with a transport,
    its broker lag, ``—`` when the broker did not say), its live workers and its
    handlers."""
    title = f"services — {url}" + ("" if broker is None else f", broker {broker}")
    parts: list[RenderableType] = [Text(title, style="italic")]
    for summary in summaries:
        parts.append(Text())
        parts.append(service_header(summary))
        parts.append(Text(_service_totals(summary, broker is not None)))
        if summary.workers:
            title = f"live workers of {summary.service}"
            parts.append(worker_table(summary.workers, summary.at, title))
        if summary.handlers:
            title = f"handlers of {summary.service}"
            parts.append(handler_table(summary.handlers, summary.at, title))
    return Group(*parts)


def service_header(summary: ServiceSummary) -> Text:
    """``service billing``, then ``WARNING no live worker`` (bold yellow) when it warns."""
    header = Text.assemble("service ", (summary.service, "bold cyan"))
    if summary.warning:
        header.append(f"  WARNING {summary.warning}", style="bold yellow")
    return header


def _service_totals(summary: ServiceSummary, broker: bool = False) -> str:
    """``3 waiting, 1 dead, oldest pending for 2m05s; 1 live worker, 2 stale beats``,
    and with a ``broker``, ``; broker lag 12`` (``—``: the broker did not say)."""
    totals = [f"{summary.waiting} waiting", f"{summary.dead} dead"]
    age = summary.oldest_pending_age
    if age is not None:
        totals.append(f"oldest pending for {duration(age)}")
    workers = [
        _plural(len(summary.workers), "live worker") if summary.workers else "no live worker"
    ]
    if summary.stale_workers:
        workers.append(_plural(summary.stale_workers, "stale beat"))
    line = f"{', '.join(totals)}; {', '.join(workers)}"
    return line + (f"; broker lag {_known(summary.broker_lag)}" if broker else "")


def worker_table(workers: Sequence[WorkerBeat], now: datetime, title: str) -> FittedTable:
    """Workers' heartbeats, one per row; in a narrow console the versions, start
    times, pids, hosts, lanes and last-seen ages give way (in that order) so that
    each worker's name stays whole."""
    columns: list[Column[WorkerBeat]] = [
        Column("name", lambda beat: beat.name, style="cyan"),
        Column("host", lambda beat: beat.host, wraps_to=10, drop=4),
        Column("pid", lambda beat: str(beat.pid), justify="right", drop=3),
        Column("started", lambda beat: _ago(beat.started_at, now), drop=2),
        Column("last seen", lambda beat: _ago(beat.last_seen, now), drop=6),
        Column(
            "lanes busy", lambda beat: f"{beat.lanes_busy}/{beat.lanes}", justify="right", drop=5
        ),
        Column("version", lambda beat: beat.version or "—", drop=1),
    ]
    return FittedTable(title, columns, workers)


def _handler_cell(handler: HandlerSummary) -> str:
    subscription = handler.subscription
    if subscription is None:
        return f"{handler.handler_name} (no stored subscription)"
    if subscription.removed:
        return f"{handler.handler_name} (removed by {subscription.removed_by or 'unknown'})"
    return handler.handler_name


def handler_table(handlers: Sequence[HandlerSummary], now: datetime, title: str) -> FittedTable:
    """A service's handlers, one per row: patterns, policy, what waits for each
    (pending, scheduled, retrying, unprocessed dead letters) and how long its
    oldest pending delivery has been due; a removed one says by whom. In a narrow
    console the policies, scheduled counts, oldest pending ages, retrying counts,
    patterns, dead and pending counts give way (in that order)."""

    def oldest(handler: HandlerSummary) -> str:
        age = handler.oldest_pending_age(now)
        return "—" if age is None else duration(age)

    def subscribed(handler: HandlerSummary, text: Callable[[StoredSubscription], str]) -> str:
        return "—" if handler.subscription is None else text(handler.subscription)

    columns: list[Column[HandlerSummary]] = [
        Column("handler", _handler_cell, wraps_to=12),
        Column(
            "patterns",
            lambda h: subscribed(h, lambda s: ", ".join(s.patterns)),
            wraps_to=10,
            drop=5,
        ),
        Column("policy", lambda h: subscribed(h, lambda s: s.policy), wraps_to=12, drop=1),
        Column("pending", lambda h: str(h.load.pending), justify="right", drop=7),
        Column("scheduled", lambda h: str(h.load.scheduled), justify="right", drop=2),
        Column("retrying", lambda h: str(h.load.retrying), justify="right", drop=4),
        Column("dead", lambda h: str(h.load.dead_unprocessed), justify="right", drop=6),
        Column("oldest pending", oldest, justify="right", drop=3),
    ]
    return FittedTable(title, columns, handlers)


def transport_view(report: TransportReport) -> Group:
    """``Transport.check``'s report as people read it: a title naming the broker,
    a table per service (its holders, lag, in flight, consumers and problems), the
    rest of the topology (``extra``), the warnings and a last line saying whether
    every service is in order."""
    parts: list[RenderableType] = [Text(f"transport {report.kind} — {report.url}", style="italic")]
    if not report.services:
        parts.append(Text("no services on the broker: none declared, none asked for"))
    for topology in report.services:
        parts.append(Text())
        parts.append(_topology_table(topology))
    if report.extra:
        parts.append(Text())
        parts.append(_extra_table(report.extra))
    for warning in report.warnings:
        parts.append(Text(f"WARNING {warning}", style="bold yellow"))
    parts.append(Text())
    troubled = sum(1 for topology in report.services if topology.problems)
    if troubled:
        parts.append(Text(f"{_plural(troubled, 'service')} with problems", style="bold red"))
    else:
        parts.append(Text("healthy", style="bold green"))
    return Group(*parts)


def _known(value: int | None) -> str:
    return "—" if value is None else str(value)


def _topology_table(topology: ServiceTopology) -> Table:
    """One service's holders, lag, in flight, consumers and problems, one per row."""
    title = f"service {topology.service}" + ("  PROBLEM" if topology.problems else "")
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("holders", Text("\n".join(topology.holders) or "—"))
    table.add_row("lag", _known(topology.lag))
    table.add_row("in flight", _known(topology.in_flight))
    table.add_row("consumers", _known(topology.consumers))
    problems = "\n".join(topology.problems)
    table.add_row("problems", Text(problems, style="bold red") if problems else Text("none"))
    return table


def _extra_table(extra: dict[str, Any]) -> Table:
    """The rest of a broker's topology, by name (values not text as JSON)."""
    table = Table(title="broker", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, value in extra.items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        table.add_row(Text(str(name)), Text(shown))
    return table
