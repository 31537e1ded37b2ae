"""What every engine's test module shares: the capabilities it declares, and the
types of the hooks the shared checks (tests/test_conformance_engines.py) call.

An engine plugs in as ``tests/engines/<kind>.py`` with:

- ``FEATURES``: its :class:`Features`; conftest.py reads ``on_a_server`` to tell the
  server engines (a namespace of their own on a shared server) from the local ones;
- ``open_test_store()``: an async context manager yielding a connected store in a
  namespace of its own (a file, a schema, a key prefix, a database), removed afterwards;
- ``MALFORMED_URLS``: store URLs of its scheme that ``open_store`` refuses, each with
  a fragment of the message it must give;

and, as its features say, the hooks of the checks they switch on:

- ``namespace_url(store)`` (``survives_reopen``, ``shared_across_processes``): a URL
  another store, in this process or another, opens on the namespace ``store`` is in;
- ``write_undecodable_records(store, victim)`` (``can_corrupt_records``): damages the
  stored record of the retry item ``victim`` and writes more broken records, all due,
  the engine's own way (its raw client); returns an :class:`Undecodable` for each;
- ``UNREACHABLE`` (``can_be_unreachable``): a URL of a store that cannot be reached or
  opened, and the words its errors start with (before the URL);
- ``WORKER_LOAD`` (``shared_across_processes``): the :class:`WorkerLoad` of the check
  with several worker processes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest


@dataclass(frozen=True)
class Features:
    """What an engine can do, which switches the shared checks on and off."""

    on_a_server: bool
    """A server the tests share holds it, a namespace per test (else: a local engine)."""
    survives_reopen: bool
    """What a store wrote is there for a store opened on its namespace after it closed."""
    can_corrupt_records: bool
    """Its records are stored encoded, so a damaged one can be written by hand."""
    has_url_with_password: bool
    """Its URLs may carry a password, which no error or ``store.url`` may show."""
    can_be_unreachable: bool
    """A store of it can fail to connect (a server down, a file that cannot be opened)."""
    shared_across_processes: bool
    """Stores in several processes (or several in one) share one namespace's queues."""


@dataclass(frozen=True)
class Undecodable:
    """A retry record an engine's hook damaged or wrote by hand, and what the dead
    letter the worker makes of it must show beyond what every such dead letter shows
    (a reason starting with "undecodable record", the raw record in its metadata)."""

    retry_id: str
    reason_has: tuple[str, ...] = ()
    """Text the dead letter's reason contains (what was wrong)."""
    fields: Mapping[str, Any] = field(default_factory=dict)
    """Fields of the dead letter read back from what could be read of the record."""
    raw_record: Mapping[str, Any] = field(default_factory=dict)
    """Entries of the dead letter's ``metadata["raw_record"]``."""


@dataclass(frozen=True)
class WorkerLoad:
    """How the check with several worker processes loads an engine: ``items`` retry
    items, due at once, for four worker processes (tests/apps/process_worker.py, 8
    handlers at a time each) claiming ``batch_size`` at a time with leases of
    ``lease`` seconds, their handler sleeping between ``sleep_min`` and ``sleep_max``."""

    items: int
    batch_size: int
    lease: float
    sleep_min: float = 0.0
    sleep_max: float = 0.0


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip a test whose server is unreachable on a laptop; fail it in CI, which must prove it."""
    message = f"{what} is not reachable: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the engine's tests must run)")
    pytest.skip(f"{message}; start it to run these tests (see README, 'Running the tests')")


def unique_name(prefix: str = "retrybus_test") -> str:
    """A namespace for one test: a schema, a key prefix or a database name."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"
