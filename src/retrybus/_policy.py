"""Retry policies: when to retry a failed delivery and how long to wait first."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from ._errors import PermanentError

__all__ = ["ExponentialBackoff", "FixedDelay", "LinearBackoff", "RetryPolicy"]

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


@runtime_checkable
class RetryPolicy(Protocol):
    """What the bus and the worker ask of a policy.

    ``attempt`` counts retries from 1: after the first failure the bus asks
    ``should_retry(error, 1)`` and waits ``delay(1)`` before retry 1. A policy
    may also have ``max_elapsed`` (seconds since the first failure after which
    the delivery is dead-lettered); without it there is no time budget.
    """

    @property
    def max_retries(self) -> int: ...

    def should_retry(self, error: BaseException, attempt: int) -> bool: ...

    def delay(self, attempt: int) -> float: ...


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _as_exception_tuple(
    name: str, value: ExceptionTypes | Iterable[type[BaseException]] | None
) -> tuple[type[BaseException], ...]:
    if value is None:
        return ()
    classes = (value,) if isinstance(value, type) else tuple(value)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{name} must hold exception classes, got {cls!r}")
    return classes


class _BasePolicy:
    """What the three policies share: the retry budget and which errors to retry."""

    __slots__ = ("_give_up_on", "_max_retries", "_retry_on", "max_elapsed")

    def __init__(
        self,
        max_retries: int,
        retry_on: ExceptionTypes | Iterable[type[BaseException]] | None,
        give_up_on: ExceptionTypes | Iterable[type[BaseException]] | None,
        max_elapsed: float | None,
    ) -> None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int):
            raise TypeError(f"max_retries must be an int, got {max_retries!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        self._max_retries = max_retries
        # by default every failure: a handler's stray CancelledError is retried too
        self._retry_on = _as_exception_tuple("retry_on", retry_on) or (BaseException,)
        self._give_up_on = _as_exception_tuple("give_up_on", give_up_on)
        self.max_elapsed = (
            None if max_elapsed is None else _check_non_negative("max_elapsed", max_elapsed)
        )

    @property
    def max_retries(self) -> int:
        """How many retries follow the first failure (so at most ``max_retries + 1`` calls)."""
        return self._max_retries

    def is_retryable(self, error: BaseException) -> bool:
        """Whether this kind of error is worth retrying at all."""
        if isinstance(error, (PermanentError, *self._give_up_on)):
            return False
        return isinstance(error, self._retry_on)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Retry number ``attempt`` (from 1) is allowed for ``error``."""
        return 1 <= attempt <= self._max_retries and self.is_retryable(error)

    def _fields(self) -> str:
        return f"max_retries={self._max_retries}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields()})"


class ExponentialBackoff(_BasePolicy):
    """Delays that grow by ``multiplier`` each retry (1 s → 2 s → 4 s …), capped at
    ``max_delay``, each moved by up to ±``randomization`` so that clients that
    failed together do not retry together.
    """

    __slots__ = ("initial_delay", "max_delay", "multiplier", "randomization")

    def __init__(
        self,
        max_retries: int = 3,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        multiplier: float = 2.0,
        randomization: float = 0.1,
        *,
        retry_on: ExceptionTypes | Iterable[type[BaseException]] | None = None,
        give_up_on: ExceptionTypes | Iterable[type[BaseException]] | None = None,
        max_elapsed: float | None = None,
    ) -> None:
        super().__init__(max_retries, retry_on, give_up_on, max_elapsed)
        self.initial_delay = _check_non_negative("initial_delay", initial_delay)
        self.max_delay = _check_non_negative("max_delay", max_delay)
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"max_delay ({max_delay!r}) must be >= initial_delay ({initial_delay!r})"
            )
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, int | float)
            or not math.isfinite(multiplier)
            or multiplier < 1
        ):
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        self.multiplier = float(multiplier)
        if (
            isinstance(randomization, bool)
            or not isinstance(randomization, int | float)
            or not 0 <= randomization <= 1
        ):
            raise ValueError(f"randomization must be within [0, 1], got {randomization!r}")
        self.randomization = float(randomization)

    def base_delay(self, attempt: int) -> float:
        """The delay before jitter: ``initial_delay * multiplier ** (attempt - 1)``, capped."""
        exponent = max(attempt, 1) - 1
        try:
            raw = self.initial_delay * self.multiplier**exponent
        except OverflowError:
            return self.max_delay
        return min(raw, self.max_delay)

    def delay(self, attempt: int) -> float:
        base = self.base_delay(attempt)
        if self.randomization == 0 or base == 0:
            return base
        jitter = base * self.randomization
        return max(0.0, base + random.uniform(-jitter, jitter))

    def _fields(self) -> str:
        return (
            f"max_retries={self._max_retries}, initial_delay={self.initial_delay:g}, "
            f"max_delay={self.max_delay:g}, multiplier={self.multiplier:g}, "
            f"randomization={self.randomization:g}"
        )


class FixedDelay(_BasePolicy):
    """The same delay before every retry."""

    __slots__ = ("_delay",)

    def __init__(
        self,
        max_retries: int = 3,
        delay: float = 1.0,
        *,
        retry_on: ExceptionTypes | Iterable[type[BaseException]] | None = None,
        give_up_on: ExceptionTypes | Iterable[type[BaseException]] | None = None,
        max_elapsed: float | None = None,
    ) -> None:
        super().__init__(max_retries, retry_on, give_up_on, max_elapsed)
        self._delay = _check_non_negative("delay", delay)

    def delay(self, attempt: int) -> float:
        return self._delay

    def _fields(self) -> str:
        return f"max_retries={self._max_retries}, delay={self._delay:g}"


class LinearBackoff(_BasePolicy):
    """Delays that grow by ``increment`` each retry (1 s → 2 s → 3 s …), capped at ``max_delay``."""

    __slots__ = ("increment", "initial_delay", "max_delay")

    def __init__(
        self,
        max_retries: int = 3,
        initial_delay: float = 1.0,
        increment: float = 1.0,
        max_delay: float = 60.0,
        *,
        retry_on: ExceptionTypes | Iterable[type[BaseException]] | None = None,
        give_up_on: ExceptionTypes | Iterable[type[BaseException]] | None = None,
        max_elapsed: float | None = None,
    ) -> None:
        super().__init__(max_retries, retry_on, give_up_on, max_elapsed)
        self.initial_delay = _check_non_negative("initial_delay", initial_delay)
        self.increment = _check_non_negative("increment", increment)
        self.max_delay = _check_non_negative("max_delay", max_delay)
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"max_delay ({max_delay!r}) must be >= initial_delay ({initial_delay!r})"
            )

    def delay(self, attempt: int) -> float:
        return min(self.initial_delay + (max(attempt, 1) - 1) * self.increment, self.max_delay)

    def _fields(self) -> str:
        return (
            f"max_retries={self._max_retries}, initial_delay={self.initial_delay:g}, "
            f"increment={self.increment:g}, max_delay={self.max_delay:g}"
        )
