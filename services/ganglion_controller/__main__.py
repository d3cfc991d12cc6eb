"""``ganglion-controller``: the durable job queue (JobService) and the scheduling loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ganglion import bus, rpc
from ganglion.observability import setup_logging, setup_tracing, shutdown_tracing
from ganglion.v1 import controller_pb2_grpc
from ganglion_controller.config import ControllerConfig, parse_args
from ganglion_controller.hosts import HostDirectory
from ganglion_controller.jobs import JobTable
from ganglion_controller.loop import SchedulingLoop
from ganglion_controller.servicer import JobServicer

log = logging.getLogger("ganglion_controller")

SERVICE_NAME = "ganglion.v1.JobService"


async def serve(
    config: ControllerConfig,
    nats_url: str,
    stop: asyncio.Event | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    stop = stop or rpc.stop_event_on_signals()
    # Every durable write of the job table is answered to someone (Submit's caller, the
    # loop's next round): one that failed during a NATS outage must not be sent on reconnect.
    nc = await bus.connect(nats_url, "ganglion-controller", buffer_while_reconnecting=False)
    js = nc.jetstream()
    kv = await bus.ensure_streams(js)
    jobs = JobTable(js)
    await jobs.start()
    hosts = HostDirectory(kv, config.host_stale_s)
    await hosts.start()
    loop = SchedulingLoop(config, jobs, hosts)

    def hosts_gpus() -> tuple[int, int]:
        live = hosts.live()
        return len(live), sum(v.gpu_count for v in live.values())

    servicer = JobServicer(jobs, loop, hosts_gpus)
    server, port, _health = await rpc.start_server(
        lambda s: controller_pb2_grpc.add_JobServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        f"{config.bind}:{config.port}",
    )
    log.info(
        "controller serving",
        extra={"port": port, "decision": config.decision_addr or "none (fallback only)"},
    )
    print(
        f"ganglion-controller listening on {config.bind}:{port} decision={config.decision_addr or 'none'}",
        flush=True,
    )
    if ready is not None:
        ready(port)
    task = asyncio.create_task(loop.run(stop), name="scheduling-loop")
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2.0)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5.0)
        await loop.close()
        await hosts.stop()
        await jobs.stop()
        await nc.drain()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging()
    setup_tracing("ganglion-controller")
    try:
        with rpc.exit_on_os_error("ganglion-controller"), bus.nats_url_or_embedded() as url:
            asyncio.run(serve(config, url))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
