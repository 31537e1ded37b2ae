"""``cli_app``'s bus in a process whose OpenTelemetry SDK writes every finished
span as a JSON line to the file ``$TRACED_APP_SPANS`` names, for
``retrybus worker traced_app:bus --tracing``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from cli_app import bus
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["bus"]


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as out:
            for span in spans:
                context = span.get_span_context()
                assert context is not None
                out.write(
                    json.dumps(
                        {
                            "name": span.name,
                            "trace_id": f"{context.trace_id:032x}",
                            "span_id": f"{context.span_id:016x}",
                            "parent": None
                            if span.parent is None
                            else f"{span.parent.span_id:016x}",
                            "links": [f"{link.context.span_id:016x}" for link in span.links],
                            "attributes": dict(span.attributes or {}),
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["TRACED_APP_SPANS"])))
trace.set_tracer_provider(provider)
