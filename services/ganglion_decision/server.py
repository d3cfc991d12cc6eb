"""Wiring: one gRPC server (decision + health + reflection) until a stop event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from ganglion import rpc
from ganglion.v1 import decision_pb2_grpc
from ganglion_decision.config import DecisionConfig
from ganglion_decision.servicer import SERVICE_NAME, DecisionServicer

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0
"""In-flight RPCs get this long to finish after a stop."""


async def serve(
    config: DecisionConfig,
    stop: asyncio.Event | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (default: SIGTERM or SIGINT), then stop gracefully.

    ``ready`` is called once with the bound port (the real one when ``config.port`` is 0).
    """
    servicer = DecisionServicer(config.policy, config.limits, config.offload_work)

    def register(server: grpc.aio.Server) -> None:
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(servicer, server)

    if stop is None:
        stop = rpc.stop_event_on_signals()
    server, port, health = await rpc.start_server(
        register, [SERVICE_NAME], config.address(), config.max_message_bytes
    )
    try:
        log.info(
            "decision service listening",
            extra={"address": config.address(port), "policy": config.policy},
        )
        if ready is not None:
            ready(port)
        await stop.wait()
        log.info("decision service stopping", extra={"grace_s": STOP_GRACE_S})
    finally:
        await health.enter_graceful_shutdown()  # health checkers see NOT_SERVING first
        await server.stop(grace=STOP_GRACE_S)
