"""What every transport's test module shares: the capabilities it declares, and
the hooks the shared checks (tests/test_transport_protocol.py, and the
consumer-level tests/test_conformance_transport.py) call.

A transport plugs in as ``tests/transports/<kind>.py`` with:

- ``FEATURES``: its :class:`TransportFeatures`;
- ``open_test_transport()``: an async context manager yielding a connected
  transport in a namespace of its own (a stream prefix, an exchange in a test
  vhost, a JetStream stream), everything in it removed afterwards;
- ``namespace_url(transport)``: a URL another transport, in this process or
  another, opens on the same namespace;
- ``send_raw(transport, event_type, body)``: puts ``body`` on the broker with the
  raw client, where a service declared for ``event_type`` receives it;
- ``MALFORMED_URLS``: URLs of its scheme that ``open_transport`` (or the
  transport's constructor) refuses with ``ValueError``, each with a fragment of
  the message;
- ``UNREACHABLE_URL``: a URL of its scheme where no broker answers;
- ``private_broker()`` (``restartable``): a context manager yielding a
  ``tests/private_servers.PrivateServer`` of this broker, whose ``url`` is a
  transport URL of it and whose ``restart()`` restarts it on the same data.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class TransportFeatures:
    """What a transport can do, which switches the shared checks on and off."""

    persistent: bool
    """What it holds survives its process and a broker restart (memory: no)."""
    shared_across_processes: bool
    """Consumers in several processes share one service's messages."""
    restartable: bool
    """``private_broker()`` exists: the tests can restart a broker of its own."""
    has_lease: bool
    """A message held past the lease without ``extend`` goes to another consumer."""
    requeues_on_close: bool
    """A closed receiver's unacked messages come back at once (not after the lease)."""
    broker_cap: bool
    """The broker caps deliveries itself and hands the rest to ``given_up``."""
    has_url_with_password: bool
    """Its URLs may carry a password, which ``transport.url`` and errors hide."""


def all_transports() -> dict[str, ModuleType]:
    """Every transport's test module (tests/transports/<kind>.py), memory first."""
    directory = Path(__file__).parent
    stems = sorted(
        (path.stem for path in directory.glob("*.py") if not path.stem.startswith("_")),
        key=lambda stem: (stem != "memory", stem),
    )
    return {stem: importlib.import_module(f"transports.{stem}") for stem in stems}
