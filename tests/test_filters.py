"""DeadLetterFilter: parsing text, JSON round trips, and what it matches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from retrybus import DeadLetterFilter

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_parse_reads_every_key_and_alias() -> None:
    where = DeadLetterFilter.parse(
        {
            "type": "like.added",
            "handler": "Mailer",
            "reason": "failed after 3 retries",
            "processed": "false",
            "since": "2h",
            "until": "2026-12-01T11:30:00Z",
            "event_id": "e-1",
            "group": "grp_0123456789abcdef",
        },
        NOW,
    )
    assert where == DeadLetterFilter(
        event_type="like.added",
        handler_name="Mailer",
        reason="failed after 3 retries",
        processed=False,
        created_after=NOW - timedelta(hours=2),
        created_before=datetime(2026, 12, 1, 11, 30, tzinfo=UTC),
        event_id="e-1",
        failure_group="grp_0123456789abcdef",
    )
    assert DeadLetterFilter.parse(where.to_query(), NOW) == where


def test_a_time_without_a_zone_is_utc() -> None:
    where = DeadLetterFilter.parse({"since": "2026-12-01T10:00:00"}, NOW)
    assert where.created_after == datetime(2026, 12, 1, 10, tzinfo=UTC)


def test_empty_values_are_ignored_as_a_form_leaves_them() -> None:
    assert DeadLetterFilter.parse({"handler": "", "type": " "}, NOW).is_empty


@pytest.mark.parametrize(
    ("pairs", "says"),
    [
        ({"colour": "red"}, "unknown filter 'colour'"),
        ({"processed": "maybe"}, "true or false"),
        ({"since": "yesterday"}, "not a time: 'yesterday'"),
        ({"since": "100000000d"}, "past the calendar"),
    ],
)
def test_bad_text_is_a_clear_error(pairs: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        DeadLetterFilter.parse(pairs, NOW)


def test_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="handler_name"):
        DeadLetterFilter(handler_name="")
    with pytest.raises(ValueError, match="timezone-aware"):
        DeadLetterFilter(created_after=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="processed"):
        DeadLetterFilter(processed="yes")  # type: ignore[arg-type]


def test_from_dict_reads_naive_stored_times_as_utc() -> None:
    where = DeadLetterFilter.from_dict({"created_before": "2026-12-01T10:00:00"})
    assert where.created_before == datetime(2026, 12, 1, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="'colour'"):
        DeadLetterFilter.from_dict({"colour": "red"})


def test_narrowed_only_moves_the_end_earlier() -> None:
    where = DeadLetterFilter(created_before=NOW)
    assert where.narrowed(created_before=NOW + timedelta(1)).created_before == NOW
    assert where.narrowed(created_before=NOW - timedelta(1)).created_before == NOW - timedelta(1)
