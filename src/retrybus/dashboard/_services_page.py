"""``/services``: the services sharing the store (``bus.services.overview()``),
and the removal of a subscription from there (``bus.services.remove``), asked
for on a confirmation page first."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from .._errors import SubscriptionInUse, UnknownSubscription
from .._service_admin import ServiceRemoval
from .._services import ServiceSummary, check_service
from ._actions import acting
from ._auth import Identity
from ._scope import chosen_service, render_page
from ._web import HTTPError, flash, redirect, render, state

__all__ = ["remove_subscription", "services"]


async def services(request: Request) -> Response:
    """Each service (or the one ``?service=`` names): its live workers, its
    handlers with their subscription and load, a warning when work waits and no
    worker of it is live, and, when the bus has a transport, the messages the
    broker holds for it (its broker lag); then each event type its services
    produce or consume, version beside version, the consumers behind their
    producers flagged."""
    bus = state(request).bus
    service = chosen_service(request)
    summaries = await bus.services.overview(service)
    broker = None if bus.transport is None else bus.transport.url
    context = {
        "summaries": summaries,
        "runners": _runners(summaries),
        "broker": broker,
        "type_versions": await bus.services.versions(service),
    }
    return await render_page(request, "services.html", context)


def _runners(summaries: list[ServiceSummary]) -> dict[str, list[str]]:
    """The live workers running each handler, by ``service/handler``."""
    running: dict[str, list[str]] = {}
    for summary in summaries:
        for worker in summary.workers:
            for name in worker.handlers:
                running.setdefault(f"{summary.service}/{name}", []).append(worker.name)
    return running


def _field(form: FormData, name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


@acting
async def remove_subscription(request: Request, form: FormData, identity: Identity) -> Response:
    """Without ``confirmed=yes``, a page asking to confirm (what waits, which live
    workers run it, a ``force`` box); with it, the subscription of ``service``'s
    ``handler`` (none: of all its handlers) is removed by the person logged in."""
    bus = state(request).bus
    service = _field(form, "service")
    handler = _field(form, "handler") or None
    try:
        check_service(service)
    except ValueError as exc:
        raise HTTPError(400, "Bad service", str(exc)) from None
    if _field(form, "confirmed") != "yes":
        return await _confirm(request, identity, service, handler)
    try:
        removal = await bus.services.remove(
            service, handler, actor=identity.name, force=_field(form, "force") == "yes"
        )
    except UnknownSubscription as exc:
        raise HTTPError(404, "No such subscription", str(exc)) from None
    except SubscriptionInUse as exc:
        raise HTTPError(409, "Cannot remove", str(exc)) from None
    return flash(request, redirect(request, "/services"), "ok", _outcome(removal, handler))


async def _confirm(
    request: Request, identity: Identity, service: str, handler: str | None
) -> Response:
    bus = state(request).bus
    stored = [
        s
        for s in await bus.services.list(service, removed=True)
        if handler is None or s.handler_name == handler
    ]
    if not stored:
        raise HTTPError(404, "No such subscription", str(UnknownSubscription(service, handler)))
    names = {s.handler_name for s in stored}
    live = sorted(s.handler_name for s in stored if not s.removed)
    summaries = await bus.services.overview(service)
    context = {
        "service": service,
        "handler": handler,
        "live": live,
        "removed_before": sorted(names - set(live)),
        "handlers": [h for s in summaries for h in s.handlers if h.handler_name in names],
        # what remove refuses without force: live workers whose beats list a live handler
        "workers": [w for s in summaries for w in s.workers if set(live) & set(w.handlers)],
    }
    return render(request, "confirm_remove.html", context, identity=identity)


def _outcome(removal: ServiceRemoval, handler: str | None) -> str:
    """What a removal did, for the flash message."""
    moved = (
        f"{removal.dead_lettered:,} waiting deliver{'y' if removal.dead_lettered == 1 else 'ies'}"
    )
    if removal.removed:
        names = ", ".join(f"{removal.service}/{name}" for name in removal.removed)
        text = f"Removed the subscription of {names}: {moved} dead-lettered"
    else:
        which = f"{removal.service}/{handler}" if handler else f"service {removal.service}"
        text = f"The subscription of {which} was removed before: {moved} dead-lettered"
    if removal.leased:
        text += (
            f"; {removal.leased:,} running now (leased) go to the dead letter queue "
            "once their lease runs out"
        )
    return text + "."
