"""What changes data: log-in and log-out, the actions on dead letters and
redrives, and cancelling a pending or scheduled delivery. Every one is a POST that passes ``Auth.check_post`` (a token, a CSRF
token for a session, no foreign Origin) before it touches anything."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import Message

from .._errors import ItemNotFound, NotCancellable, OtherService, UnknownHandler
from .._queues import check_cancellable
from .._redrive import parse_rate
from ._auth import LOGIN_COOKIE, SESSION_COOKIE, Forbidden, Identity
from ._display import public_type_name
from ._pages import ACTIONS, RETRY_LIST_KEYS, dead_letter_context, parse_filter
from ._web import HTTPError, flash, redirect, render, root, state

__all__ = [
    "bulk",
    "cancel_delivery",
    "edit",
    "item_action",
    "login",
    "login_form",
    "logout",
    "redrive_action",
    "selected",
]

# Starlette refuses a form field over 1 MiB: a form as a whole may hold as much
MAX_BODY = 1024 * 1024
MAX_LISTED = 5
REDRIVE_ACTIONS = ("pause", "resume", "cancel", "delete")
# what the dead letter list's address may hold (a form's "back" keeps only these)
LIST_KEYS = (
    *("type", "handler", "reason", "processed", "since", "until", "event_id", "group"),
    *("service", "offset", "limit"),
)

Action = Callable[[Request, FormData, Identity], Awaitable[Response]]


async def _form(request: Request) -> FormData:
    """The request's form, read only up to ``MAX_BODY`` bytes (chunked bodies too)."""
    too_large = HTTPError(413, "Request too large", f"a form may hold at most {MAX_BODY:,} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise too_large
    whole = bytes(body)

    async def replay() -> Message:  # the body read above, for the form parser
        return {"type": "http.request", "body": whole, "more_body": False}

    return await Request(request.scope, replay).form()


def acting(action: Action) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a data-changing endpoint: refuse (403) unless ``check_post`` passes."""

    async def endpoint(request: Request) -> Response:
        auth = state(request).auth
        try:
            if auth.read_only:  # refuse before reading a body that cannot matter
                raise Forbidden(
                    "read-only dashboard: no tokens are configured, nothing can be changed"
                )
            # who is asking, before reading a body: a stranger's is never read
            auth.check_sender(request)
            form = await _form(request)
            csrf = form.get("csrf")
            identity = auth.check_post(request, csrf if isinstance(csrf, str) else None)
            await _check_not_revoked(request, identity)
        except Forbidden as exc:
            raise HTTPError(403, "Forbidden", str(exc)) from None
        return await action(request, form, identity)

    endpoint.__name__ = action.__name__
    return endpoint


async def _check_not_revoked(request: Request, identity: Identity) -> None:
    """Refuse a session logged out anywhere (the store is asked, not a cache)."""
    revocations = state(request).revocations
    if (
        identity.via == "session"
        and revocations is not None
        and await revocations.is_revoked(identity.session_id)
    ):
        raise Forbidden("this session was logged out: log in with a token to change data")


def _text(form: FormData, name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def _back(request: Request, form: FormData) -> Response:
    """Back to the dead letter list the form was on (its query string, re-encoded)."""
    pairs = parse_qsl(_text(form, "back"), keep_blank_values=False)
    return redirect(request, "/dead-letters", {k: v for k, v in pairs if k in LIST_KEYS})


def _listed(entries: list[str]) -> str:
    shown = entries[:MAX_LISTED]
    more = len(entries) - len(shown)
    return "; ".join(shown) + (f" and {more} more" if more > 0 else "")


# logging in and out -----------------------------------------------------------


async def login_form(
    request: Request, *, status: int = 200, error: str = "", next_path: str | None = None
) -> Response:
    auth = state(request).auth
    nonce = request.cookies.get(LOGIN_COOKIE) or auth.login_nonce()
    if next_path is None:
        next_path = request.query_params.get("next", "")
    context = {
        "login_csrf": "" if auth.read_only else auth.login_csrf(nonce),
        "next": next_path if _local(request, next_path) else "",
        "error": error,
    }
    response = render(request, "login.html", context, status=status)
    if not auth.read_only:
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=3600,
            path=root(request) or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return response


def _local(request: Request, path: str) -> bool:
    """Whether ``path`` is a page of this dashboard (no open redirects)."""
    prefix = root(request) + "/"
    return path.startswith(prefix) and not path.startswith("//") and "\\" not in path


def _client(request: Request) -> str:
    """The address log-in attempts are counted under (behind a proxy, the proxy's
    unless the server takes the client's from its headers, as uvicorn's
    ``--proxy-headers`` does)."""
    return request.client.host if request.client is not None else "unknown"


async def login(request: Request) -> Response:
    dashboard = state(request)
    auth, limiter = dashboard.auth, dashboard.login_limiter
    client = _client(request)
    wait = None if limiter is None else limiter.retry_after(client)
    if limiter is not None and wait is not None:
        raise HTTPError(
            429,
            "Too many log-in attempts",
            f"{limiter.limit} failed log-ins from {client} within {limiter.window:g} s: "
            f"try again in {wait} s",
            headers={"retry-after": str(wait)},
        )
    try:
        form = await _form(request)
        auth.check_login_post(request, _text(form, "csrf"))
    except Forbidden as exc:
        if limiter is not None:
            limiter.failed(client)
        raise HTTPError(403, "Forbidden", str(exc)) from None
    target = _text(form, "next")
    name = auth.name_for_login(_text(form, "token"))
    if name is None:
        if limiter is not None:
            limiter.failed(client)
        error = "That is not one of the configured tokens."
        return await login_form(request, status=403, error=error, next_path=target)
    if limiter is not None:
        limiter.succeeded(client)
    await _revoke(request, auth.identify(request))  # the session this one replaces
    response: Response = (
        RedirectResponse(target, status_code=303)
        if _local(request, target)
        else redirect(request, "/")
    )
    response.set_cookie(
        SESSION_COOKIE,
        auth.new_session(name),
        max_age=auth.session_max_age,
        path=root(request) or "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(LOGIN_COOKIE, path=root(request) or "/")
    return flash(request, response, "ok", f"Logged in as {name}.")


async def _revoke(request: Request, identity: Identity | None) -> None:
    revocations = state(request).revocations
    if identity is not None and identity.via == "session" and revocations is not None:
        await revocations.revoke(identity.session_id, identity.expires, identity.name)


@acting
async def logout(request: Request, form: FormData, identity: Identity) -> Response:
    """End the session for every copy of its cookie (a bearer token has none to end)."""
    await _revoke(request, identity)
    response = redirect(request, "/")
    response.delete_cookie(SESSION_COOKIE, path=root(request) or "/")
    return flash(request, response, "ok", f"Logged out ({identity.name}).")


# one dead letter ----------------------------------------------------------------


def item_action(action: str) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint of one action on a dead letter (``requeue``, ``reprocess`` or
    ``delete``): one route each, so that no route takes any word after an id (a
    GET of ``/dead-letters/a/b`` is a 404, not a 405)."""
    if action not in ACTIONS:
        raise ValueError(f"dead letters can be requeued, reprocessed or deleted, not {action!r}")

    async def act(request: Request, form: FormData, identity: Identity) -> Response:
        return await _item_action(request, form, identity, action)

    act.__name__ = f"dead_letter_{action}"
    return acting(act)


async def _item_action(
    request: Request, form: FormData, identity: Identity, action: str
) -> Response:
    bus = state(request).bus
    item_id = request.path_params["item_id"]
    try:
        if action == "requeue":
            retry = await bus.dead_letters.requeue(item_id, actor=identity.name)
            response = redirect(request, f"/retry-queue/{retry.id}")
            return flash(request, response, "ok", f"Requeued {item_id} as {retry.id}: due now.")
        if action == "delete":
            await bus.dead_letters.delete(item_id)
            return flash(request, _back(request, form), "ok", f"Deleted {item_id}.")
        if state(request).reprocess_disabled:
            raise HTTPError(409, "Cannot reprocess", state(request).reprocess_disabled)
        item = await bus.dead_letters.reprocess(item_id, actor=identity.name)
    except ItemNotFound:
        raise HTTPError(
            404, "No such dead letter", f"no dead letter has the id {item_id!r}"
        ) from None
    except (UnknownHandler, OtherService) as exc:
        raise HTTPError(409, "Cannot reprocess", str(exc)) from None
    response = redirect(request, f"/dead-letters/{item_id}")
    if item.processed:
        return flash(request, response, "ok", f"Reprocessed {item_id}: the handler succeeded.")
    error_type = public_type_name(item.error_type)
    return flash(
        request,
        response,
        "error",
        f"Reprocessed {item_id}: it failed again ({error_type}: {item.error})",
    )


def _payload(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@acting
async def edit(request: Request, form: FormData, identity: Identity) -> Response:
    bus = state(request).bus
    item_id = request.path_params["item_id"]
    text = form.get("data", "")
    text = text if isinstance(text, str) else ""
    try:
        item = await bus.dead_letters.get(item_id)
    except ItemNotFound:
        raise HTTPError(
            404, "No such dead letter", f"no dead letter has the id {item_id!r}"
        ) from None
    try:
        data = _payload(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        context = dead_letter_context(item, edit_text=text, edit_error=f"Not valid JSON: {exc}")
        return render(request, "dead_letter.html", context, status=400, identity=identity)
    try:
        retry = await bus.dead_letters.requeue(item_id, data=data, actor=identity.name)
    except ItemNotFound:
        raise HTTPError(
            404, "No such dead letter", f"no dead letter has the id {item_id!r}"
        ) from None
    except (TypeError, ValueError) as exc:
        context = dead_letter_context(item, edit_text=text, edit_error=str(exc))
        return render(request, "dead_letter.html", context, status=400, identity=identity)
    response = redirect(request, f"/retry-queue/{retry.id}")
    return flash(request, response, "ok", f"Edited and requeued {item_id} as {retry.id}: due now.")


# a selection ------------------------------------------------------------------------


@acting
async def selected(request: Request, form: FormData, identity: Identity) -> Response:
    dashboard = state(request)
    bus = dashboard.bus
    action = _text(form, "action")
    ids = [
        value.strip() for value in form.getlist("ids") if isinstance(value, str) and value.strip()
    ]
    if action not in ACTIONS:
        raise HTTPError(
            400, "Bad action", f"action must be requeue, reprocess or delete, got {action!r}"
        )
    if not ids:
        return flash(
            request, _back(request, form), "error", "Select at least one dead letter first."
        )
    if action == "delete":
        if _text(form, "confirmed") != "yes":
            context = {"ids": ids, "back": _text(form, "back")}
            return render(request, "confirm_selection.html", context, identity=identity)
        deleted = await bus.dead_letters.delete_many(ids)
        return flash(
            request, _back(request, form), "ok", f"Deleted {deleted} of {len(ids)} selected."
        )
    if action == "reprocess":
        if dashboard.reprocess_disabled:
            raise HTTPError(409, "Cannot reprocess", dashboard.reprocess_disabled)
        result = await bus.dead_letters.reprocess_many(ids, actor=identity.name)
        verb = "Reprocessed"
    else:
        result = await bus.dead_letters.requeue_many(ids, actor=identity.name)
        verb = "Requeued"
    parts = [f"{verb} {len(result.succeeded)} of {len(ids)} selected."]
    if result.failed:
        parts.append(f"Failed: {_listed([f'{k}: {v}' for k, v in result.failed.items()])}.")
    if result.missing:
        parts.append(f"No longer there: {_listed(list(result.missing))}.")
    kind = "ok" if not result.failed else "error"
    return flash(request, _back(request, form), kind, " ".join(parts))


# everything matching a filter (or a failure group) ------------------------------------


@acting
async def bulk(request: Request, form: FormData, identity: Identity) -> Response:
    dashboard = state(request)
    bus = dashboard.bus
    action = _text(form, "action")
    if action not in ACTIONS:
        raise HTTPError(
            400, "Bad action", f"action must be requeue, reprocess or delete, got {action!r}"
        )
    pairs = [
        (key[2:], value)
        for key, value in form.multi_items()
        if key.startswith("f_") and isinstance(value, str)
    ]
    where, _ = parse_filter(request, pairs)
    if action == "delete":
        deleted = await bus.dead_letters.delete_matching(where)
        response = redirect(request, "/dead-letters")
        return flash(request, response, "ok", f"Deleted {deleted:,} dead letters.")
    if action == "reprocess" and dashboard.reprocess_disabled:
        raise HTTPError(409, "Cannot reprocess", dashboard.reprocess_disabled)
    rate_text, probe_text = _text(form, "rate"), _text(form, "probe") or "0"
    try:
        rate = parse_rate(rate_text) if rate_text else None
    except ValueError as exc:
        raise HTTPError(400, "Bad rate", str(exc)) from None
    if not (probe_text.isascii() and probe_text.isdigit()) or len(probe_text) > 9:
        raise HTTPError(
            400, "Bad probe size", f"the probe size must be a whole number >= 0, got {probe_text!r}"
        )
    try:
        redrive = await bus.redrives.start(
            where, action=action, rate=rate, probe=int(probe_text), actor=identity.name
        )
    except OtherService as exc:
        raise HTTPError(409, "Cannot reprocess", str(exc)) from None
    response = redirect(request, f"/redrives/{redrive.id}")
    verb = "requeue" if action == "requeue" else "reprocess"
    return flash(
        request, response, "ok", f"Started a redrive to {verb} {redrive.total:,} dead letters."
    )


# redrives ---------------------------------------------------------------------------


def redrive_action(action: str) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint of one action on a redrive (``pause``, ``resume``, ``cancel``,
    ``delete``), one route each as for dead letters."""
    if action not in REDRIVE_ACTIONS:
        raise ValueError(f"a redrive can be paused, resumed, cancelled or deleted, not {action!r}")

    async def act(request: Request, form: FormData, identity: Identity) -> Response:
        return await _redrive_action(request, form, action)

    act.__name__ = f"redrive_{action}"
    return acting(act)


async def _redrive_action(request: Request, form: FormData, action: str) -> Response:
    redrives = state(request).bus.redrives
    redrive_id = request.path_params["redrive_id"]
    try:
        if action == "delete":
            await redrives.delete(redrive_id)
            return flash(
                request, redirect(request, "/redrives"), "ok", f"Deleted redrive {redrive_id}."
            )
        changed = await getattr(redrives, action)(redrive_id)
    except ItemNotFound:
        raise HTTPError(404, "No such redrive", f"no redrive has the id {redrive_id!r}") from None
    except ValueError as exc:
        raise HTTPError(409, "Cannot " + action, str(exc)) from None
    target = _text(form, "back")
    response = (
        redirect(request, "/redrives")
        if target == "list"
        else redirect(request, f"/redrives/{redrive_id}")
    )
    return flash(request, response, "ok", f"Redrive {redrive_id}: {changed.state}.")


# a pending or scheduled delivery -----------------------------------------------------


@acting
async def cancel_delivery(request: Request, form: FormData, identity: Identity) -> Response:
    """Without ``confirmed=yes``, a page asking to confirm; with it, the delivery is
    cancelled (``bus.retry_queue.cancel``). A retry, or a delivery whose handler
    runs now, is refused (409) either way."""
    bus = state(request).bus
    item_id = request.path_params["item_id"]
    missing = HTTPError(
        404, "No such retry item", f"no item in the retry queue has the id {item_id!r}"
    )
    try:
        item = await bus.retry_queue.get(item_id)
        if _text(form, "confirmed") != "yes":
            check_cancellable(item, bus.clock.now())
            context = {
                "item": item,
                "kind": item.kind(bus.clock.now()),
                "back": _text(form, "back"),
            }
            return render(request, "confirm_cancel.html", context, identity=identity)
        cancelled = await bus.retry_queue.cancel(item_id, actor=identity.name)
    except ItemNotFound:
        raise missing from None
    except NotCancellable as exc:
        raise HTTPError(409, "Cannot cancel", str(exc)) from None
    pairs = parse_qsl(_text(form, "back"), keep_blank_values=False)
    response = redirect(request, "/retry-queue", {k: v for k, v in pairs if k in RETRY_LIST_KEYS})
    return flash(
        request,
        response,
        "ok",
        f"Cancelled {item_id}: {cancelled.event_type} to {cancelled.handler_name} "
        "will not be delivered.",
    )
