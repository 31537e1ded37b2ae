"""``/breakers``: the circuit breakers the store holds (of the service shown, or
of all), each with its state, handlers, trips and when an open one half-opens,
and an operator's Isolate (held open until reset) and Reset (closed now),
which need a write token as every action does. The page reads the breakers'
records (``_breaker_records``), so it needs no app: every process of the
breaker's service follows a change at its next refresh."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from .._breaker_records import UnknownBreaker, isolate_breaker, read_breakers, reset_breaker
from .._services import check_service
from ._actions import acting
from ._auth import Identity
from ._scope import chosen_service, render_page
from ._web import HTTPError, flash, redirect, state

__all__ = ["breakers", "isolate", "reset"]


async def breakers(request: Request) -> Response:
    """Every breaker of the service shown (``?service=``; none: of all services)."""
    bus = state(request).bus
    found = await read_breakers(bus.store, chosen_service(request), now=bus.clock.now())
    return await render_page(request, "breakers.html", {"breakers": found})


def _field(form: FormData, name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def _named(form: FormData) -> tuple[str, str]:
    """The breaker a form names: its ``service`` and ``name`` (400 when bad)."""
    service, name = _field(form, "service"), _field(form, "name")
    try:
        check_service(service)
    except ValueError as exc:
        raise HTTPError(400, "Bad service", str(exc)) from None
    if not name:
        raise HTTPError(400, "Bad breaker", "the form names no breaker")
    return service, name


@acting
async def isolate(request: Request, form: FormData, identity: Identity) -> Response:
    """Hold the breaker ``service``/``name`` open until it is reset."""
    return await _act(request, form, identity, "isolate")


@acting
async def reset(request: Request, form: FormData, identity: Identity) -> Response:
    """Close the breaker ``service``/``name`` now."""
    return await _act(request, form, identity, "reset")


async def _act(request: Request, form: FormData, identity: Identity, action: str) -> Response:
    bus = state(request).bus
    service, name = _named(form)
    change = isolate_breaker if action == "isolate" else reset_breaker
    try:
        changed = await change(bus.store, name, service, now=bus.clock.now(), actor=identity.name)
    except UnknownBreaker as exc:
        raise HTTPError(404, "No such breaker", str(exc)) from None
    done = "isolated: held open until it is reset" if action == "isolate" else "reset: closed"
    text = (
        f"Breaker {changed.service}/{changed.name} {done}. Every process of "
        f"{changed.service} follows at its next refresh (within seconds)."
    )
    return flash(request, redirect(request, "/breakers"), "ok", text)
