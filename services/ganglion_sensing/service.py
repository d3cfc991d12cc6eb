"""Wiring of the sensing agent: NATS, collector, publisher loop and ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ganglion import bus, rpc
from ganglion_sensing.collectors import Collector, make_collector
from ganglion_sensing.config import SensingConfig
from ganglion_sensing.metrics import MetricsServer
from ganglion_sensing.publisher import LatestSample, Publisher, PublisherConfig

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0
"""How long shutdown waits for NATS to flush before closing the connection outright."""


def ready_line(config: SensingConfig, collector: Collector, metrics: MetricsServer) -> str:
    """The one stdout line launchers wait for."""
    return (
        f"ganglion-sensing {config.host} backend={collector.backend.value} "
        f"gpus={collector.gpu_count} metrics={metrics.url}"
    )


async def serve(
    config: SensingConfig,
    stop: asyncio.Event | None = None,
    nats_url: str | None = None,
) -> None:
    """Run the agent until ``stop`` is set (default: SIGTERM/SIGINT).

    ``nats_url`` None means ``$GANGLION_NATS_URL``, else an embedded nats-server. Shutdown:
    stop the loop, close ``/metrics`` and the collector, drain NATS.
    """
    if stop is None:
        stop = rpc.stop_event_on_signals()
    async with contextlib.AsyncExitStack() as stack:
        if nats_url is None:
            # Starting or stopping the embedded server blocks for a moment: keep it off the loop.
            embedded = contextlib.ExitStack()
            stack.push_async_callback(asyncio.to_thread, embedded.close)
            nats_url = await asyncio.to_thread(embedded.enter_context, bus.nats_url_or_embedded())

        # A sample that could not be published is dropped (and counted as failed), not sent
        # seconds late when NATS returns: the next interval publishes a fresh one.
        nc = await bus.connect(
            nats_url, f"ganglion-sensing-{config.host}", buffer_while_reconnecting=False
        )

        async def drain() -> None:
            try:
                await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT_S)
            except Exception as exc:
                log.warning("NATS drain failed (%s): closing", exc)
                await nc.close()

        stack.push_async_callback(drain)
        js = nc.jetstream()
        kv = await bus.ensure_streams(js)

        collector = await asyncio.to_thread(
            make_collector, config.backend, config.host, config.sim_gpus, config.seed
        )
        stack.callback(collector.close)
        await collector.attach(nc)

        latest = LatestSample()
        metrics = MetricsServer(latest.get, port=config.metrics_port, addr=config.metrics_addr)
        stack.callback(metrics.close)

        publisher = Publisher(
            PublisherConfig(config.host, config.interval_s, config.publish_timeout_s),
            collector,
            js,
            kv,
            latest=latest,
        )
        log.info(
            "sensing ready",
            extra={
                "host": config.host,
                "backend": collector.backend.value,
                "gpus": collector.gpu_count,
                "metrics": metrics.url,
                "boot_id": publisher.boot_id,
            },
        )
        print(ready_line(config, collector, metrics), flush=True)
        await publisher.run(stop)
        log.info("sensing stopping", extra={"host": config.host, "batches": publisher.sequence})
