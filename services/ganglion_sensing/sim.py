"""Simulated GPUs whose load follows what the executor runs.

The collector listens (core NATS, no consumer: it only needs events from now on) to
``ganglion.events.<host>``. A ``JobEvent`` in state RUNNING marks its GPUs busy with that job;
a terminal state frees every GPU the job held. Busy GPUs report high utilisation, a share of
their memory and one process per job; idle GPUs report ~0 %. Power, temperature and clocks are
simple functions of utilisation and energy integrates power, so dashboards look plausible.
Every sample says ``COLLECTOR_BACKEND_SIM``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections.abc import Callable

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ganglion import bus
from ganglion.gpus import Backend, GpuInventory
from ganglion.v1 import cluster_pb2, executor_pb2, telemetry_pb2

log = logging.getLogger(__name__)

GIB = 1 << 30
FB_TOTAL_BYTES = 80 * GIB
"""Framebuffer of a simulated GPU (an 80 GiB H100/A100)."""
FB_RESERVED_BYTES = 512 << 20
"""What the driver reserves on an idle GPU."""
IDLE_POWER_W = 70.0
MAX_POWER_W = 700.0
IDLE_SM_CLOCK_MHZ = 345
BOOST_SM_CLOCK_MHZ = 1980
MEM_CLOCK_MHZ = 2619

_TERMINAL = frozenset(
    {
        cluster_pb2.JOB_STATE_SUCCEEDED,
        cluster_pb2.JOB_STATE_FAILED,
        cluster_pb2.JOB_STATE_CANCELLED,
        cluster_pb2.JOB_STATE_PREEMPTED,
    }
)


def _job_fb_bytes(job_id: str) -> int:
    """A stable per-job memory footprint: 35-85 % of the framebuffer."""
    share = 0.35 + 0.5 * (zlib.crc32(job_id.encode()) % 1000) / 1000.0
    return int(FB_TOTAL_BYTES * share)


class SimCollector:
    """``inventory.count`` simulated GPUs of ``host``; deterministic for a given ``seed``.

    ``clock`` (Unix seconds) stamps samples and integrates energy; tests may pass their own.
    """

    def __init__(
        self,
        host: str,
        inventory: GpuInventory,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._host = host
        self._inventory = inventory
        self._rng = random.Random(seed)
        self._clock = clock
        self._lock = threading.Lock()
        # GPU index -> ids of the jobs running on it, in start order (a dict as an ordered set).
        self._jobs: list[dict[str, None]] = [{} for _ in range(inventory.count)]
        self._energy_mj: list[float] = [0.0] * inventory.count
        self._last_time: float | None = None
        self._sub: Subscription | None = None
        self._closed = False

    @property
    def backend(self) -> Backend:
        return Backend.SIM

    @property
    def gpu_count(self) -> int:
        return self._inventory.count

    async def attach(self, nc: NatsClient) -> None:
        """Follow the executor's job events for this host."""
        self._sub = await nc.subscribe(bus.events_subject(self._host), cb=self._on_msg)

    async def detach(self) -> None:
        """Stop following job events (``nc.drain()`` does this too)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = executor_pb2.JobEvent.FromString(msg.data)
        except DecodeError:
            log.warning("dropping a malformed JobEvent on %s", msg.subject)
            return
        self.apply_event(event)

    def apply_event(self, event: executor_pb2.JobEvent) -> None:
        """Update which GPUs are busy from one job event."""
        if self._closed or (event.host and event.host != self._host):
            return
        with self._lock:
            if event.state == cluster_pb2.JOB_STATE_RUNNING:
                for index in event.gpu_indices:
                    if index >= len(self._jobs):
                        log.warning(
                            "job %s names GPU %d, host has %d simulated GPUs",
                            event.job_id,
                            index,
                            len(self._jobs),
                        )
                        continue
                    self._jobs[index][event.job_id] = None
            elif event.state in _TERMINAL:
                for jobs in self._jobs:
                    jobs.pop(event.job_id, None)

    def busy_jobs(self) -> list[tuple[str, ...]]:
        """Per GPU index, the jobs the simulator believes run on it."""
        with self._lock:
            return [tuple(jobs) for jobs in self._jobs]

    def _gpu(self, index: int, dt: float) -> telemetry_pb2.GpuSample:
        rng = self._rng
        jobs = tuple(self._jobs[index])
        if jobs:
            util = rng.randint(85, 99)
            mem_util = rng.randint(30, 60)
            sm_clock = BOOST_SM_CLOCK_MHZ - rng.randint(0, 45)
            tx, rx = rng.randint(200_000, 2_000_000), rng.randint(200_000, 2_000_000)
        else:
            util, mem_util, sm_clock = 0, 0, IDLE_SM_CLOCK_MHZ
            tx, rx = rng.randint(0, 500), rng.randint(0, 500)
        job_fb = [min(_job_fb_bytes(job), FB_TOTAL_BYTES - FB_RESERVED_BYTES) for job in jobs]
        fb_used = min(FB_TOTAL_BYTES, FB_RESERVED_BYTES + sum(job_fb))
        power = IDLE_POWER_W + (MAX_POWER_W - IDLE_POWER_W) * util / 100.0 + rng.uniform(-5.0, 5.0)
        self._energy_mj[index] += power * dt * 1000.0
        return telemetry_pb2.GpuSample(
            uuid=self._inventory.uuids[index],
            index=index,
            name=self._inventory.names[index],
            gpu_utilization_percent=util,
            memory_utilization_percent=mem_util,
            fb_used_bytes=fb_used,
            fb_total_bytes=FB_TOTAL_BYTES,
            power_watts=round(power, 3),
            energy_millijoules=int(self._energy_mj[index]),
            temperature_celsius=int(32 + 0.4 * util),
            sm_clock_mhz=sm_clock,
            mem_clock_mhz=MEM_CLOCK_MHZ,
            pcie_tx_kbps=tx,
            pcie_rx_kbps=rx,
            ecc_corrected=0,
            ecc_uncorrected=0,
            last_xid=0,
            # A JobEvent carries no pid, so the simulator reports 0 (unknown) for it.
            processes=[telemetry_pb2.GpuProcess(pid=0, used_memory_bytes=used) for used in job_fb],
        )

    def sample(self) -> telemetry_pb2.HostSample:
        with self._lock:
            now = self._clock()
            dt = 0.0 if self._last_time is None else max(0.0, now - self._last_time)
            self._last_time = now
            return telemetry_pb2.HostSample(
                host=self._host,
                backend=telemetry_pb2.COLLECTOR_BACKEND_SIM,
                time_s=now,
                driver_version=self._inventory.driver_version,
                gpus=[self._gpu(i, dt) for i in range(len(self._jobs))],
            )

    def close(self) -> None:
        """Ignore further events; the subscription ends with :meth:`detach` or ``nc.drain()``."""
        self._closed = True
