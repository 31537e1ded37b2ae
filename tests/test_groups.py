"""Message shapes and failure group keys."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrybus import failure_group_key, message_shape


@pytest.mark.parametrize(
    ("message", "shape"),
    [
        ("connection timeout", "connection timeout"),
        ("order 8812 not found (id 'a1f3')", "order <n> not found (id '<str>')"),
        ("can't reach 'db1'", "can't reach '<str>'"),
        ("don't retry; won't work", "don't retry; won't work"),
        ('say "hi" now', 'say "<str>" now'),
        ("user 3f2a9c1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f missing", "user <uuid> missing"),
        ("at 2026-12-01T10:00:00+00:00 disk 93% full", "at <time> disk <n>% full"),
        ("smtp 10.0.0.3:25 refused", "smtp <ip> refused"),
        ("retry_0192ab34cd56ef7890ab12 gone", "<id> gone"),
        ("error code E1234", "error code E1234"),
        ("v1.2.3 broke", "v1.2.3 broke"),
        ("  spaced\n\tout  ", "spaced out"),
        ("", ""),
    ],
)
def test_message_shape_replaces_what_varies(message: str, shape: str) -> None:
    assert message_shape(message) == shape


def test_only_the_start_of_a_long_message_counts() -> None:
    long = "x" * 100_000
    assert message_shape(long) == message_shape(long + " tail 12")
    assert len(message_shape(long)) <= 200


def test_the_group_key_depends_on_handler_type_and_shape() -> None:
    key = failure_group_key("Mailer", "ConnectionError", "smtp 10.0.0.3:25 refused")
    assert key == failure_group_key("Mailer", "ConnectionError", "smtp 10.9.9.9:25 refused")
    assert key.startswith("grp_")
    assert len(key) == 20
    assert key != failure_group_key("Other", "ConnectionError", "smtp 10.0.0.3:25 refused")
    assert key != failure_group_key("Mailer", "TimeoutError", "smtp 10.0.0.3:25 refused")


@given(st.text(max_size=300))
def test_a_shape_is_its_own_shape(message: str) -> None:
    shape = message_shape(message)
    assert len(shape) <= 200
    assert message_shape(shape) == shape


UNKNOWN_VERSION = "retrybus._errors.UnknownVersion"


def test_an_unknown_version_keeps_its_stored_version_in_the_shape() -> None:
    four = "unknown version 4 of like.added (this code knows up to 3)"
    five = "unknown version 5 of like.added (this code knows up to 3)"
    assert message_shape(four, UNKNOWN_VERSION) == (
        "unknown version 4 of like.added (this code knows up to <n>)"
    )
    assert failure_group_key("Count", UNKNOWN_VERSION, four) != failure_group_key(
        "Count", UNKNOWN_VERSION, five
    )
    assert failure_group_key("Count", UNKNOWN_VERSION, five) == failure_group_key(
        "Count", UNKNOWN_VERSION, "unknown version 5 of like.added (this code knows up to 4)"
    )
    not_a_number = "unknown version 'x1' of like.added (not a version number)"
    assert message_shape(not_a_number, UNKNOWN_VERSION) == message_shape(not_a_number)


def test_other_errors_shape_as_before() -> None:
    message = "unknown version 4 of like.added (this code knows up to 3)"
    shape = "unknown version <n> of like.added (this code knows up to <n>)"
    assert message_shape(message) == shape
    assert message_shape(message, "ValueError") == shape
    assert message_shape(message, "retrybus._errors.UpcastFailed") == shape
    # the key of a group that existed before versions is what it was
    text = "Mailer\x1fConnectionError\x1fsmtp <ip> refused"
    expected = "grp_" + hashlib.sha256(text.encode()).hexdigest()[:16]
    assert failure_group_key("Mailer", "ConnectionError", "smtp 10.0.0.3:25 refused") == expected
    upcast = "upcast failed v1→v2: KeyError 'post' (like.added)"
    assert message_shape(upcast, "retrybus._errors.UpcastFailed") == (
        "upcast failed v1→v2: KeyError '<str>' (like.added)"
    )


@given(st.text(max_size=300))
def test_an_unknown_version_shape_is_its_own_shape(tail: str) -> None:
    shape = message_shape(f"unknown version 7 of {tail}", UNKNOWN_VERSION)
    assert shape.startswith("unknown version 7 of ")
    assert len(shape) <= 200
    assert message_shape(shape, UNKNOWN_VERSION) == shape
