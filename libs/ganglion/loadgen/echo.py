"""A bare grpc.aio server for baselines: the decision service's Schedule method and nothing
behind it.

It takes the same request bytes the decision service takes (never decoding them) and answers
with fixed reply bytes, normally what the real service answers for that request; no
interceptors, no health, no reflection. Its throughput and latency are what gRPC and asyncio
alone cost on a machine, so "Schedule QPS / echo QPS" isolates what Ganglion adds.
"""

from __future__ import annotations

from typing import Any

import grpc

from ganglion.loadgen.decision import SCHEDULE_METHOD
from ganglion.rpc import MAX_MESSAGE_BYTES


async def start_echo_server(
    reply: bytes, address: str = "127.0.0.1:0", reuse_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """Start it; returns (server, port). Stop it with ``server.stop(grace)``."""
    service, method = SCHEDULE_METHOD.strip("/").split("/")

    async def answer(request: bytes, context: Any) -> bytes:
        return reply

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    # No (de)serialisers: the handler sees and returns raw bytes.
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(answer)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the echo server to {address}")
    await server.start()
    return server, port
