"""Prometheus ``/metrics`` in dcgm-exporter's vocabulary, from the latest sample.

Dashboards and alerts written for dcgm-exporter work unchanged: same metric names, same units
(framebuffer in MiB, power in W, energy in mJ) and the same ``gpu``/``UUID``/``Hostname``/
``modelName`` labels, plus ``backend`` (``nvml`` or ``sim``) so simulated GPUs are visibly
labelled. A metric missing from the sample (NVML NotSupported) is omitted, not reported as 0.

Every family is exposed as a gauge: prometheus_client renames counters to ``<name>_total``,
which would break dcgm-exporter's names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PromCollector

from ganglion.v1 import telemetry_pb2

log = logging.getLogger(__name__)

MIB = 1 << 20
LABELS = ("gpu", "UUID", "Hostname", "modelName", "backend")

_BACKEND_LABEL = {
    telemetry_pb2.COLLECTOR_BACKEND_NVML: "nvml",
    telemetry_pb2.COLLECTOR_BACKEND_SIM: "sim",
}


@dataclass(frozen=True)
class _Field:
    """How one dcgm-exporter metric reads from a ``GpuSample``."""

    name: str
    """The dcgm-exporter metric name."""
    help: str
    """HELP text (dcgm-exporter's wording and unit)."""
    value: Callable[[telemetry_pb2.GpuSample], float | None]
    """The value, or None when the sample lacks it."""


def _opt(field: str, scale: float = 1.0) -> Callable[[telemetry_pb2.GpuSample], float | None]:
    def read(gpu: telemetry_pb2.GpuSample) -> float | None:
        return float(getattr(gpu, field)) * scale if gpu.HasField(field) else None  # type: ignore[arg-type]

    return read


def _fb_free_mib(gpu: telemetry_pb2.GpuSample) -> float | None:
    if gpu.HasField("fb_total_bytes") and gpu.HasField("fb_used_bytes"):
        return max(0, gpu.fb_total_bytes - gpu.fb_used_bytes) / MIB
    return None


FIELDS: tuple[_Field, ...] = (
    _Field("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", _opt("gpu_utilization_percent")),
    _Field(
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        _opt("memory_utilization_percent"),
    ),
    _Field(
        "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", _opt("fb_used_bytes", 1 / MIB)
    ),
    _Field("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", _fb_free_mib),
    _Field("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", _opt("power_watts")),
    _Field(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        _opt("energy_millijoules"),
    ),
    _Field("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", _opt("temperature_celsius")),
    _Field("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", _opt("sm_clock_mhz")),
    _Field("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", _opt("mem_clock_mhz")),
    _Field(
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        "PCIe TX throughput (in KB/s).",
        _opt("pcie_tx_kbps"),
    ),
    _Field(
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        "PCIe RX throughput (in KB/s).",
        _opt("pcie_rx_kbps"),
    ),
    _Field(
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "Total number of single-bit volatile ECC errors.",
        _opt("ecc_corrected"),
    ),
    _Field(
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "Total number of double-bit volatile ECC errors.",
        _opt("ecc_uncorrected"),
    ),
    _Field(
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        _opt("last_xid"),
    ),
)


class SampleCollector(PromCollector):
    """Renders whatever sample ``latest()`` returns at scrape time (nothing before the first)."""

    def __init__(self, latest: Callable[[], telemetry_pb2.HostSample | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        sample = self._latest()
        if sample is None:
            return
        backend = _BACKEND_LABEL.get(sample.backend, "unspecified")
        families = [GaugeMetricFamily(f.name, f.help, labels=LABELS) for f in FIELDS]
        for gpu in sample.gpus:
            labels = [str(gpu.index), gpu.uuid, sample.host, gpu.name, backend]
            for field, family in zip(FIELDS, families, strict=True):
                value = field.value(gpu)
                if value is not None:
                    family.add_metric(labels, value)
        yield from (family for family in families if family.samples)


class MetricsServer:
    """``/metrics`` over HTTP in a daemon thread, from its own registry (not the global one)."""

    def __init__(
        self,
        latest: Callable[[], telemetry_pb2.HostSample | None],
        port: int = 9400,
        addr: str = "127.0.0.1",
    ) -> None:
        """Start serving; ``port=0`` picks a free port (see :attr:`port`)."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SampleCollector(latest))
        try:
            server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:  # the message alone does not say which address
            raise OSError(exc.errno, f"metrics on {addr}:{port}: {exc.strerror}") from exc
        self._server: WSGIServer | None = server
        self.addr = addr
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=5)
