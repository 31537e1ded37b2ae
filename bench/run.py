"""Run every benchmark and print each figure as ``NAME VALUE UNIT`` on stdout
(one per line; progress and details go to stderr), so that runs compare by script:

    .venv/bin/python bench/run.py > figures.txt

Figures only: nothing here asserts a target (see bench/README.md for them).
"""

from __future__ import annotations

import platform
import sqlite3
import sys
import time

import breakers
import budget
import durable
import inbox
import latency
import observability
import outbox
import postgresql
import publish
import rate
import redis_engine
import services
import versioning
import worker
from _common import emit, note


def main() -> None:
    note(
        f"retrybus bench: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{platform.machine()} {platform.system()}"
    )
    start = time.perf_counter()
    for module in (
        publish,
        latency,
        worker,
        postgresql,
        redis_engine,
        observability,
        durable,
        services,
        inbox,
        outbox,
        versioning,
        breakers,
        budget,
        rate,
    ):
        note(f"-- {module.__name__}")
        emit(module.run())
    note(f"bench done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
