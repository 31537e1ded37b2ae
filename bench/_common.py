"""Shared helpers of the benchmarks: figures, percentiles, quiet logging."""

from __future__ import annotations

import logging
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure, printed as ``NAME VALUE UNIT``."""

    name: str
    value: float
    unit: str

    def line(self) -> str:
        if self.unit in {"events/s", "items/s"}:
            text = f"{self.value:.0f}"
        elif abs(self.value) >= 100:
            text = f"{self.value:.1f}"
        else:
            text = f"{self.value:.4f}".rstrip("0").rstrip(".") or "0"
        return f"{self.name} {text} {self.unit}"


def emit(figures: Iterable[Figure]) -> None:
    """Print each figure on a line of its own on stdout."""
    for figure in figures:
        print(figure.line(), flush=True)


def note(message: str) -> None:
    """Anything that is not a figure goes to stderr."""
    print(message, file=sys.stderr, flush=True)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in [0, 1]) of ``samples``."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def quiet_logging() -> None:
    """Give retrybus's loggers a NullHandler: log records are still built (that is
    library cost), but nothing is written and the last-resort stderr handler stays out."""
    logging.getLogger("retrybus").addHandler(logging.NullHandler())
    logging.getLogger("retrybus").propagate = False
