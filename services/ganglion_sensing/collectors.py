"""Collectors: where a host's GPU samples come from.

Two backends behind one :class:`Collector` protocol:

- :class:`NvmlCollector` reads the real devices through nvidia-ml-py (module ``pynvml``).
  A metric the device or driver does not support is left unset in the sample, never invented.
- :class:`SimCollector` (in :mod:`ganglion_sensing.sim`) simulates GPUs whose load follows the
  jobs the executor reports on ``ganglion.events.<host>``.

``sample()`` may block (NVML calls are synchronous C calls), so the publisher runs it in a
worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import pynvml
from nats.aio.client import Client as NatsClient

from ganglion import gpus
from ganglion.gpus import Backend
from ganglion.v1 import telemetry_pb2
from ganglion_sensing.sim import SimCollector

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKEND_PROTO: dict[Backend, telemetry_pb2.CollectorBackend.ValueType] = {
    Backend.NVML: telemetry_pb2.COLLECTOR_BACKEND_NVML,
    Backend.SIM: telemetry_pb2.COLLECTOR_BACKEND_SIM,
}

_MAX_EVENTS_PER_SAMPLE = 64
"""Bound on XID events drained from one GPU's event set per sample."""


class Collector(Protocol):
    """A source of :class:`telemetry_pb2.HostSample` for one host."""

    @property
    def backend(self) -> Backend:
        """Which backend produced the samples (simulated GPUs are always labelled SIM)."""
        ...

    @property
    def gpu_count(self) -> int:
        """How many GPUs every sample reports."""
        ...

    async def attach(self, nc: NatsClient) -> None:
        """Start listening on the bus, for collectors that need it (no-op otherwise)."""
        ...

    def sample(self) -> telemetry_pb2.HostSample:
        """One sample of every GPU, now. May block; safe to call from a worker thread."""
        ...

    def close(self) -> None:
        """Release the collector's resources (NVML handles, event sets)."""
        ...


def _try(fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)``, or None when NVML refuses that one metric (NotSupported, NoPermission...).

    Only NVML errors are swallowed: a metric the device cannot report is left unset, while a
    programming error still raises.
    """
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _text(value: object) -> str:
    """NVML strings are ``bytes`` in old bindings and ``str`` in new ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlCollector:
    """Real GPUs through NVML. Initialises NVML on construction; :meth:`close` shuts it down."""

    def __init__(self, host: str) -> None:
        self._host = host
        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            self._handles: list[Any] = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in self._handles]
            self._names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
            self._driver = _text(_try(pynvml.nvmlSystemGetDriverVersion) or "")
            # One event set per GPU, so an event's set tells which GPU it came from.
            self._event_sets: list[Any | None] = [self._register_xid(h) for h in self._handles]
        except BaseException:
            pynvml.nvmlShutdown()
            raise
        self._last_xid: list[int] = [0] * count

    @staticmethod
    def _register_xid(handle: Any) -> Any | None:
        """An event set with XID critical errors registered, or None where unsupported."""
        event_set = _try(pynvml.nvmlEventSetCreate)
        if event_set is None:
            return None
        try:
            pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
        except pynvml.NVMLError as exc:
            log.info("XID events unavailable on a GPU (%s): last_xid left unset", exc)
            _try(pynvml.nvmlEventSetFree, event_set)
            return None
        return event_set

    @property
    def backend(self) -> Backend:
        return Backend.NVML

    @property
    def gpu_count(self) -> int:
        return len(self._handles)

    async def attach(self, nc: NatsClient) -> None:
        """NVML needs nothing from the bus."""

    def _poll_xid(self, index: int) -> int | None:
        """Drain the GPU's pending XID events (non-blocking); the last XID seen, or None."""
        event_set = self._event_sets[index]
        if event_set is None:
            return None
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            try:
                data = pynvml.nvmlEventSetWait(event_set, 0)
            except pynvml.NVMLError:  # NVMLError_Timeout: nothing pending
                break
            if int(data.eventType) & pynvml.nvmlEventTypeXidCriticalError:
                self._last_xid[index] = int(data.eventData)
        return self._last_xid[index]

    def _gpu(self, index: int) -> telemetry_pb2.GpuSample:
        h = self._handles[index]
        gpu = telemetry_pb2.GpuSample(uuid=self._uuids[index], index=index, name=self._names[index])
        util = _try(pynvml.nvmlDeviceGetUtilizationRates, h)
        if util is not None:
            gpu.gpu_utilization_percent = int(util.gpu)
            gpu.memory_utilization_percent = int(util.memory)
        mem = _try(pynvml.nvmlDeviceGetMemoryInfo, h)
        if mem is not None:
            gpu.fb_used_bytes = int(mem.used)
            gpu.fb_total_bytes = int(mem.total)
        power_mw = _try(pynvml.nvmlDeviceGetPowerUsage, h)
        if power_mw is not None:
            gpu.power_watts = float(power_mw) / 1000.0
        energy = _try(pynvml.nvmlDeviceGetTotalEnergyConsumption, h)
        if energy is not None:
            gpu.energy_millijoules = int(energy)
        temp = _try(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU)
        if temp is not None:
            gpu.temperature_celsius = int(temp)
        sm = _try(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM)
        if sm is not None:
            gpu.sm_clock_mhz = int(sm)
        mem_clock = _try(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM)
        if mem_clock is not None:
            gpu.mem_clock_mhz = int(mem_clock)
        tx = _try(pynvml.nvmlDeviceGetPcieThroughput, h, pynvml.NVML_PCIE_UTIL_TX_BYTES)
        if tx is not None:
            gpu.pcie_tx_kbps = int(tx)
        rx = _try(pynvml.nvmlDeviceGetPcieThroughput, h, pynvml.NVML_PCIE_UTIL_RX_BYTES)
        if rx is not None:
            gpu.pcie_rx_kbps = int(rx)
        sbe = _try(
            pynvml.nvmlDeviceGetTotalEccErrors,
            h,
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        if sbe is not None:
            gpu.ecc_corrected = int(sbe)
        dbe = _try(
            pynvml.nvmlDeviceGetTotalEccErrors,
            h,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        if dbe is not None:
            gpu.ecc_uncorrected = int(dbe)
        xid = self._poll_xid(index)
        if xid is not None:
            gpu.last_xid = xid
        for proc in _try(pynvml.nvmlDeviceGetComputeRunningProcesses, h) or ():
            # usedGpuMemory is None where the driver cannot tell (e.g. WDDM, some MIG setups).
            used = proc.usedGpuMemory
            gpu.processes.add(pid=int(proc.pid), used_memory_bytes=int(used) if used else 0)
        return gpu

    def sample(self) -> telemetry_pb2.HostSample:
        return telemetry_pb2.HostSample(
            host=self._host,
            backend=telemetry_pb2.COLLECTOR_BACKEND_NVML,
            time_s=time.time(),
            driver_version=self._driver,
            gpus=[self._gpu(i) for i in range(len(self._handles))],
        )

    def close(self) -> None:
        sets, self._event_sets = self._event_sets, []
        for event_set in sets:
            if event_set is not None:
                _try(pynvml.nvmlEventSetFree, event_set)
        _try(pynvml.nvmlShutdown)


def make_collector(backend: str, host: str, sim_gpus: int, seed: int = 0) -> Collector:
    """The collector for ``--backend auto|nvml|sim``.

    ``auto`` uses NVML and falls back to ``sim_gpus`` simulated GPUs only when there is no
    NVIDIA library or driver (see :func:`ganglion.gpus.discover`); any other NVML error raises.
    """
    inventory = gpus.discover(backend, host, sim_gpus)
    if inventory.backend is Backend.SIM:
        if backend == "auto":
            log.warning(
                "sensing: no NVIDIA driver, collecting from %d SIMULATED GPUs",
                inventory.count,
                extra={"backend": "sim", "host": host},
            )
        return SimCollector(host, inventory, seed=seed)
    return NvmlCollector(host)
