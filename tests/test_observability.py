"""Server tracing on a real gRPC server: one SERVER span per call that continues the caller's
trace (W3C ``traceparent`` metadata) or starts one, with the error recorded on failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ganglion import rpc
from ganglion.loadgen import synthetic_request
from ganglion.observability import setup_tracing
from ganglion.v1 import decision_pb2, decision_pb2_grpc
from ganglion_decision.servicer import SERVICE_NAME, DecisionServicer

TIMEOUT_S = 10.0
SCHEDULE = "ganglion.v1.DecisionService/Schedule"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331


@pytest.fixture
async def spans() -> AsyncIterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the process's first: it stays global
        provider = setup_tracing("test")
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()


@pytest.fixture
async def stub() -> AsyncIterator[decision_pb2_grpc.DecisionServiceStub]:
    servicer = DecisionServicer()

    def register(server: grpc.aio.Server) -> None:
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(servicer, server)

    server, port, _ = await rpc.start_server(register, [SERVICE_NAME])
    # A plain channel: no client interceptor adds metadata, each test sends what it means to.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield decision_pb2_grpc.DecisionServiceStub(channel)
    await server.stop(grace=None)


async def server_spans(exporter: InMemorySpanExporter, n: int) -> list[ReadableSpan]:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        found = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.01)


async def test_a_call_with_traceparent_continues_that_trace(
    spans: InMemorySpanExporter, stub: decision_pb2_grpc.DecisionServiceStub
) -> None:
    traceparent = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
    await stub.Schedule(
        synthetic_request(16, 2), metadata=(("traceparent", traceparent),), timeout=TIMEOUT_S
    )
    (span,) = await server_spans(spans, 1)
    assert span.name == SCHEDULE
    assert span.context is not None and span.context.trace_id == TRACE_ID
    assert span.parent is not None and span.parent.span_id == PARENT_ID
    assert span.parent.is_remote
    assert span.status.status_code is StatusCode.UNSET


async def test_a_call_without_trace_context_starts_a_trace(
    spans: InMemorySpanExporter, stub: decision_pb2_grpc.DecisionServiceStub
) -> None:
    await stub.Schedule(synthetic_request(16, 2), metadata=(("x-other", "1"),), timeout=TIMEOUT_S)
    (span,) = await server_spans(spans, 1)
    assert span.parent is None
    assert span.context is not None and span.context.trace_id not in (0, TRACE_ID)


async def test_a_failed_call_records_the_error(
    spans: InMemorySpanExporter, stub: decision_pb2_grpc.DecisionServiceStub
) -> None:
    bad = decision_pb2.ScheduleRequest(policy="no-such-policy")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Schedule(bad, timeout=TIMEOUT_S)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    (span,) = await server_spans(spans, 1)
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
