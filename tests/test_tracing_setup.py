"""``tracer_provider``: spans are recorded only once the provider has somewhere to send them,
and a dropped span's context still carries a trace id and its parent's trace."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from ganglion.observability import tracer_provider

PARENT = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "v1")]),
)


def test_without_a_processor_spans_are_dropped_but_keep_trace_ids() -> None:
    tracer = tracer_provider("test").get_tracer("test")
    with (
        tracer.start_as_current_span("root") as root,
        tracer.start_as_current_span("child") as child,
    ):
        pass
    for span in (root, child):
        assert not span.is_recording()
        assert span.get_span_context().is_valid
        assert not span.get_span_context().trace_flags.sampled
    assert child.get_span_context().trace_id == root.get_span_context().trace_id
    assert child.get_span_context().span_id != root.get_span_context().span_id

    remote = trace.set_span_in_context(NonRecordingSpan(PARENT))
    continued = tracer.start_span("server", context=remote)
    assert not continued.is_recording()
    assert continued.get_span_context().trace_id == PARENT.trace_id
    assert continued.get_span_context().trace_state == PARENT.trace_state


def test_spans_are_recorded_from_the_first_processor_on() -> None:
    provider = tracer_provider("test")
    tracer = provider.get_tracer("test")  # taken before the processor is added, as servers do
    tracer.start_span("before").end()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    remote = trace.set_span_in_context(NonRecordingSpan(PARENT))
    tracer.start_span("root").end()
    tracer.start_span("server", context=remote).end()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["root", "server"]
    assert spans[1].context is not None and spans[1].context.trace_id == PARENT.trace_id
    assert spans[1].parent is not None and spans[1].parent.span_id == PARENT.span_id


def test_the_environment_sampler_still_decides_once_spans_are_exported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = tracer_provider("test")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("test").start_span("root").end()
    assert exporter.get_finished_spans() == ()
    assert "AlwaysOffSampler" in provider.sampler.get_description()
