"""``retrybus migrate``: create or upgrade a store's tables now, and show its schema version.

Every store migrates itself on first use; this command does it ahead of time (for
example in a deployment step, before workers start) and reports the version.
An engine that keeps a versioned schema has ``async migrate() -> int``; the
SQLite store records its version in ``PRAGMA user_version``.
"""

from __future__ import annotations

import sqlite3

import typer

from .._stores import Store
from .._stores.sqlite import SQLiteStore
from .common import JsonOption, StoreOption, run
from .output import echo_json
from .session import EXIT_USAGE, CliError, open_store_url

__all__ = ["migrate"]


async def schema_version(store: Store) -> int | None:
    """Connect ``store`` (which runs its migration) and return its schema version
    (None for an engine without a schema, such as ``memory://``)."""
    migrate_now = getattr(store, "migrate", None)
    if migrate_now is not None:
        return int(await migrate_now())
    await store.connect()
    if isinstance(store, SQLiteStore):

        def user_version(conn: sqlite3.Connection) -> int:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

        return await store._read(user_version)
    return None


def migrate(store: StoreOption = None, json: JsonOption = False) -> None:
    """Create or upgrade the tables of the store at --store URL and print its schema version."""
    if store is None:
        raise CliError("give --store URL (or set RETRYBUS_STORE)", EXIT_USAGE)
    url = store

    async def main() -> None:
        opened = open_store_url(url)
        try:
            version = await schema_version(opened)
        finally:
            await opened.close()
        if json:
            echo_json({"store": opened.url, "schema_version": version})
        elif version is None:
            typer.echo(f"{opened.url}: nothing to migrate (this engine keeps no schema)")
        else:
            typer.echo(f"{opened.url}: schema version {version}")

    run(main())
