"""Every engine keeps every string ``Event()`` accepts and gives it back
unchanged; ``Event()`` refuses what no engine can keep, naming the field; what
a failure records (its message, a reason) is always storable; and a store's
error about the data is never reported as an outage."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import retrybus
from conftest import STORE_KINDS, fresh_store
from retrybus import (
    DeadLetterFilter,
    Event,
    EventBus,
    RecordRejected,
    RetryWorker,
    Store,
    StoreUnavailable,
    StoreUnusable,
)
from retrybus._event import printable

FORBIDDEN_IN_ATTRIBUTES = re.compile("[\x00\ud800-\udfff]")
SURROGATE = re.compile("[\ud800-\udfff]")

# any code point, surrogates and control characters included, with the awkward
# ones made likely
any_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
    st.sampled_from(["\x00", "a\x00b", "\udc80", "x\ud800y", "😀", "$a.b", "\x1f\t\n", "e\u0301"]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)


def event_or_refusal(
    type_: str, source: str, subject: str, extension: str, data: Any
) -> Event | None:
    """The event, or None when ``Event()`` refused it, checking that it refuses
    exactly what no store keeps."""
    attributes = {"type": type_ or "t", "source": source, "subject": subject, "ext": extension}
    unkeepable = [
        name for name, value in attributes.items() if FORBIDDEN_IN_ATTRIBUTES.search(value)
    ]
    data_text = json.dumps(data, ensure_ascii=False)
    if SURROGATE.search(data_text):
        unkeepable.append("data")
    try:
        event = Event(
            type_ or "t",
            data,
            source=source,
            subject=subject,
            extensions={"ext": extension},
        )
    except ValueError as exc:
        refusal = str(exc)
    else:
        refusal = None
    if refusal is not None:
        assert unkeepable, f"refused an event every store keeps: {refusal}"
        named = {
            "type": "Event type",
            "source": "Event source",
            "subject": "Event subject",
            "ext": "extension 'ext'",
            "data": "data of event",
        }
        assert any(named[name] in refusal for name in unkeepable), refusal
        return None
    assert not unkeepable, f"accepted {unkeepable} that a store cannot keep"
    return event


async def round_trip(store: Store, event: Event, message: str) -> None:
    bus = EventBus(store)
    error = printable(message) or "RuntimeError"  # an empty message: the class name
    item = await bus.retry_queue.add(event, "handler", RuntimeError(message))
    back = await bus.retry_queue.get(item.id)
    assert back.to_event() == event
    assert back.event_data == json.loads(event.data_json)
    assert back.error == error
    dead = await bus.retry_queue.mark_failed(back, reason=f"given up: {message}")
    assert dead is not None
    kept = await bus.dead_letters.get(dead.id)
    assert kept.to_event() == event
    assert kept.error == error
    assert kept.reason == printable(f"given up: {message}")
    found = await bus.dead_letters.list(event_type=event.type, event_id=event.id)
    assert [d.id for d in found] == [dead.id]


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_every_engine_keeps_every_string_an_event_accepts(kind: str, tmp_path: Path) -> None:
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        type_=any_text,
        source=any_text,
        subject=any_text,
        extension=any_text,
        data=json_values,
        message=any_text,
    )
    def check(
        type_: str, source: str, subject: str, extension: str, data: Any, message: str
    ) -> None:
        event = event_or_refusal(type_, source, subject, extension, data)
        if event is None:
            return

        async def run() -> None:
            async with fresh_store(kind, tmp_path) as store:
                await round_trip(store, event, message)

        asyncio.run(run())

    check()


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: Event("like\x00added"), "Event type"),
        (lambda: Event("x", source="svc\udc80"), "Event source"),
        (lambda: Event("x", id="a\x00"), "Event id"),
        (lambda: Event("x", subject="\ud800"), "Event subject"),
        (lambda: Event("x", extensions={"traceid": "a\x00"}), "extension 'traceid'"),
        (lambda: Event("x", {"user": {"name": ["ok", "bad\udc80"]}}), "at ['user']['name'][1]"),
        (lambda: Event("x", {"k\udc80": 1}), "the key 'k\\udc80'"),
    ],
)
def test_event_refuses_what_no_store_can_keep_naming_the_field(build: Any, names: str) -> None:
    with pytest.raises(ValueError, match=re.escape(names)):
        build()


def test_handler_names_and_filters_refuse_nul_and_surrogates() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="handler name"):
        bus.subscribe("x", lambda event: None, name="h\x00")
    with pytest.raises(ValueError, match="event_type"):
        DeadLetterFilter(event_type="a\x00")
    with pytest.raises(ValueError, match="worker name"):
        RetryWorker(bus, name="w\udc80")


async def test_a_handler_error_with_nul_and_surrogates_is_recorded_on_every_engine(
    bus: EventBus,
) -> None:
    async def fails(event: Event) -> None:
        raise ValueError("bad byte \x00 and half a pair \udc80 here")

    bus.subscribe("x", fails, name="fails")
    result = await bus.publish(Event("x", {"text": "keeps \x00 in data"}))
    assert result.retrying == ("fails",)
    [item] = await bus.retry_queue.list()
    assert item.error == "bad byte \\x00 and half a pair \\udc80 here"
    assert item.event_data == {"text": "keeps \x00 in data"}


async def test_an_edited_payload_with_nul_is_kept_in_the_audit_trail(bus: EventBus) -> None:
    item = await bus.retry_queue.add(Event("x", {"a": "\x00"}), "h", "boom")
    dead = await bus.retry_queue.mark_failed(item, reason="failed after 3 retries")
    assert dead is not None
    retry = await bus.dead_letters.requeue(dead.id, data={"a": "fixed \x00"}, actor="alice")
    kept = await bus.retry_queue.get(retry.id)
    assert kept.event_data == {"a": "fixed \x00"}
    assert kept.metadata["edits"][0]["original_data"] == {"a": "\x00"}


async def test_a_file_that_is_not_a_database_is_a_clear_error_at_once(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    store = retrybus.open_store(f"sqlite:///{path}")
    with pytest.raises(StoreUnusable, match="not a retrybus SQLite database") as caught:
        await store.connect()
    assert not isinstance(caught.value, StoreUnavailable)
    await store.close()


async def test_a_worker_on_a_file_that_is_not_a_database_exits_1_at_once(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    path = tmp_path / "notes.db"
    path.write_bytes(b"not a database\n" * 500)
    done = await asyncio.to_thread(
        subprocess.run,
        [
            str(Path(sys.executable).parent / "retrybus"),
            "worker",
            "cli_app:bus",
            "--store",
            f"sqlite:///{path}",
            "--app-dir",
            str(Path(__file__).parent / "apps"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert "not a retrybus SQLite database" in done.stderr
    assert "store unavailable" not in done.stderr


async def test_a_sqlite_file_of_a_newer_schema_names_both_versions(tmp_path: Path) -> None:
    from retrybus._stores.sqlite import SCHEMA_VERSION

    path = tmp_path / "newer.db"
    async with retrybus.open_store(f"sqlite:///{path}") as store:
        await store.retry_count()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    store = retrybus.open_store(f"sqlite:///{path}")
    with pytest.raises(StoreUnusable) as caught:
        await store.connect()
    assert f"schema version {SCHEMA_VERSION + 1}" in str(caught.value)
    assert f"({SCHEMA_VERSION})" in str(caught.value)
    await store.close()


async def test_a_record_too_large_for_the_engine_is_rejected_not_unavailable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "small.db"
    async with retrybus.open_store(f"sqlite:///{path}") as store:
        bus = EventBus(store)
        conn = store._conn  # type: ignore[attr-defined]
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)
        with pytest.raises(RecordRejected, match="refused the data"):
            await bus.retry_queue.add(Event("x", {"blob": "x" * 20_000}), "h", "boom")
