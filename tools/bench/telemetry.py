"""Telemetry ingest: the hosts KV bucket into the controller's cluster state, against a raw
nats-py subscriber reading the same messages.

The bucket holds one executor registration and one latest ``HostSample`` (8 simulated GPUs)
per host, as sensing and the executors leave it. Measured path: the controller's
``HostDirectory`` follows the bucket from a fresh start (an ordered consumer, last value per
key, each entry decoded once into what a round reads) and the scheduling loop builds its
``ClusterState`` from it (``SchedulingLoop.cluster_state``, utilisation included). Baseline:
a plain nats-py JetStream subscription with the same consumer settings that only counts the
messages. Ratio = updates/s of the path over updates/s of the raw subscriber (target >= 0.6).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from ganglion import bus
from ganglion.loadgen import SimulatedHosts, TelemetryLoad
from ganglion.v1 import executor_pb2
from ganglion_controller.config import ControllerConfig
from ganglion_controller.hosts import HostDirectory
from ganglion_controller.jobs import JobTable
from ganglion_controller.loop import SchedulingLoop
from tools.bench.harness import Row, row, verdict

GPUS_PER_HOST = 8
WAIT_S = 120.0


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    del out_dir  # no plot: one number each
    # Each pass takes well under a second; many interleaved passes let both sides find a quiet
    # moment on a shared machine (noise only ever slows a pass down, so the best counts).
    return asyncio.run(_run(hosts=512 if quick else 4096, repeats=2 if quick else 7))


class _CountingDirectory(HostDirectory):
    """The controller's directory, plus a counter telling when the expected entries are in."""

    def __init__(self, kv: KeyValue, expect: int) -> None:
        super().__init__(kv, stale_s=3600.0)
        self.expect = expect
        self.seen = 0
        self.done = asyncio.Event()

    # Counted in the synchronous per-entry handlers: a counter wrapped around the async
    # message callback would add a coroutine per message that the controller never pays.
    def _on_executor(self, host: str, value: bytes | None) -> None:
        super()._on_executor(host, value)
        self._count()

    def _on_telemetry(self, host: str, value: bytes | None) -> None:
        super()._on_telemetry(host, value)
        self._count()

    def _count(self) -> None:
        self.seen += 1
        if self.seen >= self.expect:
            self.done.set()


async def _fill(js: JetStreamContext, hosts: int) -> None:
    """One registration and one telemetry sample per host, as the services write them."""
    sim = SimulatedHosts(TelemetryLoad(nats_url="", gpus=hosts * GPUS_PER_HOST))
    prefix = f"$KV.{bus.HOSTS_BUCKET}."
    acks = []
    for i, sample in enumerate(sim.samples):
        info = executor_pb2.ExecutorInfo(
            host=sample.host,
            address=f"127.0.0.1:{20000 + i}",
            gpu_count=len(sample.gpus),
            time_s=time.time(),
        )
        key = bus.executor_key(sample.host)
        acks.append(await js.publish_async(prefix + key, info.SerializeToString()))
        key = bus.telemetry_key(sample.host)
        acks.append(await js.publish_async(prefix + key, sim.refresh(i).SerializeToString()))
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*acks)


async def _through_directory(js: JetStreamContext, kv: KeyValue, hosts: int) -> float:
    """Seconds from a fresh directory to a cluster state with every host's utilisation."""
    directory = _CountingDirectory(kv, 2 * hosts)
    loop = SchedulingLoop(ControllerConfig(), JobTable(js), directory)
    started = time.perf_counter()
    await directory.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await directory.done.wait()
        state = loop.cluster_state(directory.live())
        elapsed = time.perf_counter() - started
    finally:
        await _stop(directory)
        await loop.close()
    known = int((state.gpu_utilization >= 0).sum())
    if state.num_gpus != hosts * GPUS_PER_HOST or known != state.num_gpus:
        raise RuntimeError(f"cluster state has {state.num_gpus} GPUs, {known} with utilisation")
    return elapsed


async def _stop(directory: HostDirectory) -> None:
    async with asyncio.timeout(30.0):
        await directory.stop()


async def _raw(js: JetStreamContext, hosts: int) -> float:
    """Seconds for a counting subscriber with the directory's settings to get every entry."""
    done = asyncio.Event()
    seen = 0

    async def count(msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= 2 * hosts:
            done.set()

    started = time.perf_counter()
    sub = await js.subscribe(
        f"$KV.{bus.HOSTS_BUCKET}.>",
        stream=f"KV_{bus.HOSTS_BUCKET}",
        cb=count,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        inactive_threshold=300.0,
    )
    try:
        async with asyncio.timeout(WAIT_S):
            await done.wait()
        return time.perf_counter() - started
    finally:
        await sub.unsubscribe()


async def _run(hosts: int, repeats: int) -> list[Row]:
    with bus.NatsServer() as server:
        nc = await bus.connect(server.url, "bench-telemetry")
        try:
            js = nc.jetstream()
            kv = await bus.ensure_streams(js)
            await _fill(js, hosts)
            t_path, t_raw = float("inf"), float("inf")
            for _ in range(repeats):  # interleaved; the best of each counts
                t_raw = min(t_raw, await _raw(js, hosts))
                t_path = min(t_path, await _through_directory(js, kv, hosts))
        finally:
            await nc.close()
    updates = 2 * hosts
    ratio = t_raw / t_path
    return [
        row(
            f"telemetry ingest into cluster state vs raw nats-py subscriber "
            f"({hosts} hosts, {hosts * GPUS_PER_HOST} GPUs)",
            updates / t_path,
            "KV updates/s",
            updates / t_raw,
            "KV updates/s",
            ratio,
            f"{verdict(ratio, 0.6)}; HostDirectory + SchedulingLoop.cluster_state, "
            f"{t_path * 1000:.0f} ms vs {t_raw * 1000:.0f} ms for {updates} entries",
        )
    ]
