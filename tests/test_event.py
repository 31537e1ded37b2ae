from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrybus import Event

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def test_event_gets_an_id_and_an_aware_utc_time_by_default() -> None:
    event = Event("like.added", {"post_id": 7})
    assert event.id
    assert event.time.tzinfo is not None
    assert event.time.utcoffset() == timedelta(0)


def test_event_is_frozen() -> None:
    event = Event("like.added")
    with pytest.raises(AttributeError):
        event.type = "other"  # type: ignore[misc]


def test_event_time_is_kept_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    event = Event("x", time=datetime(2025, 1, 7, 11, 0, tzinfo=paris))
    assert event.time == datetime(2025, 1, 7, 10, 0, tzinfo=UTC)
    assert event.time.utcoffset() == timedelta(0)


def test_to_dict_is_the_cloudevents_structured_form() -> None:
    event = Event(
        "comment.created",
        {"comment_id": 1},
        source="social-service",
        id="evt-1",
        time=datetime(2025, 1, 7, 10, 0, tzinfo=UTC),
        subject="post/7",
        extensions={"traceparent": "00-abc-def-01"},
    )
    assert event.to_dict() == {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "social-service",
        "type": "comment.created",
        "time": "2025-01-07T10:00:00.000000Z",
        "datacontenttype": "application/json",
        "subject": "post/7",
        "traceparent": "00-abc-def-01",
        "data": {"comment_id": 1},
    }


# what an attribute may hold: any text but NUL and surrogates (see test_stored_text.py)
attribute_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))


@given(
    data=json_values,
    subject=st.none() | attribute_text,
    extensions=st.dictionaries(
        st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True), attribute_text, max_size=3
    ).filter(
        lambda d: (
            not set(d)
            & {
                "id",
                "source",
                "type",
                "time",
                "data",
                "subject",
                "specversion",
                "dataschema",
                "datacontenttype",
            }
        )
    ),
)
def test_to_dict_and_from_dict_round_trip_through_json(
    data: object, subject: str | None, extensions: dict[str, str]
) -> None:
    event = Event("x.y", data, source="s", subject=subject, extensions=extensions)
    again = Event.from_dict(json.loads(json.dumps(event.to_dict())))
    assert again == event


def test_data_that_is_not_json_is_refused_naming_the_event_type() -> None:
    with pytest.raises(TypeError, match=r"like\.added"):
        Event("like.added", {"when": datetime.now(UTC)})


def test_nan_is_not_json() -> None:
    with pytest.raises(TypeError, match="JSON"):
        Event("x", float("nan"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": ""}, "type"),
        ({"type": "x", "id": ""}, "id"),
        ({"type": "x", "time": datetime(2025, 1, 1)}, "timezone-aware"),
        ({"type": "x", "extensions": {"Trace-Parent": "a"}}, "Trace-Parent"),
        ({"type": "x", "extensions": {"source": "a"}}, "source"),
        ({"type": "x", "extensions": {"n": 1}}, "'n'"),
    ],
)
def test_bad_event_arguments_raise_naming_the_value(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        Event(**kwargs)  # type: ignore[arg-type]


def test_from_dict_refuses_other_spec_versions_and_binary_data() -> None:
    with pytest.raises(ValueError, match="specversion"):
        Event.from_dict({"specversion": "0.3", "id": "1", "type": "x", "source": ""})
    with pytest.raises(ValueError, match="data_base64"):
        Event.from_dict(
            {"specversion": "1.0", "id": "1", "type": "x", "source": "", "data_base64": "AA=="}
        )


def test_events_hash_by_id() -> None:
    event = Event("x", {"a": 1}, id="same")
    assert hash(event) == hash("same")
    assert {event: 1}[event] == 1


def test_with_extensions_adds_to_a_copy_and_checks_the_names() -> None:
    event = Event("like.added", {"post_id": 7}, extensions={"correlationid": "c1"})
    traced = event.with_extensions(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    )
    assert traced.extensions == {
        "correlationid": "c1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    assert (traced.id, traced.time, traced.data, traced.type) == (
        event.id,
        event.time,
        event.data,
        event.type,
    )
    assert traced.data_json == event.data_json
    assert event.extensions == {"correlationid": "c1"}
    with pytest.raises(ValueError, match="invalid CloudEvents extension name 'Bad-Name'"):
        event.with_extensions({"Bad-Name": "x"})
    with pytest.raises(TypeError, match="extension 'n' must be a string, got 3"):
        event.with_extensions({"n": 3})  # type: ignore[dict-item]
