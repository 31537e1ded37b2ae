"""Structured logs: ``JsonFormatter`` writes each log record as one JSON object
per line, with the delivery fields retrybus attaches to its records
(``event_id``, ``event_type``, ``handler``, ``attempt``, ``reason`` …) as keys
of their own, and the ``trace_id`` and ``span_id`` of the handler call the
record is about (or of the current span) when OpenTelemetry is in use.

>>> import logging
>>> from retrybus.logs import JsonFormatter
>>> handler = logging.StreamHandler()
>>> handler.setFormatter(JsonFormatter())
>>> logging.getLogger("retrybus").addHandler(handler)

``retrybus worker --log-format json`` sets this up for the worker.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["DELIVERY_FIELDS", "JsonFormatter"]

#: the ``extra`` fields retrybus puts on a log record about a delivery
DELIVERY_FIELDS = ("event_id", "event_type", "handler", "attempt")

# the attributes every LogRecord has; anything else was passed as ``extra``
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON object on one line: ``time`` (UTC, ISO 8601),
    ``level``, ``logger``, ``message``, every ``extra`` field, ``exception``
    (the formatted traceback) when there is one, and ``trace_id``/``span_id``
    inside an OpenTelemetry span. Values JSON cannot hold are written as text."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                document.setdefault(key, value)  # an extra never hides time, level …
        for key, value in _trace_ids().items():
            document.setdefault(key, value)  # the delivery's own span, when it is named
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(document, default=str, ensure_ascii=False, allow_nan=False)
        except Exception:  # tuple keys, NaN, a failing __str__: keep the line anyway
            return json.dumps({key: _text(value) for key, value in document.items()})


def _text(value: Any) -> Any:
    if isinstance(value, str | int | bool) or value is None:
        return value
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _trace_ids() -> dict[str, str]:
    # only when the application already uses OpenTelemetry: never imported for this
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
