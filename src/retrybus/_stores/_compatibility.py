"""Rolling upgrades: which releases may keep using a store a later release migrated.

Every engine records, beside its schema (or key layout) version, the oldest
version whose code can still read and write a store at that version: its
"compatible from", one per version, written by the release that brought the
store to it. A release that finds its store at a later version than it knows
runs on it unchanged (no step of its own migration, no back-fill) when that
version is compatible from its own version or an earlier one, and refuses the
store (``StoreUnusable``) otherwise, or when the later version records nothing.

A migration that only adds (a table, a column with a default, an index, keys
older code never reads) keeps ``COMPATIBLE_FROM``; one that older code would
misread or break moves it to the new version, and its release notes say to stop
the older workers before migrating.

Releases from before this check (schema 6 on SQLite, 7 on PostgreSQL) do not
read the record: the SQLite one refuses any later version, the others run on it.
"""

from __future__ import annotations

from .._errors import StoreUnusable

__all__ = ["check_later_version", "compatible_from"]


def compatible_from(declared: int, version: int) -> int:
    """What a store at ``version`` records as its compatible-from: ``declared`` (the
    engine's ``COMPATIBLE_FROM``), never above the version itself."""
    return min(declared, version)


def check_later_version(what: str, found: int, known: int, recorded: int | None) -> None:
    """Refuse a store at ``found``, a later version than this release's ``known``,
    unless the version ``recorded`` as its compatible-from is ``known`` or earlier.
    ``what`` names the store in the message (``SQLite store sqlite:///x.db``)."""
    if recorded is not None and recorded <= known:
        return
    needs = (
        "records no older version that can use it"
        if recorded is None
        else f"can be used by retrybus of schema version {recorded} or later"
    )
    raise StoreUnusable(
        f"{what} has schema version {found}, newer than this retrybus knows ({known}), "
        f"and {needs}: upgrade retrybus to use it"
    )
