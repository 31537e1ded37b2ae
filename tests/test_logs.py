"""Structured logs: every retrybus record about a delivery carries the event id,
type, handler and attempt as fields, and ``JsonFormatter`` writes them as JSON."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from retrybus import Event, EventBus, FixedDelay, ManualClock, RetryWorker
from retrybus.logs import DELIVERY_FIELDS, JsonFormatter


async def test_every_record_about_a_delivery_names_it(
    caplog: pytest.LogCaptureFixture, clock: ManualClock
) -> None:
    bus = EventBus(clock=clock, default_policy=FixedDelay(delay=1, max_retries=1))
    broken = True

    async def handler(event: Event) -> None:
        if broken:
            raise TimeoutError("connection timeout")

    bus.subscribe("job", handler, name="job")
    event = Event("job", {"n": 1})
    worker = RetryWorker(bus)
    with caplog.at_level(logging.DEBUG, logger="retrybus"):
        await bus.publish(event)  # fails: retry 1 scheduled
        clock.advance(1)
        await worker.run_once()  # fails again: dead-lettered
        (dead,) = await bus.dead_letters.list()
        await bus.dead_letters.reprocess(dead.id)  # fails again
        broken = False
        await bus.dead_letters.reprocess(dead.id)  # works
        await bus.dead_letters.requeue(dead.id)

    about = [r for r in caplog.records if event.id in r.getMessage()]
    assert [r.levelname for r in about] == ["INFO", "WARNING", "WARNING", "INFO", "INFO"]
    for record in about:
        fields = {name: getattr(record, name, None) for name in DELIVERY_FIELDS}
        assert fields["event_id"] == event.id, record.getMessage()
        assert fields["event_type"] == "job"
        assert fields["handler"] == "job"
        assert isinstance(fields["attempt"], int)
    assert about[1].reason == "failed after 1 retries"  # type: ignore[attr-defined]
    assert about[2].dead_letter_id == dead.id  # type: ignore[attr-defined]


def record(**extra: object) -> logging.LogRecord:
    logger = logging.getLogger("retrybus.test")
    made = logger.makeRecord(
        "retrybus.test",
        logging.WARNING,
        __file__,
        1,
        "dead-lettered %s",
        ("e1",),
        None,
        extra=extra,
    )
    made.created = 1_700_000_000.25
    return made


def test_json_formatter_writes_one_object_with_the_extra_fields() -> None:
    line = JsonFormatter().format(record(event_id="e1", attempt=3, when=object()))
    assert "\n" not in line
    document = json.loads(line)
    assert document["time"] == "2023-11-14T22:13:20.250+00:00"
    assert document["level"] == "warning"
    assert document["logger"] == "retrybus.test"
    assert document["message"] == "dead-lettered e1"
    assert document["event_id"] == "e1"
    assert document["attempt"] == 3
    assert document["when"].startswith("<object object")  # not JSON: written as text


def test_json_formatter_writes_the_exception() -> None:
    try:
        raise ValueError("bad payload")
    except ValueError:
        import sys

        made = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    document = json.loads(JsonFormatter().format(made))
    assert document["exception"].startswith("Traceback (most recent call last)")
    assert "ValueError: bad payload" in document["exception"]


def test_json_formatter_adds_the_current_trace_and_span() -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("work") as span:
        document = json.loads(JsonFormatter().format(record()))
    context = span.get_span_context()
    assert document["trace_id"] == f"{context.trace_id:032x}"
    assert document["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in json.loads(JsonFormatter().format(record()))


def test_json_formatter_keeps_its_own_keys_and_survives_odd_values() -> None:
    line = JsonFormatter().format(record(level="forged", logger="forged", odd={(1, 2): "x"}))
    document = json.loads(line)
    assert document["level"] == "warning"
    assert document["logger"] == "retrybus.test"
    assert document["odd"] == "{(1, 2): 'x'}"


def test_json_formatter_prefers_the_delivery_s_own_span() -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("publish"):
        document = json.loads(JsonFormatter().format(record(trace_id="a" * 32, span_id="b" * 16)))
    assert (document["trace_id"], document["span_id"]) == ("a" * 32, "b" * 16)
