"""Which GPUs this host has: NVML when a driver is present, simulated GPUs otherwise.

``--backend auto`` tries NVML and falls back to simulated GPUs only when the NVML library or
the driver is missing (``NVMLError_LibraryNotFound`` / ``NVMLError_DriverNotLoaded``), with a
log line; any other NVML error is real and is raised. Simulated GPUs are labelled as such
everywhere (``backend`` here, ``COLLECTOR_BACKEND_SIM`` in every sample).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Backend(enum.Enum):
    NVML = "nvml"
    SIM = "sim"


@dataclass(frozen=True)
class GpuInventory:
    backend: Backend
    uuids: tuple[str, ...]
    names: tuple[str, ...]
    driver_version: str

    @property
    def count(self) -> int:
        return len(self.uuids)

    def visible_devices(self, indices: tuple[int, ...]) -> str:
        """``CUDA_VISIBLE_DEVICES`` for a job: UUIDs on NVML hosts, indices of simulated GPUs."""
        if self.backend is Backend.NVML:
            return ",".join(self.uuids[i] for i in indices)
        return ",".join(str(i) for i in indices)


def sim_uuid(host: str, index: int) -> str:
    return f"SIM-{host}-{index}"


def sim_inventory(host: str, count: int) -> GpuInventory:
    if count < 0:
        raise ValueError(f"simulated GPU count must be >= 0, got {count}")
    return GpuInventory(
        Backend.SIM,
        tuple(sim_uuid(host, i) for i in range(count)),
        tuple("Simulated GPU" for _ in range(count)),
        "sim",
    )


def _nvml_inventory() -> GpuInventory:
    import pynvml

    pynvml.nvmlInit()
    try:
        n = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        uuids = tuple(str(pynvml.nvmlDeviceGetUUID(h)) for h in handles)
        names = tuple(str(pynvml.nvmlDeviceGetName(h)) for h in handles)
        driver = str(pynvml.nvmlSystemGetDriverVersion())
    finally:
        pynvml.nvmlShutdown()
    return GpuInventory(Backend.NVML, uuids, names, driver)


def nvml_unavailable(exc: BaseException) -> bool:
    """True for the NVML errors that mean "no NVIDIA driver here" (fall back to sim)."""
    import pynvml

    return isinstance(exc, pynvml.NVMLError_LibraryNotFound | pynvml.NVMLError_DriverNotLoaded)


class NvmlUnavailableError(OSError):
    """``backend="nvml"`` on a host where NVML cannot start (no driver or no library): an
    ``OSError``, so a service started that way exits with this one line (``rpc``)."""


def discover(backend: str, host: str, sim_gpus: int) -> GpuInventory:
    """GPUs for ``--backend auto|nvml|sim``; ``sim_gpus`` is the simulated count.
    :class:`NvmlUnavailableError` for ``nvml`` where there is no NVIDIA driver."""
    if backend == "sim":
        return sim_inventory(host, sim_gpus)
    if backend not in ("auto", "nvml"):
        raise ValueError(f"backend must be auto, nvml or sim, got {backend!r}")
    try:
        return _nvml_inventory()
    except Exception as exc:
        if backend == "auto" and nvml_unavailable(exc):
            log.warning(
                "NVML unavailable (%s): using %d SIMULATED GPUs",
                type(exc).__name__,
                sim_gpus,
                extra={"backend": "sim"},
            )
            return sim_inventory(host, sim_gpus)
        if nvml_unavailable(exc):
            raise NvmlUnavailableError(
                f"backend nvml: NVML cannot start here ({type(exc).__name__}: {exc}); "
                "use auto (simulated GPUs where there is no driver) or sim"
            ) from exc
        raise
