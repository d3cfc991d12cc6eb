"""Logging and OpenTelemetry, set up the same way in every service.

Tracing is configured from the standard environment:

- ``OTEL_SERVICE_NAME``: service name (default: the name the service passes in).
- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none``. Default: ``otlp`` when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, else ``none``.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``): ``grpc`` (default) or
  ``http/protobuf``. The exporters read their endpoint and headers from the env themselves.
- ``OTEL_TRACES_SAMPLER`` (and ``..._ARG``): the SDK's own, e.g. ``parentbased_traceidratio``.

A process with nothing to export spans to (no exporter, no span processor added) records no
spans: each one is dropped when it starts, at a third to a half of a recorded span's cost,
and its context still carries a trace id (logs) and travels as ``traceparent``, marked not
sampled, so a service downstream with the default parent-based sampler records none of that
trace either.

Context crosses process boundaries as W3C ``traceparent``: in gRPC metadata (client
interceptors, and server handlers traced as they are registered: :class:`TracingServer`) and
in NATS message headers (:func:`inject_headers` / :func:`extract_context`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str | None = None) -> None:
    """JSON logs on stderr; level from ``GANGLION_LOG_LEVEL`` (default INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("GANGLION_LOG_LEVEL", "INFO")).upper())


def _exporter_from_env() -> SpanExporter | None:
    endpoint_set = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    kind = (
        os.environ.get("OTEL_TRACES_EXPORTER", "otlp" if endpoint_set else "none").strip().lower()
    )
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: expected otlp, console or none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected grpc or http/protobuf")


class _WhileExported(Sampler):
    """``inner``'s decisions once spans have somewhere to go (``exported`` is set); until
    then every span is dropped at its start. In a hot loop here a recorded span that no
    processor takes costs ~16 us against ~7 us dropped (a root span's start and end), and a
    server span with its context attached ~22 us against ~10 us."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.exported = False

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if self.exported:
            return self.inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None, parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return f"WhileExported{{{self.inner.get_description()}}}"


class _Provider(TracerProvider):
    def __init__(self, resource: Resource) -> None:
        super().__init__(resource=resource)
        self.sampler = self._gate = _WhileExported(self.sampler)  # the env's sampler inside

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self._gate.exported = True


def tracer_provider(service_name: str) -> TracerProvider:
    """The SDK's provider with the ``OTEL_TRACES_SAMPLER`` sampler, recording spans only from
    its first span processor on (an exporter's, or one a test adds later); not installed."""
    return _Provider(Resource.create({SERVICE_NAME: service_name}))


def setup_tracing(
    default_service_name: str, processor: SpanProcessor | None = None
) -> TracerProvider:
    """Install a global TracerProvider configured from ``OTEL_*`` env.

    ``processor`` adds a span processor (tests pass one over an in-memory exporter). Until a
    provider has a processor its spans are not recorded (see the module's docstring).
    """
    provider = tracer_provider(os.environ.get("OTEL_SERVICE_NAME", default_service_name))
    exporter = _exporter_from_env()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if processor is not None:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (``traceparent``), for a NATS message."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by NATS headers or gRPC metadata."""
    return propagate.extract(dict(headers or {}))


# --- gRPC: traced server handlers, client interceptors -----------------------------------


def _metadata_dict(metadata: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(value, str):
            out[key] = value
    return out


_EMPTY_CONTEXT = otel_context.Context()


@functools.lru_cache(maxsize=4)
def _fields(textmap: TextMapPropagator) -> frozenset[str]:
    # A composite propagator recomputes its field set on every read; it never changes.
    return frozenset(textmap.fields)


def _parent(metadata: Any) -> otel_context.Context:
    """The caller's trace context from gRPC metadata. Most calls carry none of the headers
    the configured propagators read; those skip the extraction and start a new trace."""
    fields = _fields(propagate.get_global_textmap())
    if not any(item[0] in fields for item in metadata or ()):
        return _EMPTY_CONTEXT
    return propagate.extract(_metadata_dict(metadata))


class _ServerSpan:
    """One SERVER span as the current span while a handler runs; what
    ``start_as_current_span`` does, without its two generator-based context managers (a
    third of the per-call cost of tracing)."""

    __slots__ = ("_span", "_token")

    def __init__(self, tracer: trace.Tracer, name: str, metadata: Any) -> None:
        self._span = tracer.start_span(name, context=_parent(metadata), kind=SpanKind.SERVER)
        self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def __enter__(self) -> trace.Span:
        return self._span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        otel_context.detach(self._token)
        span = self._span
        # Only Exception subclasses are errors (not CancelledError or GeneratorExit), as in
        # OpenTelemetry's own use_span.
        if isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def traced_handler(name: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    """``handler`` with one SERVER span per call, named ``name``, that continues the caller's
    trace. Unary-unary and unary-stream handlers are traced; others come back unchanged."""
    tracer = trace.get_tracer("ganglion.rpc")
    # The aio handler's behaviours are coroutines; grpc's stubs type them as sync, hence Any.
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with _ServerSpan(tracer, name, context.invocation_metadata()):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            with _ServerSpan(tracer, name, context.invocation_metadata()):
                async for item in inner_us(request, context):
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class _TracedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler's method handlers, traced; each wrapped once, on its first call."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._wrapped: dict[str, Any] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = traced_handler(method.lstrip("/"), handler)
        return wrapped


class TracingServer(grpc.aio.Server):
    """A server whose services are traced (:func:`traced_handler`): every handler added through
    it is wrapped once, as it is added. ``rpc.start_server`` hands one to its ``register``.

    What a ``grpc.aio.ServerInterceptor`` would do, without its cost on every call: with an
    interceptor the server looks each call's handler up through extra coroutines and a
    continuation, measured at 40-50 us of server CPU per small ``Schedule`` call against the
    same span opened in the handler (a bare echo server spends ~250 us a call in all)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            [_TracedGenericHandler(h) for h in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {m: traced_handler(f"{service_name}/{m}", h) for m, h in method_handlers.items()},
        )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - grpc.aio.Server's signature
    ) -> bool:
        return await self._server.wait_for_termination(timeout)


def _with_trace_metadata(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = list(details.metadata or ())
    metadata.extend(inject_headers().items())
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class ClientTracingUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """A CLIENT span per call; its context travels as ``traceparent`` metadata."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        with trace.get_tracer("ganglion.rpc").start_as_current_span(
            name.lstrip("/"), kind=SpanKind.CLIENT
        ):
            call = await continuation(_with_trace_metadata(client_call_details), request)
            await call  # finish inside the span, so its duration is the call's
            return call


class ClientTracingUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_trace_metadata(client_call_details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return [ClientTracingUnaryUnary(), ClientTracingUnaryStream()]
