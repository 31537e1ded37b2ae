"""What a circuit breaker's bookkeeping costs a handler call: the hot path
(a closed breaker counting a success, and a retryable failure below the
threshold), measured on the breaker alone, with the system clock.

Figures:
  breakers_success_bookkeeping   µs per call: a closed breaker counts a success
  breakers_failure_bookkeeping   µs per call: it counts a failure (not tripping)
  breakers_call_overhead         µs per call: ``Subscription.call`` of an async
                                 handler with a closed breaker, minus without

Run alone: .venv/bin/python bench/breakers.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _common import Figure, emit

from retrybus import CircuitBreaker, EventBus, ExponentialBackoff
from retrybus._event import Event


def _per_call(run: object, calls: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(calls)  # type: ignore[operator]
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def measure(calls: int, rounds: int) -> list[Figure]:
    bus = EventBus()
    # never trips: a failure ratio of 1 with more calls than the loop makes
    breaker = CircuitBreaker("db", failure_ratio=1.0, min_calls=10**9)
    shared = bus.breakers.add(breaker)
    policy = ExponentialBackoff()
    error = ConnectionError("down")

    def successes(n: int) -> None:
        succeeded = shared.succeeded
        for _ in range(n):
            succeeded()

    def failures(n: int) -> None:
        failed = shared.failed
        for _ in range(n):
            failed(error, policy)

    async def handler(event: Event) -> None:
        return None

    plain = bus.subscribe("x", handler, name="plain")
    guarded = bus.subscribe("x", handler, name="guarded", breaker="db")
    event = Event("x", {})

    async def calls_of(subscription: object, n: int) -> float:
        call = subscription.call  # type: ignore[attr-defined]
        start = time.perf_counter()
        for _ in range(n):
            await call(event)
        return (time.perf_counter() - start) / n * 1e6

    async def overhead() -> float:
        differences = []
        for _ in range(rounds):
            without = await calls_of(plain, calls)
            with_breaker = await calls_of(guarded, calls)
            differences.append(with_breaker - without)
        return statistics.median(differences)

    return [
        Figure("breakers_success_bookkeeping", _per_call(successes, calls, rounds), "µs"),
        Figure("breakers_failure_bookkeeping", _per_call(failures, calls, rounds), "µs"),
        Figure("breakers_call_overhead", asyncio.run(overhead()), "µs"),
    ]


def run() -> list[Figure]:
    """The figures at full size (``bench/run.py``)."""
    return measure(200_000, 7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to try it out")
    options = parser.parse_args()
    calls, rounds = (2_000, 3) if options.quick else (200_000, 7)
    emit(measure(calls, rounds))


if __name__ == "__main__":
    main()
