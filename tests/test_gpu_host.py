"""Paths that need a real NVIDIA GPU: NVML sensing, UUID-pinned jobs, CUDA inference.

On a host without an NVIDIA driver (CI, the development machines) the GPU tests skip with a
message; the device-selection checks at the bottom run everywhere. Run them on a GPU host
with ``make test ARGS="tests/test_gpu_host.py"``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pynvml
import pytest
import torch

from ganglion.bus import NatsServer
from ganglion.gpus import Backend, NvmlUnavailableError, discover
from ganglion.models.registry import default_registry
from ganglion.rl.features import FEATURES
from ganglion.rl.model import DEVICE_ENV, ScoringModel, resolve_device
from ganglion.v1 import executor_pb2, telemetry_pb2
from ganglion_executor import ExecutorConfig
from ganglion_sensing.collectors import NvmlCollector, make_collector
from tests.test_executor import RUNNING, SUCCEEDED, assignment, running_executor, wait_for_job


def _has_driver() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


needs_gpu = pytest.mark.skipif(not _has_driver(), reason="no NVIDIA driver on this machine")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no CUDA device (CPU build or no GPU)"
)

# A job that reports what CUDA shows it and then holds 512 MiB on its GPU until told to stop.
CUDA_PROBE = """
import json, os, sys, time, torch
out, stop = sys.argv[1], sys.argv[2]
n = torch.cuda.device_count()
held = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda:0") if n else None
json.dump({"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": n,
           "name": torch.cuda.get_device_name(0) if n else "", "pid": os.getpid()},
          open(out + ".tmp", "w"))
os.replace(out + ".tmp", out)
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture
def collector() -> Iterator[NvmlCollector]:
    c = NvmlCollector("gpu-host")
    try:
        yield c
    finally:
        c.close()


@needs_gpu
def test_nvml_collector_reads_every_gpu(collector: NvmlCollector) -> None:
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    sample = collector.sample()
    assert sample.backend == telemetry_pb2.COLLECTOR_BACKEND_NVML and sample.driver_version
    assert len(sample.gpus) == count == collector.gpu_count > 0
    for i, gpu in enumerate(sample.gpus):
        assert gpu.index == i and gpu.uuid.startswith(("GPU-", "MIG-")) and gpu.name
        assert gpu.fb_total_bytes > 2**30 and 0 <= gpu.fb_used_bytes <= gpu.fb_total_bytes
        assert 0 <= gpu.gpu_utilization_percent <= 100
        # Optional metrics are unset where the device does not report them, never invented.
        if gpu.HasField("temperature_celsius"):
            assert 0 < gpu.temperature_celsius < 120
        if gpu.HasField("power_watts"):
            assert 0 < gpu.power_watts < 2000
        if gpu.HasField("sm_clock_mhz"):
            assert 0 < gpu.sm_clock_mhz < 5000
    time.sleep(0.2)
    later = collector.sample()
    for a, b in zip(sample.gpus, later.gpus, strict=True):
        if a.HasField("energy_millijoules") and b.HasField("energy_millijoules"):
            assert b.energy_millijoules >= a.energy_millijoules  # a counter


@needs_gpu
def test_auto_backend_picks_nvml_and_labels_it() -> None:
    inventory = discover("auto", "gpu-host", 3)
    assert inventory.backend is Backend.NVML and inventory.driver_version != "sim"
    c = make_collector("auto", "gpu-host", 3)
    try:
        assert isinstance(c, NvmlCollector) and c.gpu_count == inventory.count
        sample = c.sample()
        assert [g.uuid for g in sample.gpus] == list(inventory.uuids)
    finally:
        c.close()


@needs_gpu
@needs_cuda
async def test_executor_pins_a_job_to_its_gpu_by_uuid_and_nvml_sees_it(
    nats_server: NatsServer, tmp_path: Path, collector: NvmlCollector
) -> None:
    """The executor hands the job its GPU's UUID; CUDA in the job sees exactly that GPU, and
    sensing sees the job's memory on it."""
    gpu = collector.gpu_count - 1  # the last GPU, so index 0 in the job differs where n > 1
    before = collector.sample().gpus[gpu].fb_used_bytes
    config = ExecutorConfig(
        host="gpu-host",
        state_dir=tmp_path / "state",
        port=0,
        backend="nvml",
        grace_s=5.0,
        stop_jobs_on_exit=True,
        poll_interval_s=0.05,
    )
    out, stop = tmp_path / "probe.json", tmp_path / "stop"
    command = [sys.executable, "-c", CUDA_PROBE, str(out), str(stop)]
    async with running_executor(config, nats_server.url) as ex:
        plan = executor_pb2.ApplyRequest(
            host="gpu-host", generation=1, assignments=[assignment("cuda", [gpu], command)]
        )
        await ex.stub.Apply(plan, timeout=10)
        await wait_for_job(ex.stub, "cuda", {RUNNING})
        deadline = time.monotonic() + 60
        while not out.exists():
            assert time.monotonic() < deadline, "the job never reported (see its log)"
            await asyncio.sleep(0.1)
        seen = json.loads(out.read_text())
        held = collector.sample().gpus[gpu]
        stop.touch()
        await wait_for_job(ex.stub, "cuda", {SUCCEEDED}, timeout_s=30)
    expected = collector.sample().gpus[gpu]
    assert seen["visible"] == expected.uuid and seen["count"] == 1
    assert seen["name"] == expected.name
    # 512 MiB tensor plus the CUDA context; other tenants of a shared GPU only add to it.
    assert held.fb_used_bytes - before >= 512 * 2**20
    # Measured on an H200 host: NVML lists the job's own pid (no pid namespace between them).
    assert seen["pid"] in [p.pid for p in held.processes]


# --- the RL model on CUDA -----------------------------------------------------------------


def _cpu_model() -> ScoringModel:
    registry = default_registry()
    ref = registry.versions_sync("scheduler")[-1]
    return ScoringModel(registry.fetch_sync(ref), device="cpu")


@needs_cuda
def test_scoring_model_on_cuda_matches_the_cpu() -> None:
    registry = default_registry()
    artifact = registry.fetch_sync(registry.versions_sync("scheduler")[-1])
    cpu, gpu = ScoringModel(artifact, device="cpu"), ScoringModel(artifact, device="cuda")
    assert gpu.device.type == "cuda" and next(gpu.net.parameters()).is_cuda
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, cpu.k, len(FEATURES))).astype(np.float32)
    mask = rng.random((64, cpu.k)) < 0.8
    mask[:, 0] = True
    (s_cpu, v_cpu), (s_gpu, v_gpu) = cpu.score(x, mask, True), gpu.score(x, mask, True)
    finite = np.isfinite(s_cpu)
    assert np.array_equal(finite, np.isfinite(s_gpu))
    np.testing.assert_allclose(s_gpu[finite], s_cpu[finite], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v_gpu, v_cpu, rtol=1e-4, atol=1e-4)


# --- device selection (runs everywhere) ---------------------------------------------------


def test_device_defaults_to_cpu_and_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device().type == "cpu"
    assert _cpu_model().device.type == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_or_absent_devices_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu-please")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        monkeypatch.setenv(DEVICE_ENV, "cuda")
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device()


def test_nvml_backend_without_a_driver_says_so_in_one_error() -> None:
    if _has_driver():
        pytest.skip("this host has an NVIDIA driver: NVML starts")
    with pytest.raises(NvmlUnavailableError, match=r"backend nvml: NVML cannot start here"):
        discover("nvml", "no-gpu-host", 2)
    assert discover("auto", "no-gpu-host", 2).backend is Backend.SIM
