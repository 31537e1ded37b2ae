"""Subscriptions: which handler runs for which event type, and how it is called."""

from __future__ import annotations

import asyncio
import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ._concurrency import ConcurrencyLimit, check_max_concurrency
from ._current import current_handler
from ._errors import AlreadyHandled, InvalidEventData
from ._event import Event, check_text
from ._event_types import EventTypes, describe_invalid
from ._patterns import PatternIndex
from ._policy import RetryPolicy
from ._rate import Rate, parse_rate

__all__ = ["CallGuard", "Handler", "HandlerRegistry", "Subscription", "stops_the_caller"]

#: a handler: ``handler(event)``, or ``handler(event, data)`` and ``handler(data:
#: Model)`` for the validated data of a registered type
Handler = Callable[..., Awaitable[Any]] | Callable[..., Any]


class CallGuard(Protocol):
    """What a handler's calls report to (its circuit breaker): each returns None,
    or an awaitable when the outcome changes the breaker's state (to write)."""

    def succeeded(self) -> Awaitable[object] | None: ...

    def failed(
        self, error: BaseException, policy: RetryPolicy | None
    ) -> Awaitable[object] | None: ...


def _is_async(handler: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    if isinstance(handler, functools.partial):
        return _is_async(handler.func)
    call = getattr(handler, "__call__", None)  # noqa: B004 - objects with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def stops_the_caller(error: BaseException) -> bool:
    """Whether ``error``, raised out of a handler call, must propagate rather than
    count as that delivery's failure: ``KeyboardInterrupt``, ``SystemExit``, and a
    ``CancelledError`` while the calling task is really being cancelled (a worker
    stopping, a publish cancelled). A handler's own ``CancelledError`` (a timeout
    inside it leaking one, say), or any other ``BaseException``, is a failure of
    the delivery, recorded like any other: it must not stop the worker."""
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return True
    if isinstance(error, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0
    return False


#: how a handler takes a delivery: ``handler(event)``, ``handler(event, data)``
#: (its second parameter the validated data) or ``handler(data)`` (its one
#: parameter annotated with a pydantic model)
EVENT_ONLY, EVENT_AND_DATA, DATA_ONLY = 0, 1, 2


def delivery_form(handler: Callable[..., Any]) -> tuple[int, Any]:
    """How ``handler`` takes a delivery (``EVENT_ONLY``, ``EVENT_AND_DATA`` or
    ``DATA_ONLY``) and the annotation of its data parameter (None: none)."""
    target = handler.func if isinstance(handler, functools.partial) else handler
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return EVENT_ONLY, None
    required = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(required) not in (1, 2):
        return EVENT_ONLY, None
    parameter = required[-1]
    annotation = parameter.annotation
    if isinstance(annotation, str):
        try:
            hinted = target if inspect.isroutine(target) else type(target).__call__
            hints = typing.get_type_hints(hinted)
        except Exception:
            hints = {}
        annotation = hints.get(parameter.name, annotation)
    if annotation is parameter.empty or isinstance(annotation, str):
        annotation = None
    if len(required) == 2:
        return EVENT_AND_DATA, annotation
    if isinstance(annotation, type) and annotation is not Event and _is_model(annotation):
        return DATA_ONLY, annotation
    return EVENT_ONLY, None


def _is_model(annotation: type) -> bool:
    """Whether ``annotation`` is a pydantic model (it has ``model_validate``)."""
    return callable(getattr(annotation, "model_validate", None))


def default_name(handler: Callable[..., Any]) -> str:
    """A handler's name when none is given: its qualified name."""
    target = handler.func if isinstance(handler, functools.partial) else handler
    name = getattr(target, "__qualname__", None) or getattr(type(target), "__qualname__", None)
    if not name:
        raise ValueError(f"cannot name handler {handler!r}: pass name=")
    return str(name)


@dataclass(frozen=True, slots=True)
class Subscription:
    """A handler subscribed under a unique ``name`` to one or more type patterns."""

    name: str
    patterns: tuple[str, ...]
    handler: Handler
    policy: RetryPolicy | None
    is_async: bool
    #: seconds a call may take before it fails with ``TimeoutError`` (None: the
    #: worker's default, else no limit)
    timeout: float | None = None
    #: whether the store remembers this handler's successes and skips an event
    #: it already handled (None: as the bus says, ``EventBus(inbox=)``)
    inbox: bool | None = None
    #: the bus's event types: each call reads the event as the current version
    #: of its type (None: events are handed over as stored)
    types: EventTypes | None = None
    #: how the handler takes a delivery (``delivery_form``)
    form: int = EVENT_ONLY
    #: the annotation of the handler's data parameter (None: none)
    data_annotation: Any = None
    #: the circuit breaker each call's outcome is reported to (None: none)
    breaker: CallGuard | None = None
    #: the handler's rate across every worker of its service (None: no limit):
    #: workers claim its records only as the store's token bucket allows, and a
    #: durable publish leaves its deliveries to them
    rate: Rate | None = None
    #: at most this many calls at once in this process (None: no limit)
    gate: ConcurrencyLimit | None = None

    async def call(self, event: Event, default_limit: float | None = None) -> None:
        """Run the handler on ``event``: async ones awaited, plain ones in a thread.
        Past its ``timeout`` (else ``default_limit``, seconds), an async handler is cancelled and
        a plain one left to finish in its thread; either way the call raises
        ``TimeoutError``. The handler's name is ``current_handler`` during the
        call (``bus.inbox.claim`` reads it), and ``AlreadyHandled`` out of the
        handler is a success.

        ``event`` must be the call's own (its data is upcast in place): with
        event types registered it is read as the current version of its type
        first, and a ``VersionError`` (an upcaster raising, an unknown version,
        data failing the schema) is the call's failure, the handler not run.
        The outcome is reported to the handler's ``breaker``, if any. With a
        ``gate`` (``max_concurrency``) the call first waits for a free slot."""
        # one coroutine, no inner one: this runs for every delivery
        gate = self.gate
        if gate is not None and not gate.try_enter():
            await gate.wait_enter()
        token = current_handler.set(self.name)
        try:
            types = self.types
            if types is not None and types.active:
                event = types.delivered(event)
            arguments = (event,) if self.form == EVENT_ONLY else self._with_data(event)
            limit = self.timeout or default_limit
            if limit is None:
                await self._run(arguments)
            else:
                try:
                    async with asyncio.timeout(limit) as scope:
                        await self._run(arguments)
                except TimeoutError:
                    if scope.expired():
                        raise TimeoutError(
                            f"handler {self.name!r} did not finish within {limit:g}s"
                        ) from None
                    raise
        except AlreadyHandled:
            # ``bus.inbox.claim`` found this delivery's effect committed before
            # (and counted the skip): the delivery succeeded
            pass
        except BaseException as exc:
            guard = self.breaker
            if guard is not None and not stops_the_caller(exc):
                sharing = guard.failed(exc, self.policy)
                if sharing is not None:
                    await sharing
            raise
        finally:
            current_handler.reset(token)
            if gate is not None:
                gate.leave()
        guard = self.breaker
        if guard is not None:
            sharing = guard.succeeded()
            if sharing is not None:
                await sharing

    def _with_data(self, event: Event) -> tuple[Any, ...]:
        """The arguments of a handler that asks for the data: the schema's
        validated model (the registered type's, else the annotation's when it
        is a pydantic model), else the data as it is."""
        types = self.types
        if types is not None and types.has_schema(event.type):
            data = types.model(event)
        elif isinstance(self.data_annotation, type) and _is_model(self.data_annotation):
            try:
                data = self.data_annotation.model_validate(event.data)  # type: ignore[attr-defined]
            except Exception as exc:
                raise InvalidEventData(
                    f"invalid {event.type} data for handler {self.name!r}: {describe_invalid(exc)}",
                    event.type,
                    event.extensions.get("dataversion", "1"),
                ) from exc
        else:
            data = event.data
        return (event, data) if self.form == EVENT_AND_DATA else (data,)

    async def _run(self, arguments: tuple[Any, ...]) -> None:
        if self.is_async:
            await self.handler(*arguments)
            return
        result = await asyncio.to_thread(self.handler, *arguments)
        if inspect.isawaitable(result):
            # a plain function that hands back a coroutine (a lambda around an
            # async call, a sync decorator on an async function): run it too
            await result


def check_timeout(name: str, value: float | None) -> float | None:
    """A handler time limit: seconds > 0, or None for none."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < float("inf")
    ):
        raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value!r}")
    return float(value)


def check_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"an event type pattern must be a non-empty string, got {pattern!r}")
    return pattern


class HandlerRegistry:
    """Handlers by name, and which of them match each event type."""

    def __init__(self, types: EventTypes | None = None) -> None:
        #: the bus's event types, which every subscription reads events by
        self.types = EventTypes() if types is None else types
        self._by_name: dict[str, Subscription] = {}
        self._index: PatternIndex[Subscription] = PatternIndex()
        #: how many subscriptions have ``inbox=True`` of their own
        self.inboxes = 0
        #: how many subscriptions have a rate or a concurrency limit
        self.limited = 0
        #: how many subscriptions have a rate (their deliveries are left to workers)
        self.rated = 0

    def add(
        self,
        patterns: str | Iterable[str],
        handler: Handler,
        *,
        name: str | None,
        policy: RetryPolicy | None,
        timeout: float | None = None,
        inbox: bool | None = None,
        breaker: CallGuard | None = None,
        rate: str | Rate | None = None,
        max_concurrency: int | None = None,
    ) -> Subscription:
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        pattern_list = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        if not pattern_list:
            raise ValueError("subscribe needs at least one event type pattern")
        pattern_list = tuple(check_pattern(p) for p in pattern_list)
        if name is None:
            name = default_name(handler)
        elif not isinstance(name, str) or not name:
            raise ValueError(f"handler name must be a non-empty string, got {name!r}")
        elif name.startswith("retrybus:"):
            raise ValueError(
                f"handler names starting with 'retrybus:' are retrybus's own: {name!r}"
            )
        check_text(name, "handler name")
        if name in self._by_name:
            raise ValueError(
                f"a handler named {name!r} is already subscribed; handler names are the key for "
                "retries and must be unique on a bus: pass name="
            )
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(
                f"policy must implement RetryPolicy (should_retry, delay, max_retries), got {policy!r}"
            )
        timeout = check_timeout("handler_timeout", timeout)
        if inbox is not None and not isinstance(inbox, bool):
            raise TypeError(f"inbox must be True, False or None, got {inbox!r}")
        parsed_rate = None if rate is None else parse_rate(rate)
        limit = check_max_concurrency(max_concurrency)
        form, annotation = delivery_form(handler)
        subscription = Subscription(
            name,
            pattern_list,
            handler,
            policy,
            _is_async(handler),
            timeout,
            inbox,
            self.types,
            form,
            annotation,
            breaker,
            parsed_rate,
            None if limit is None else ConcurrencyLimit(limit),
        )
        self._by_name[name] = subscription
        self._index.add(name, pattern_list, subscription)
        if inbox:
            self.inboxes += 1
        if subscription.rate is not None or subscription.gate is not None:
            self.limited += 1
        if subscription.rate is not None:
            self.rated += 1
        return subscription

    def remove(self, name: str) -> Subscription | None:
        subscription = self._by_name.pop(name, None)
        if subscription is not None:
            self._index.remove(name)
            if subscription.inbox:
                self.inboxes -= 1
            if subscription.rate is not None or subscription.gate is not None:
                self.limited -= 1
            if subscription.rate is not None:
                self.rated -= 1
        return subscription

    def get(self, name: str) -> Subscription | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def subscriptions(self) -> list[Subscription]:
        """Every subscription, in subscription order."""
        return list(self._by_name.values())

    def match(self, event_type: str) -> tuple[Subscription, ...]:
        """The subscriptions for ``event_type``, each once, in subscription order;
        for an alias of a registered type, those of the type as well."""
        found = self._index.match(event_type)
        if self.types.active:
            canonical = self.types.canonical(event_type)
            if canonical is not None:
                more = self._index.match(canonical)
                found = (*found, *(s for s in more if s not in found))
        return found
