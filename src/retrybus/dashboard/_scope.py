"""The service a page shows (``?service=``; none: all services): read from the
address, and the selector in the top bar that sets it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .._bus import EventBus
from .._filters import DeadLetterFilter
from .._services import HandlerLoad, check_service
from ._web import SERVICE_KEY, HTTPError, render, root, state

__all__ = ["chosen_service", "known_services", "render_page", "service_loads"]

#: the pages the selector leads to: the section a page is in (any other: the overview)
SECTIONS = ("/dead-letters", "/groups", "/retry-queue", "/redrives", "/services", "/breakers")
#: what the selector leaves out of the address it keeps (a page number means
#: nothing in another service's list)
NOT_KEPT = (SERVICE_KEY, "offset")
#: groups one count of the services with records reads at most
MAX_SERVICES = 200


def chosen_service(request: Request) -> str | None:
    """The service the address names (None: all services). A name that is no
    service name is refused (400)."""
    text = request.query_params.get(SERVICE_KEY, "").strip()
    if not text:
        return None
    try:
        check_service(text)
    except ValueError as exc:
        raise HTTPError(400, "Bad service", str(exc)) from None
    return text


async def known_services(bus: EventBus) -> list[str]:
    """The services the store knows, by name: those with subscriptions (removed
    ones too), heartbeats or records."""
    store = bus.store
    names = {s.service for s in await store.list_subscriptions(removed=True)}
    names |= {beat.service for beat in await store.list_workers()}
    names |= {g.key for g in await store.group_retry("service", limit=MAX_SERVICES)}
    names |= {
        g.key for g in await store.group_dead("service", DeadLetterFilter(), limit=MAX_SERVICES)
    }
    return sorted(names)


async def service_loads(bus: EventBus, service: str) -> list[HandlerLoad]:
    """What waits for each handler of ``service`` now."""
    loads = await bus.store.service_loads(bus.clock.now())
    return [load for load in loads if load.service == service]


async def render_page(
    request: Request, template: str, context: Mapping[str, Any], *, status: int = 200
) -> Response:
    """``render`` a page with the service selector: shown when the store knows
    more than one service, or the page shows one."""
    service = chosen_service(request)
    choices = await known_services(state(request).bus)
    if service is not None and service not in choices:
        choices = sorted([*choices, service])
    path = request.url.path.removeprefix(root(request)) or "/"
    target = next((s for s in SECTIONS if path == s or path.startswith(s + "/")), "/")
    kept = (
        [(k, v) for k, v in request.query_params.multi_items() if k not in NOT_KEPT]
        if path == target
        else []
    )
    selector = {
        "service": service,
        "service_choices": choices if len(choices) > 1 or service is not None else [],
        "selector_path": target,
        "selector_keep": kept,
    }
    return render(request, template, {**selector, **context}, status=status)
