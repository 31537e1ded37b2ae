"""``retrybus migrate``: create or upgrade a store's tables now, and show its
schema version; with ``--outbox URL``, create the ``retrybus_outbox`` and
``retrybus_inbox`` tables of an application's database.

Every store migrates itself on first use, and the outbox table is created on
first use too; this command does it ahead of time (for example in a deployment
step, before workers start) and reports the version (``Store.migrate``; None for
an engine that keeps no versioned schema).
"""

from __future__ import annotations

import typer

from .._outbox import open_outbox_database
from .common import JsonOption, OutboxOption, StoreOption, fail, run
from .output import echo_json
from .session import EXIT_USAGE, CliError, open_store_url

__all__ = ["migrate"]


def migrate(
    store: StoreOption = None, outbox: OutboxOption = None, json: JsonOption = False
) -> None:
    """Create or upgrade the tables of the store at --store URL and print its schema
    version; with --outbox URL, create the retrybus_outbox and retrybus_inbox tables
    there too."""
    if store is None and outbox is None:
        fail("give --store URL (or set RETRYBUS_STORE), or --outbox URL", EXIT_USAGE)

    async def main() -> None:
        report: dict[str, object] = {}
        if store is not None:
            opened = open_store_url(store)
            try:
                version = await opened.migrate()
            finally:
                await opened.close()
            report.update(store=opened.url, schema_version=version)
            if json:
                ...  # printed below, with the outbox
            elif version is None:
                typer.echo(f"{opened.url}: nothing to migrate (this engine keeps no schema)")
            else:
                typer.echo(f"{opened.url}: schema version {version}")
        if outbox is not None:
            try:
                database = open_outbox_database(outbox)
            except ValueError as exc:
                raise CliError(f"--outbox: {exc}", EXIT_USAGE) from None
            try:
                await database.create()
            finally:
                await database.close()
            report["outbox"] = database.url
            if not json:
                typer.echo(f"{database.url}: retrybus_outbox and retrybus_inbox tables ready")
        if json:
            echo_json(report)

    run(main())
