"""Opening a store by URL, whatever its engine. Each engine's own malformed URLs,
and a store that cannot be reached or opened: tests/test_conformance_engines.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrybus import open_store


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "non-empty"),
        ("nothing-here", "malformed store URL 'nothing-here'"),
        ("ftp://host/x", "unknown store URL scheme 'ftp'"),
    ],
)
def test_a_bad_url_raises_value_error_naming_it(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_passwords_never_appear_in_errors() -> None:
    with pytest.raises(ValueError, match="nosuch") as info:
        open_store("nosuch://user:s3cret@host/db")
    assert "s3cret" not in str(info.value)
    assert "user:***@host" in str(info.value)


def test_sqlite_paths_are_relative_with_three_slashes_and_absolute_with_four(
    tmp_path: Path,
) -> None:
    assert open_store("sqlite:///data/retrybus.db").path == "data/retrybus.db"  # type: ignore[attr-defined]
    assert open_store(f"sqlite:///{tmp_path}/r.db").path == f"{tmp_path}/r.db"  # type: ignore[attr-defined]


async def test_stores_are_async_context_managers(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/r.db") as store:
        await store.health()
    async with open_store("memory://") as store:
        await store.health()


def test_a_replica_set_url_with_several_hosts_is_accepted() -> None:
    store = open_store("mongodb://a.example:27017,b.example:27017/retrybus?replicaSet=rs0")
    assert store.url.startswith("mongodb://a.example:27017,b.example:27017/retrybus")
