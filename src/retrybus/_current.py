"""Which handler the delivery core is calling now: set around each handler call,
so that ``bus.inbox.claim`` inside a handler knows the delivery it belongs to
without being told."""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["current_handler"]

#: the name of the handler being called in this context (None: outside a call)
current_handler: ContextVar[str | None] = ContextVar("retrybus_current_handler", default=None)
