"""What every server engine's test fixture shares."""

from __future__ import annotations

import os
import uuid
from typing import NoReturn

import pytest


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip a test whose server is unreachable on a laptop; fail it in CI, which must prove it."""
    message = f"{what} is not reachable: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the engine's tests must run)")
    pytest.skip(f"{message}; start it to run these tests (see README, 'Running the tests')")


def unique_name(prefix: str = "retrybus_test") -> str:
    """A namespace for one test: a schema, a key prefix or a database name."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"
