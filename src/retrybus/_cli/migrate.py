"""``retrybus migrate``: create or upgrade a store's tables now, and show its schema version.

Every store migrates itself on first use; this command does it ahead of time (for
example in a deployment step, before workers start) and reports the version
(``Store.migrate``; None for an engine that keeps no versioned schema).
"""

from __future__ import annotations

import typer

from .common import JsonOption, StoreOption, run
from .output import echo_json
from .session import EXIT_USAGE, CliError, open_store_url

__all__ = ["migrate"]


def migrate(store: StoreOption = None, json: JsonOption = False) -> None:
    """Create or upgrade the tables of the store at --store URL and print its schema version."""
    if store is None:
        raise CliError("give --store URL (or set RETRYBUS_STORE)", EXIT_USAGE)
    url = store

    async def main() -> None:
        opened = open_store_url(url)
        try:
            version = await opened.migrate()
        finally:
            await opened.close()
        if json:
            echo_json({"store": opened.url, "schema_version": version})
        elif version is None:
            typer.echo(f"{opened.url}: nothing to migrate (this engine keeps no schema)")
        else:
            typer.echo(f"{opened.url}: schema version {version}")

    run(main())
