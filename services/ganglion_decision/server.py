"""Wiring: one gRPC server (decision + health + reflection) until a stop event; or, with
``workers > 1``, a supervisor of that many server processes sharing one port.

Python decides on one core per process, so a machine's cores serve one port through
SO_REUSEPORT: every worker listens on the same address and the kernel spreads incoming
*connections* over them (a client with one connection talks to one worker; the controller
and ``ganglion loadgen`` open several). Workers are spawned, never forked: a forked child of
a process that has touched gRPC inherits its threads' locks in whatever state they were in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import grpc

from ganglion import rpc
from ganglion.observability import setup_logging, setup_tracing, shutdown_tracing
from ganglion.v1 import decision_pb2_grpc
from ganglion_decision.config import DecisionConfig
from ganglion_decision.models import open_models
from ganglion_decision.servicer import SERVICE_NAME, DecisionServicer

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0
"""In-flight RPCs get this long to finish after a stop."""
WORKER_START_S = 60.0
"""How long a spawned worker may take to import and listen."""
_POLL_S = 0.5  # how often the supervisor looks for a dead worker


class WorkerError(RuntimeError):
    """A worker process failed to start or exited while serving."""


async def serve(
    config: DecisionConfig,
    stop: asyncio.Event | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (default: SIGTERM or SIGINT), then stop gracefully.

    ``ready`` is called once with the bound port (the real one when ``config.port`` is 0).
    This is one process whatever ``config.workers`` says; see :func:`serve_workers`.
    """
    models = await open_models(
        config.models_dir,
        config.models_nats_bucket,
        config.models_poll_s,
        config.torch_threads,
        config.policy,
    )
    servicer = DecisionServicer(
        config.policy, config.limits, config.offload_work, models.manager, config.reuse_port
    )

    def register(server: grpc.aio.Server) -> None:
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(servicer, server)

    if stop is None:
        stop = rpc.stop_event_on_signals()
    server, port, health = await rpc.start_server(
        register, [SERVICE_NAME], config.address(), config.max_message_bytes, config.reuse_port
    )
    try:
        log.info(
            "decision service listening",
            extra={"address": config.address(port), "policy": config.policy, "pid": os.getpid()},
        )
        if ready is not None:
            ready(port)
        await stop.wait()
        served = sum(s.requests for s in servicer.stats.snapshot().values())
        log.info(
            "decision service stopping",
            extra={"grace_s": STOP_GRACE_S, "pid": os.getpid(), "requests": served},
        )
    finally:
        await health.enter_graceful_shutdown()  # health checkers see NOT_SERVING first
        await server.stop(grace=STOP_GRACE_S)
        await models.close()


def _worker_main(config: DecisionConfig, conn: Connection) -> None:
    """Entry point of one spawned worker: a whole decision server, reporting its port."""
    setup_logging()
    setup_tracing("ganglion-decision")
    try:
        asyncio.run(serve(config, ready=conn.send))
    finally:
        shutdown_tracing()
        conn.close()


async def serve_workers(
    config: DecisionConfig,
    stop: asyncio.Event | None = None,
    ready: Callable[[int, Sequence[int]], None] | None = None,
) -> None:
    """Run ``config.workers`` server processes on one port until ``stop`` (default: SIGTERM
    or SIGINT), then SIGTERM them and wait for their graceful stop.

    ``ready`` gets the port and the workers' pids once all of them listen. If a worker exits
    on its own the others are stopped and :class:`WorkerError` is raised: a supervisor above
    (systemd, Kubernetes) restarts the whole service, which keeps this one simple.
    """
    if stop is None:
        stop = rpc.stop_event_on_signals()
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []

    async def start(n: int, port: int) -> int:
        pipes = []
        for _ in range(n):
            receive, send = ctx.Pipe(duplex=False)
            worker = replace(config, port=port, workers=1, reuse_port=True)
            proc = ctx.Process(
                target=_worker_main, args=(worker, send), name=f"ganglion-decision-{len(procs)}"
            )
            proc.start()
            send.close()
            procs.append(proc)
            pipes.append((proc, receive))
        ports = await asyncio.gather(*(_port_of(p, r) for p, r in pipes))
        return ports[0]

    try:
        # With port 0 the first worker picks the port; the others then join it.
        port = await start(1, config.port)
        if config.workers > 1:
            await start(config.workers - 1, port)
        log.info(
            "decision workers listening",
            extra={"address": config.address(port), "pids": [p.pid for p in procs]},
        )
        if ready is not None:
            ready(port, [p.pid or 0 for p in procs])
        while not stop.is_set():
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                raise WorkerError(f"worker pid {dead[0].pid} exited with {dead[0].exitcode}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL_S)
    finally:
        await _stop_all(procs)


async def _port_of(proc: BaseProcess, conn: Connection) -> int:
    """The port a starting worker reports, or WorkerError if it dies or stays silent."""
    try:
        if not await asyncio.to_thread(conn.poll, WORKER_START_S):
            raise WorkerError(f"worker pid {proc.pid} did not listen within {WORKER_START_S:g} s")
        port: int = conn.recv()
    except EOFError:
        raise WorkerError(f"worker pid {proc.pid} exited before listening") from None
    finally:
        conn.close()
    return port


async def _stop_all(procs: list[BaseProcess]) -> None:
    for proc in procs:
        if proc.exitcode is None and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        await asyncio.to_thread(proc.join, STOP_GRACE_S + 5.0)
        if proc.exitcode is None:
            log.warning("worker did not stop in time; killing it", extra={"pid": proc.pid})
            proc.kill()
            await asyncio.to_thread(proc.join, 5.0)
