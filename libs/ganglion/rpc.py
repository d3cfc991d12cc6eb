"""gRPC plumbing shared by every service: servers with health, reflection and tracing;
traced client channels; graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ganglion.observability import TracingServer, client_interceptors

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest request a server accepts; bigger ones fail with RESOURCE_EXHAUSTED."""

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


async def start_server(
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    address: str = "127.0.0.1:0",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start a traced aio server with health and reflection; returns (server, port, health).

    ``address`` ending in ``:0`` picks a free port. ``service_names`` are the full names
    (e.g. ``ganglion.v1.DecisionService``) marked SERVING and listed by reflection.
    ``reuse_port`` sets SO_REUSEPORT, so several processes can listen on one port and the
    kernel spreads connections over them. Off by default (gRPC's own default is on): a second
    server started by mistake on a taken port must fail, not silently take half the traffic.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    register(TracingServer(server))  # health and reflection, added below, are not traced
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise OSError(
            f"could not listen on {address}: the port is taken by another process, or the host "
            "is not an address of this machine"
        )
    await server.start()
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def channel(address: str) -> grpc.aio.Channel:
    """An insecure, traced client channel."""
    return grpc.aio.insecure_channel(
        address, options=_CHANNEL_OPTIONS, interceptors=client_interceptors()
    )


@contextlib.contextmanager
def exit_on_os_error(service: str) -> Iterator[None]:
    """Exit with status 2 and one logged line when the service fails on something the operator
    fixes (a port in use, a path it cannot write), instead of a traceback that buries the
    reason; the traceback is still logged at debug level."""
    try:
        yield
    except OSError as exc:
        log.error("%s cannot run: %s", service, exc)
        log.debug("traceback", exc_info=True)
        sys.exit(2)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (graceful shutdown: event -> server.stop -> drain)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
