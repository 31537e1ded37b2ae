"""What a retry budget's bookkeeping costs: counting a first delivery, and
deciding one retry (within the budget, and over it), on the budget alone with
the system clock; and what sorting a claimed batch costs per record.

Figures:
  budget_first_delivery_bookkeeping  µs per first delivery counted
  budget_retry_bookkeeping           µs per retry let through (within the budget)
  budget_retry_success_bookkeeping   µs per retry that succeeded (no longer counted)
  budget_refused_retry_bookkeeping   µs per retry refused (over the budget)
  budget_sort_claimed                µs per claimed record sorted (half of them
                                     retries, half of those refused and postponed)

Run alone: .venv/bin/python bench/budget.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from _common import Figure, emit

from retrybus import RetryBudget, SystemClock
from retrybus._budget import RetryBudgets
from retrybus._records import RetryItem


def _per_call(run: Callable[[int], object], calls: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(calls)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def _item(n: int, attempt: int) -> RetryItem:
    now = datetime.now(UTC)
    return RetryItem(
        id=f"item-{n}",
        event_id=f"event-{n}",
        event_type="order.paid",
        event_data={"n": n},
        event_source="bench",
        event_timestamp=now,
        handler_name="save_order",
        error="ConnectionError: down",
        attempt=attempt,
        max_retries=3,
        next_retry=now,
        created_at=now,
        updated_at=now,
    )


def measure(calls: int, rounds: int) -> list[Figure]:
    clock = SystemClock()
    # a budget that always has room, and one that never has
    roomy = RetryBudgets(RetryBudget(percent=100, min_per_second=1e12, window=10), clock)
    full = RetryBudgets(RetryBudget(percent=0, min_per_second=1e-9, window=10), clock)
    full.try_retry("save_order")  # its one retry in the window is taken

    def first_deliveries(n: int) -> None:
        count = roomy.first_delivery
        for _ in range(n):
            count("save_order")

    def retries(n: int) -> None:
        allow = roomy.try_retry
        for _ in range(n):
            allow("save_order")

    def succeeded(n: int) -> None:
        refund = roomy.retry_succeeded
        for _ in range(n):
            refund("save_order")

    def refused(n: int) -> None:
        allow = full.try_retry
        for _ in range(n):
            allow("save_order")

    batch = [_item(n, attempt=n % 2) for n in range(100)]
    sorting = RetryBudgets(RetryBudget(percent=50, min_per_second=1e-9, window=10), clock)

    def sort_batches(n: int) -> None:
        for _ in range(n // len(batch)):
            sorting.sort_claimed(batch)

    return [
        Figure(
            "budget_first_delivery_bookkeeping", _per_call(first_deliveries, calls, rounds), "µs"
        ),
        Figure("budget_retry_bookkeeping", _per_call(retries, calls, rounds), "µs"),
        Figure("budget_retry_success_bookkeeping", _per_call(succeeded, calls, rounds), "µs"),
        Figure("budget_refused_retry_bookkeeping", _per_call(refused, calls, rounds), "µs"),
        Figure("budget_sort_claimed", _per_call(sort_batches, calls, rounds), "µs"),
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
