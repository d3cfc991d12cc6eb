"""Simulated sensing at scale: many hosts of simulated GPUs publishing telemetry over NATS.

Each simulated host does what a sensing agent does every interval: a ``TelemetryBatch`` on
``ganglion.telemetry.<host>`` into JetStream (``Nats-Msg-Id`` = host, run id, sequence) and,
unless ``kv`` is off, the same sample into the hosts KV bucket under ``telemetry.<host>`` (a
KV put is a JetStream publish on the key's subject; it is sent as one here so thousands can be
in flight). Samples are marked ``COLLECTOR_BACKEND_SIM`` and their GPUs are named as simulated,
like every simulated sample in Ganglion.

Hosts publish out of phase (host ``j`` at ``(k + j / hosts) / hz`` in interval ``k``), as real
agents started at different moments do, so the offered load is a steady ``hosts x hz``
batches per second on the open-loop schedule of :mod:`ganglion.loadgen.arrivals`. Latency is
from the intended publish time to JetStream's acknowledgement (of the KV put too).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass

import nats
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from ganglion import bus
from ganglion.convert import pack_utilization
from ganglion.loadgen.arrivals import OK, Call, Progress, Schedule, open_loop
from ganglion.loadgen.errors import TargetUnavailableError
from ganglion.loadgen.report import LatencySummary, LoadReport
from ganglion.v1 import telemetry_pb2

log = logging.getLogger(__name__)

_FB_TOTAL = 80 * 1024**3


@dataclass(frozen=True)
class TelemetryLoad:
    """One simulated-sensing run."""

    nats_url: str
    """NATS to publish to (the streams and bucket are created if missing)."""
    gpus: int = 1024
    """Simulated GPUs in all."""
    gpus_per_host: int = 8
    """GPUs per simulated host (the last host may have fewer)."""
    hz: float = 1.0
    """Samples per second per host (sensing's default interval is 1 s)."""
    duration_s: float = 10.0
    """How long to publish."""
    kv: bool = True
    """Also refresh each host's ``telemetry.<host>`` key, as sensing does."""
    host_prefix: str = "loadgen-"
    """Simulated host names are this plus a number."""
    max_inflight: int = 4000
    """Unacknowledged publishes at most."""
    timeout_s: float = 5.0
    """How long one publish waits for its acknowledgement."""
    seed: int = 0
    """Seed of the simulated readings."""

    def __post_init__(self) -> None:
        for name in ("gpus", "gpus_per_host", "max_inflight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.hz > 0 and self.duration_s > 0 and self.timeout_s > 0):
            raise ValueError("hz, duration and timeout must be > 0")

    @property
    def hosts(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_host)

    @property
    def batches(self) -> int:
        """Batches the run publishes (one per host per interval)."""
        return int(self.duration_s * self.hz * self.hosts)


class SimulatedHosts:
    """One reusable ``HostSample`` per host; each publish refreshes its readings in place."""

    def __init__(self, config: TelemetryLoad) -> None:
        self._rng = np.random.default_rng(config.seed)
        self.samples: list[telemetry_pb2.HostSample] = []
        for h in range(config.hosts):
            name = f"{config.host_prefix}{h:05d}"
            count = min(config.gpus_per_host, config.gpus - h * config.gpus_per_host)
            sample = telemetry_pb2.HostSample(
                host=name,
                backend=telemetry_pb2.COLLECTOR_BACKEND_SIM,
                driver_version="simulated",
            )
            for i in range(count):
                sample.gpus.add(
                    uuid=f"GPU-sim-{name}-{i}",
                    index=i,
                    name="Simulated GPU (loadgen)",
                    fb_total_bytes=_FB_TOTAL,
                )
            self.samples.append(sample)

    def refresh(self, host: int) -> telemetry_pb2.HostSample:
        sample = self.samples[host]
        n = len(sample.gpus)
        util = self._rng.integers(0, 101, n).tolist()
        mem = self._rng.integers(0, _FB_TOTAL, n).tolist()
        sample.time_s = time.time()
        for gpu, u, m in zip(sample.gpus, util, mem, strict=True):
            gpu.gpu_utilization_percent = u
            gpu.memory_utilization_percent = u // 2
            gpu.fb_used_bytes = m
            gpu.power_watts = 60.0 + 6.4 * u
            gpu.temperature_celsius = 35 + u // 3
        pack_utilization(sample)  # as the sensing publisher does
        return sample


def _publisher(config: TelemetryLoad, js: JetStreamContext, hosts: SimulatedHosts) -> Call:
    run_id = uuid.uuid4().hex[:12]
    n = len(hosts.samples)
    kv_prefix = f"$KV.{bus.HOSTS_BUCKET}."
    counter = iter(range(config.batches))

    async def publish() -> str:
        i = next(counter)
        host, seq = i % n, i // n + 1
        sample = hosts.refresh(host)
        batch = telemetry_pb2.TelemetryBatch(samples=[sample], sequence=seq)
        try:
            acks = [
                await js.publish_async(
                    bus.telemetry_subject(sample.host),
                    batch.SerializeToString(),
                    headers={"Nats-Msg-Id": f"{sample.host}:{run_id}:{seq}"},
                )
            ]
            if config.kv:
                key = kv_prefix + bus.telemetry_key(sample.host)
                acks.append(await js.publish_async(key, sample.SerializeToString()))
            async with asyncio.timeout(config.timeout_s):
                await asyncio.gather(*acks)
        except TimeoutError:
            return "TIMEOUT"
        except NatsError as exc:
            return type(exc).__name__
        return OK

    return publish


async def _connect(url: str) -> NatsClient:
    """Connect once, without the services' endless reconnects: a load run against the wrong
    URL must fail, not wait; a connection lost mid-run shows as failed publishes."""

    async def quiet(exc: Exception) -> None:
        log.debug("nats error: %s", exc)

    try:
        return await nats.connect(
            url,
            name="ganglion-loadgen-telemetry",
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # the initial connect tries each server twice, then fails
            reconnect_time_wait=0.2,
            error_cb=quiet,
        )
    except (OSError, NatsError) as exc:
        raise TargetUnavailableError(f"cannot connect to NATS at {url}: {exc}") from exc


async def load_telemetry(config: TelemetryLoad, progress: Progress | None = None) -> LoadReport:
    """Publish ``config.batches`` batches on schedule; report acknowledgement latencies."""
    nc = await _connect(config.nats_url)
    try:
        js = nc.jetstream(publish_async_max_pending=config.max_inflight)
        await bus.ensure_streams(js)
        hosts = SimulatedHosts(config)
        rate = config.hosts * config.hz
        schedule = Schedule(time.perf_counter() + 0.05, 0.0, config.duration_s)
        tally = await open_loop(
            _publisher(config, js, hosts),
            rate,
            schedule,
            config.max_inflight,
            config.timeout_s + 1.0,
            progress,
        )
        await nc.flush(timeout=math.ceil(config.timeout_s))
    finally:
        await nc.close()
    batch_bytes = len(
        telemetry_pb2.TelemetryBatch(samples=[hosts.samples[0]], sequence=1).SerializeToString()
    )
    return LoadReport(
        target="telemetry",
        address=config.nats_url,
        mode="open",
        rate=rate,
        concurrency=config.max_inflight,
        duration_s=config.duration_s,
        warmup_s=0.0,
        sent=tally.sent,
        completed=tally.completed,
        ok=tally.ok,
        errors=dict(tally.errors),
        unfinished=tally.unfinished,
        achieved_per_s=tally.completed_in_window / config.duration_s,
        latency=LatencySummary.of(tally.histogram),
        histogram=tally.histogram.encode().decode("ascii"),
        params={
            "gpus": config.gpus,
            "hosts": config.hosts,
            "gpus_per_host": config.gpus_per_host,
            "hz": config.hz,
            "kv": int(config.kv),
            "batch_bytes": batch_bytes,
        },
    )
