"""What a circuit breaker's bookkeeping costs a handler call: the hot path
(a closed breaker counting a success, and a retryable failure below the
threshold), measured on the breaker alone, with the system clock.

Figures:
  breakers_success_bookkeeping   µs per call: a closed breaker counts a success
  breakers_failure_bookkeeping   µs per call: it counts a failure (not tripping)
  breakers_call_overhead         µs per call: ``Subscription.call`` of an async
                                 handler with a closed breaker, minus without
  breakers_worker_sqlite_none    items/s: a worker (``RetryWorker.run_once`` in a
                                 loop) drains 5,000 due items of a SQLite file,
                                 their handler without a breaker
  breakers_worker_sqlite_closed  items/s: the same, the handler behind a closed breaker
  breakers_worker_sqlite_difference
                                 %: closed against none (negative: slower), the
                                 median of the rounds' differences
  breakers_worker_sqlite_cpu_difference
                                 %: the same in items per CPU-second of this
                                 process (what other processes' load leaves out)
  breakers_worker_memory_none, breakers_worker_memory_closed,
  breakers_worker_memory_difference, breakers_worker_memory_cpu_difference
                                 the same on the memory store

The worker runs are interleaved in this process (none, closed; then closed,
none; …), 9 rounds of each, so that drift favours neither; the throughputs are
the medians of the rounds.

Run alone: .venv/bin/python bench/breakers.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from _common import Figure, emit, note, quiet_logging
from worker import BATCH_SIZE, CONCURRENCY, HANDLER, seed

from retrybus import CircuitBreaker, EventBus, ExponentialBackoff, RetryWorker, open_store
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


async def drain(url: str, items: int, *, breaker: bool) -> tuple[float, float]:
    """Items per second and per CPU-second of a worker draining ``items`` due
    items of the store at ``url``, their handler behind a closed breaker or
    without one."""
    quiet_logging()
    bus = EventBus(open_store(url))

    async def handle(event: Event) -> None:
        return None

    guard = CircuitBreaker("bench-db") if breaker else None
    bus.subscribe("bench.*", handle, name=HANDLER, breaker=guard)
    try:
        await seed(bus, items)
        worker = RetryWorker(bus, batch_size=BATCH_SIZE, concurrency=CONCURRENCY)
        handled = 0
        start, cpu = time.perf_counter(), time.process_time()
        while done := await worker.run_once():
            handled += done
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        await bus.close()
    if handled != items:
        raise RuntimeError(f"the worker handled {handled} of {items} (breaker: {breaker})")
    return items / elapsed, items / cpu


def _difference(rates: dict[bool, float]) -> float:
    return (rates[True] - rates[False]) / rates[False] * 100


def worker_throughput(engine: str, items: int, rounds: int) -> list[Figure]:
    """Worker throughput on ``engine`` (``sqlite`` or ``memory``) with a closed
    breaker and without, interleaved (ABBA) over ``rounds`` rounds."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    differences, cpu_differences = [], []
    with tempfile.TemporaryDirectory(prefix="retrybus-bench-") as tmp:
        for n in range(rounds):
            order = (False, True) if n % 2 == 0 else (True, False)
            got, got_cpu = {}, {}
            for breaker in order:
                url = (
                    f"sqlite:///{os.path.join(tmp, f'{n}-{breaker}.db')}"
                    if engine == "sqlite"
                    else "memory://"
                )
                got[breaker], got_cpu[breaker] = asyncio.run(drain(url, items, breaker=breaker))
                rates[breaker].append(got[breaker])
            differences.append(_difference(got))
            cpu_differences.append(_difference(got_cpu))
    none, closed = statistics.median(rates[False]), statistics.median(rates[True])
    difference = statistics.median(differences)
    note(
        f"worker {engine}, {items} items: none {[round(r) for r in rates[False]]}, "
        f"closed {[round(r) for r in rates[True]]} items/s; differences "
        f"{[round(d, 1) for d in differences]} %, per CPU-second "
        f"{[round(d, 1) for d in cpu_differences]} %"
    )
    name = f"breakers_worker_{engine}"
    return [
        Figure(f"{name}_none", none, "items/s"),
        Figure(f"{name}_closed", closed, "items/s"),
        Figure(f"{name}_difference", difference, "%"),
        Figure(f"{name}_cpu_difference", statistics.median(cpu_differences), "%"),
    ]


def run() -> list[Figure]:
    """The figures at full size (``bench/run.py``)."""
    return figures(200_000, 7, 5_000, 9)


def figures(calls: int, rounds: int, items: int, worker_rounds: int) -> list[Figure]:
    """Every figure of this module."""
    return [
        *measure(calls, rounds),
        *worker_throughput("sqlite", items, worker_rounds),
        *worker_throughput("memory", items, worker_rounds),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to try it out")
    options = parser.parse_args()
    if options.quick:
        emit(figures(2_000, 3, 500, 2))
    else:
        emit(run())


if __name__ == "__main__":
    main()
