"""Server tracing on a real gRPC server: one SERVER span per call that continues the caller's
trace (W3C ``traceparent`` metadata) or starts one, with the error recorded on failures; for
services added as registered or generic handlers, unary or server-streaming; none for
client-streaming calls, health checks or unknown methods."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
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


# --- handlers added through a generic handler, other call shapes, and untraced services -------


async def _echo(request: bytes, context: object) -> bytes:
    return request


async def _count(request: bytes, context: object) -> AsyncIterator[bytes]:
    for i in range(3):
        yield request + bytes([i])


async def _total(requests: AsyncIterator[bytes], context: object) -> bytes:
    return b"".join([r async for r in requests])


@pytest.fixture
async def generic() -> AsyncIterator[grpc.aio.Channel]:
    """A raw-bytes service added as a generic handler, with three call shapes."""
    handler = grpc.method_handlers_generic_handler(
        "test.Raw",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Count": grpc.unary_stream_rpc_method_handler(_count),
            "Total": grpc.stream_unary_rpc_method_handler(_total),
        },
    )

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((handler,))

    server, port, _ = await rpc.start_server(register, [])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(grace=None)


async def test_generic_unary_and_streaming_calls_are_traced_like_registered_ones(
    spans: InMemorySpanExporter, generic: grpc.aio.Channel
) -> None:
    metadata = (("traceparent", f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"),)
    echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = generic.unary_unary("/test.Raw/Echo")
    count: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = generic.unary_stream("/test.Raw/Count")
    for _ in range(2):  # the second call reuses the handler wrapped on the first
        assert await echo(b"x", metadata=metadata, timeout=TIMEOUT_S) == b"x"
    got = [r async for r in count(b"y", metadata=metadata, timeout=TIMEOUT_S)]
    assert got == [b"y\x00", b"y\x01", b"y\x02"]
    found = await server_spans(spans, 3)
    assert sorted(s.name for s in found) == ["test.Raw/Count", "test.Raw/Echo", "test.Raw/Echo"]
    for span in found:
        assert span.context is not None and span.context.trace_id == TRACE_ID
        assert span.parent is not None and span.parent.span_id == PARENT_ID


async def test_client_streaming_health_and_unknown_methods_make_no_span(
    spans: InMemorySpanExporter, generic: grpc.aio.Channel
) -> None:
    async def requests() -> AsyncIterator[bytes]:
        for part in (b"a", b"b"):
            yield part

    total: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = generic.stream_unary("/test.Raw/Total")
    assert await total(requests(), timeout=TIMEOUT_S) == b"ab"
    check = health_pb2_grpc.HealthStub(generic).Check
    reply = await check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    nope: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = generic.unary_unary("/test.Raw/Nope")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await nope(b"", timeout=TIMEOUT_S)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # A traced call after them: once its span is in, any span of theirs would be too.
    echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = generic.unary_unary("/test.Raw/Echo")
    await echo(b"z", timeout=TIMEOUT_S)
    found = await server_spans(spans, 1)
    assert [s.name for s in found] == ["test.Raw/Echo"]
