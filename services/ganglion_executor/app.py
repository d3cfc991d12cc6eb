"""Wiring: NATS, ledger replay, reconciliation, gRPC server, registration, graceful shutdown.

Startup order matters: the ledger is replayed and every unfinished job reconciled (re-adopted
or reported ended) *before* the gRPC server accepts a request, so no plan can be applied
against a GPU table that does not yet know about jobs an earlier executor started.

On shutdown (``stop`` set, SIGTERM/SIGINT by default) the server stops accepting, job
processes are left running unless ``stop_jobs_on_exit`` (the next executor started on the same
state dir re-adopts them), queued events are flushed, the registration key is deleted and the
NATS connection drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from ganglion.bus import connect, ensure_streams, executor_key
from ganglion.gpus import GpuInventory, discover
from ganglion.rpc import start_server, stop_event_on_signals
from ganglion.v1 import executor_pb2, executor_pb2_grpc
from ganglion_executor.config import ExecutorConfig
from ganglion_executor.datacache import (
    TRANSFER_SERVICE,
    DataPlane,
    DataPlaneExecutorServicer,
    MetricsServer,
    job_environment,
)
from ganglion_executor.events import EventOutbox
from ganglion_executor.executor import Executor
from ganglion_executor.ledger import Ledger
from ganglion_executor.servicer import SERVICE_NAME
from ganglion_executor.tuning import DataPlaneTuner

log = logging.getLogger(__name__)


def executor_info(host: str, address: str, inventory: GpuInventory) -> executor_pb2.ExecutorInfo:
    return executor_pb2.ExecutorInfo(
        host=host,
        address=address,
        gpu_count=inventory.count,
        gpu_uuids=list(inventory.uuids),
        time_s=time.time(),
    )


async def keep_registered(
    kv: KeyValue, host: str, address: str, inventory: GpuInventory, interval_s: float
) -> None:
    """Refresh this executor's key in the hosts bucket until cancelled (the bucket has a TTL)."""
    key = executor_key(host)
    while True:
        try:
            await kv.put(key, executor_info(host, address, inventory).SerializeToString())
        except (NatsError, OSError) as exc:
            log.warning("could not refresh the executor registration: %s", exc, extra={"key": key})
        await asyncio.sleep(interval_s)


def _bind_address(config: ExecutorConfig) -> str:
    host = (
        f"[{config.bind}]"
        if ":" in config.bind and not config.bind.startswith("[")
        else config.bind
    )
    return f"{host}:{config.port}"


async def serve(
    config: ExecutorConfig,
    nats_url: str,
    stop: asyncio.Event | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Run the executor until ``stop`` is set (default: SIGTERM or SIGINT).

    ``ready`` is called with the bound port once requests are served; the one ready line is
    printed on stdout at the same moment.
    """
    stop = stop if stop is not None else stop_event_on_signals()
    inventory = discover(config.backend, config.host, config.sim_gpus)
    ledger, replay = Ledger.open(config.state_dir)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(ledger.close)
        nc = await connect(nats_url, f"ganglion-executor-{config.host}")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        kv = await ensure_streams(js)
        outbox = EventOutbox(js, config.host)
        outbox.start()
        stack.push_async_callback(outbox.close)
        executor = Executor(
            config.host,
            inventory,
            config.state_dir,
            ledger,
            outbox,
            grace_s=config.grace_s,
            poll_s=config.poll_interval_s,
        )
        # Registered before recover() so the watchers it starts are always stopped.
        stack.push_async_callback(lambda: executor.close(stop_jobs=config.stop_jobs_on_exit))
        await executor.recover(replay)
        dataplane = DataPlane(
            config.host,
            config.state_dir / "cache",
            config.cache_bytes,
            config.cache_policy,
            config.origin,
            kv,
        )
        stack.push_async_callback(dataplane.close)

        def register(server: grpc.aio.Server) -> None:
            executor_pb2_grpc.add_ExecutorServiceServicer_to_server(
                DataPlaneExecutorServicer(executor, dataplane), server
            )
            dataplane.register(server)

        server, port, health = await start_server(
            register, [SERVICE_NAME, TRANSFER_SERVICE], _bind_address(config)
        )
        # No await since start_server: no Apply can start a job before its cache variables exist.
        executor.job_env.update(job_environment(dataplane.cache_dir, config.local_address(port)))
        stack.push_async_callback(server.stop, config.shutdown_grace_s)
        stack.push_async_callback(health.enter_graceful_shutdown)

        address = config.advertise_address(port)
        registration = asyncio.create_task(
            keep_registered(kv, config.host, address, inventory, config.register_interval_s),
            name="executor-registration",
        )
        stack.push_async_callback(_unregister, kv, config.host, registration)
        stats_task = asyncio.create_task(
            dataplane.publish_forever(nc, config.cache_stats_interval_s), name="cache-stats"
        )
        stack.push_async_callback(_cancel, stats_task)
        if config.decision_addr:
            tuner = DataPlaneTuner(
                dataplane, config.decision_addr, config.tune_interval_s, config.link_bandwidth
            )
            tuner_task = asyncio.create_task(tuner.run(), name="dataplane-tuner")
            stack.push_async_callback(_cancel, tuner_task)
        if config.metrics_port is not None:
            metrics = MetricsServer(dataplane, config.metrics_port, config.metrics_addr)
            stack.callback(metrics.close)
            log.info("cache metrics served", extra={"url": metrics.url})

        print(
            f"ganglion-executor {config.host} listening on {config.local_address(port)} "
            f"gpus={inventory.count} backend={inventory.backend.value}",
            flush=True,
        )
        log.info(
            "executor ready",
            extra={
                "host": config.host,
                "port": port,
                "advertise": address,
                "gpus": inventory.count,
                "backend": inventory.backend.value,
                "state_dir": str(config.state_dir),
            },
        )
        if ready is not None:
            ready(port)
        await stop.wait()
        log.info("executor stopping", extra={"stop_jobs": config.stop_jobs_on_exit})


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _unregister(kv: KeyValue, host: str, registration: asyncio.Task[None]) -> None:
    registration.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await registration
    try:
        await kv.delete(executor_key(host))
    except (NatsError, OSError) as exc:
        log.warning("could not delete the executor registration: %s", exc)
