"""The shop of the outbox chaos test (tests/test_outbox_chaos.py), for
``retrybus worker tests.apps.outbox_app:bus``: service ``shop``, one handler,
``fulfil``, whose effect is a row of the application database's ``effects``
table, written in one transaction with its inbox claim, so that it exists once
per event however often the event is delivered.

``OUTBOX_APP_DB`` is the application database (``postgresql://…`` or
``sqlite:///path``); ``OUTBOX_STORE`` the store's URL.
"""

from __future__ import annotations

import asyncio
import os

import aiosqlite
import asyncpg  # type: ignore[import-untyped]

from retrybus import Event, EventBus, FixedDelay, open_store

ORDER = "order.placed"
APP_DB = os.environ.get("OUTBOX_APP_DB", "sqlite:///app.db")

bus = EventBus(
    open_store(os.environ.get("OUTBOX_STORE", "sqlite:///bus.db")),
    service="shop",
    default_policy=FixedDelay(max_retries=20, delay=0.1),
    max_claims=10,  # the test kills workers: a delivery may be cut off more than thrice
)
_pool: asyncpg.Pool | None = None


async def _effect_postgresql(event: Event) -> None:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(APP_DB, min_size=1, max_size=4)
    async with (
        _pool.acquire() as conn,
        conn.transaction(),
        bus.inbox.claim(event, connection=conn),
    ):
        await conn.execute("INSERT INTO effects (order_id) VALUES ($1)", event.data["order"])


async def _effect_sqlite(event: Event) -> None:
    async with aiosqlite.connect(APP_DB.removeprefix("sqlite:///"), timeout=30) as conn:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            async with bus.inbox.claim(event, connection=conn):
                await conn.execute(
                    "INSERT INTO effects (order_id) VALUES (?)", (event.data["order"],)
                )
        except BaseException:
            await conn.rollback()
            raise
        await conn.commit()


@bus.handler(ORDER, name="fulfil")
async def fulfil(event: Event) -> None:
    if APP_DB.startswith("sqlite"):
        await _effect_sqlite(event)
    else:
        await _effect_postgresql(event)
    # more work after the effect committed: a worker killed now has made the
    # effect without its success being written, and the delivery runs again
    await asyncio.sleep(0.05)
