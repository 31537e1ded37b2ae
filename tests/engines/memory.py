"""The memory engine: a store in this process, gone when it closes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from retrybus import open_store
from retrybus._stores.memory import MemoryStore

from ._common import Features

FEATURES = Features(
    on_a_server=False,
    survives_reopen=False,
    can_corrupt_records=False,  # it keeps the records themselves, never encoded
    has_url_with_password=False,
    can_be_unreachable=False,
    shared_across_processes=False,
)

MALFORMED_URLS = [
    ("memory://somewhere", "use exactly 'memory://'"),
    ("memory://?size=10", "use exactly 'memory://'"),
]


@asynccontextmanager
async def open_test_store() -> AsyncIterator[MemoryStore]:
    async with open_store("memory://") as store:
        assert isinstance(store, MemoryStore)
        yield store
