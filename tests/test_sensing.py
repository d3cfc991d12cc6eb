"""The sensing service: simulated and NVML collectors, the publisher, /metrics, the CLI.

NATS is always a real nats-server (the ``nats_server``/``nc`` fixtures); only NVML, which needs
an NVIDIA driver this machine lacks, is replaced by monkeypatched ``pynvml`` functions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from nats.aio.client import Client as NatsClient

from ganglion import bus
from ganglion.bus import NatsServer
from ganglion.gpus import sim_inventory
from ganglion.v1 import cluster_pb2, executor_pb2, telemetry_pb2
from ganglion_sensing.collectors import NvmlCollector, make_collector
from ganglion_sensing.config import SensingConfig, parse_args
from ganglion_sensing.metrics import MetricsServer
from ganglion_sensing.publisher import LatestSample, Publisher, PublisherConfig
from ganglion_sensing.service import serve
from ganglion_sensing.sim import SimCollector

TIMEOUT = 5.0


async def eventually(predicate: Callable[[], bool], within_s: float = TIMEOUT) -> None:
    """Poll ``predicate`` until true; fail after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(0.02)


async def publish_event(
    nc: NatsClient, host: str, job: str, state: cluster_pb2.JobState.ValueType, gpus: list[int]
) -> None:
    event = executor_pb2.JobEvent(
        job_id=job, host=host, state=state, gpu_indices=gpus, time_s=time.time()
    )
    await nc.publish(bus.events_subject(host), event.SerializeToString())
    await nc.flush(timeout=int(TIMEOUT))


async def http_get(url: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return str(resp.read().decode())

    return await asyncio.wait_for(asyncio.to_thread(fetch), TIMEOUT + 1)


# --- simulated collector -------------------------------------------------------------------


async def test_sim_gpus_follow_job_events(nc: NatsClient) -> None:
    sim = SimCollector("node-a", sim_inventory("node-a", 4), seed=7)
    await asyncio.wait_for(sim.attach(nc), TIMEOUT)

    idle = sim.sample()
    assert idle.backend == telemetry_pb2.COLLECTOR_BACKEND_SIM
    assert [g.uuid for g in idle.gpus] == [f"SIM-node-a-{i}" for i in range(4)]
    assert all(g.gpu_utilization_percent < 5 and not g.processes for g in idle.gpus)

    await publish_event(nc, "node-a", "job-1", cluster_pb2.JOB_STATE_RUNNING, [1])
    await eventually(lambda: sim.busy_jobs()[1] == ("job-1",))
    busy = sim.sample()
    gpu1 = busy.gpus[1]
    assert gpu1.gpu_utilization_percent > 50
    assert len(gpu1.processes) == 1 and gpu1.processes[0].used_memory_bytes > 0
    assert gpu1.fb_used_bytes > idle.gpus[1].fb_used_bytes
    assert gpu1.power_watts > idle.gpus[1].power_watts
    for i in (0, 2, 3):
        assert busy.gpus[i].gpu_utilization_percent < 5 and not busy.gpus[i].processes

    await publish_event(nc, "node-a", "job-1", cluster_pb2.JOB_STATE_SUCCEEDED, [1])
    await eventually(lambda: sim.busy_jobs()[1] == ())
    freed = sim.sample()
    assert freed.gpus[1].gpu_utilization_percent < 5 and not freed.gpus[1].processes
    assert freed.gpus[1].energy_millijoules >= busy.gpus[1].energy_millijoules
    await asyncio.wait_for(sim.detach(), TIMEOUT)
    sim.close()


def test_sim_ignores_other_hosts_and_unknown_gpus() -> None:
    sim = SimCollector("node-a", sim_inventory("node-a", 2))
    running = cluster_pb2.JOB_STATE_RUNNING
    sim.apply_event(
        executor_pb2.JobEvent(job_id="x", host="node-b", state=running, gpu_indices=[0])
    )
    sim.apply_event(
        executor_pb2.JobEvent(job_id="y", host="node-a", state=running, gpu_indices=[5])
    )
    assert sim.busy_jobs() == [(), ()]


def test_sim_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[telemetry_pb2.HostSample]:
        ticks = iter(range(100, 200))
        sim = SimCollector("h", sim_inventory("h", 2), seed=seed, clock=lambda: float(next(ticks)))
        sim.apply_event(
            executor_pb2.JobEvent(job_id="j", state=cluster_pb2.JOB_STATE_RUNNING, gpu_indices=[0])
        )
        return [sim.sample() for _ in range(3)]

    assert run(3) == run(3)
    energies = [s.gpus[0].energy_millijoules for s in run(3)]
    assert energies[0] == 0 and energies[0] < energies[1] < energies[2]


# --- publisher ------------------------------------------------------------------------------


async def test_publisher_survives_nats_outage(nats_server: NatsServer, nc: NatsClient) -> None:
    js = nc.jetstream()
    kv = await asyncio.wait_for(js.key_value(bus.HOSTS_BUCKET), TIMEOUT)
    sim = SimCollector("node-o", sim_inventory("node-o", 1))
    publisher = Publisher(
        PublisherConfig("node-o", interval_s=0.1, publish_timeout_s=0.3), sim, js, kv
    )
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        await eventually(lambda: publisher.published >= 1)
        await asyncio.to_thread(nats_server.stop)
        failures = publisher.failures
        await eventually(lambda: publisher.failures > failures)
        assert not task.done()
        await asyncio.wait_for(asyncio.to_thread(nats_server.start), TIMEOUT + 5)
        published = publisher.published
        await eventually(lambda: publisher.published > published, within_s=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    msg = await asyncio.wait_for(
        js.get_last_msg(bus.TELEMETRY_STREAM, bus.telemetry_subject("node-o")), TIMEOUT
    )
    assert telemetry_pb2.TelemetryBatch.FromString(msg.data or b"").sequence > 1


def test_publisher_config_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        PublisherConfig("h", interval_s=0)


# --- the service, in process ----------------------------------------------------------------


async def test_serve_publishes_telemetry_kv_and_metrics(
    nats_server: NatsServer, nc: NatsClient, capsys: pytest.CaptureFixture[str]
) -> None:
    host = "node-s"
    config = SensingConfig(
        host=host, backend="sim", sim_gpus=2, interval_s=0.1, metrics_port=0, seed=1
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop, nats_url=nats_server.url))
    js = nc.jetstream()
    try:
        out: list[str] = []

        def ready() -> bool:
            out.append(capsys.readouterr().out)
            return "metrics=" in "".join(out)

        await eventually(ready)
        line = "".join(out).strip().splitlines()[-1]
        match = re.fullmatch(
            rf"ganglion-sensing {host} backend=sim gpus=2 metrics=(http://127\.0\.0\.1:\d+/metrics)",
            line,
        )
        assert match, line

        await publish_event(nc, host, "job-7", cluster_pb2.JOB_STATE_RUNNING, [0])
        last: dict[str, Any] = {}

        async def busy_batch_arrived() -> bool:
            try:
                msg = await js.get_last_msg(bus.TELEMETRY_STREAM, bus.telemetry_subject(host))
            except Exception:
                return False
            last["msg"] = msg
            batch = telemetry_pb2.TelemetryBatch.FromString(msg.data or b"")
            return batch.samples[0].gpus[0].gpu_utilization_percent > 50

        deadline = time.monotonic() + TIMEOUT
        while not await asyncio.wait_for(busy_batch_arrived(), TIMEOUT):
            assert time.monotonic() < deadline, "no telemetry batch showing the job's GPU busy"
            await asyncio.sleep(0.05)

        msg = last["msg"]
        batch = telemetry_pb2.TelemetryBatch.FromString(msg.data)
        assert batch.sequence >= 1 and len(batch.samples) == 1
        assert all(s.backend == telemetry_pb2.COLLECTOR_BACKEND_SIM for s in batch.samples)
        assert batch.samples[0].host == host
        assert batch.samples[0].gpus[1].gpu_utilization_percent < 5
        assert re.fullmatch(rf"{host}:[0-9a-f]+:{batch.sequence}", msg.headers["Nats-Msg-Id"])

        kv = await asyncio.wait_for(js.key_value(bus.HOSTS_BUCKET), TIMEOUT)
        entry = await asyncio.wait_for(kv.get(bus.telemetry_key(host)), TIMEOUT)
        latest = telemetry_pb2.HostSample.FromString(entry.value or b"")
        assert latest.host == host and latest.backend == telemetry_pb2.COLLECTOR_BACKEND_SIM
        assert len(latest.gpus) == 2
        # The packed column the controller reads holds the same readings.
        assert list(latest.gpu_utilization_by_index) == [
            float(g.gpu_utilization_percent) for g in latest.gpus
        ]

        text = await http_get(match.group(1))
        assert "DCGM_FI_DEV_GPU_UTIL{" in text
        assert f'Hostname="{host}"' in text and f'UUID="SIM-{host}-0"' in text
        assert 'gpu="1"' in text and 'backend="sim"' in text
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


# --- /metrics --------------------------------------------------------------------------------


def _sample() -> telemetry_pb2.HostSample:
    gpu = telemetry_pb2.GpuSample(
        uuid="GPU-abc",
        index=0,
        name="NVIDIA H100 80GB HBM3",
        gpu_utilization_percent=93,
        memory_utilization_percent=40,
        fb_used_bytes=3 << 30,
        fb_total_bytes=80 << 30,
        energy_millijoules=12345,
        temperature_celsius=61,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        pcie_tx_kbps=1000,
        pcie_rx_kbps=2000,
        ecc_corrected=1,
        ecc_uncorrected=0,
        last_xid=79,
    )  # power_watts deliberately unset
    return telemetry_pb2.HostSample(
        host="gpu-07", backend=telemetry_pb2.COLLECTOR_BACKEND_NVML, gpus=[gpu]
    )


async def test_metrics_use_dcgm_names_and_labels() -> None:
    latest = LatestSample()
    server = MetricsServer(latest.get, port=0, addr="127.0.0.1")
    try:
        assert "DCGM_FI" not in await http_get(server.url)  # nothing before the first sample
        latest.set(_sample())
        text = await http_get(server.url)
    finally:
        server.close()
    labels = (
        'Hostname="gpu-07",UUID="GPU-abc",backend="nvml",gpu="0",modelName="NVIDIA H100 80GB HBM3"'
    )
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("DCGM_FI_")
    }
    assert f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} 93.0" in text
    assert values["DCGM_FI_DEV_FB_USED"] == 3 * 1024
    assert values["DCGM_FI_DEV_FB_FREE"] == 77 * 1024
    assert values["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == 12345
    assert values["DCGM_FI_DEV_XID_ERRORS"] == 79
    assert values["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"] == 1
    for name in (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_SM_CLOCK",
        "DCGM_FI_DEV_MEM_CLOCK",
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    ):
        assert name in values
    assert "DCGM_FI_DEV_POWER_USAGE" not in text  # unset: omitted, not 0


# --- NVML -----------------------------------------------------------------------------------


def _not_supported(*_: object) -> Any:
    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


@pytest.fixture
def fake_nvml() -> dict[str, Callable[..., Any]]:
    """A one-GPU NVML, as pynvml function replacements.

    Monkeypatching pynvml is the seam for a driver this machine lacks (no mock of NATS or of
    our code); tests override single functions in the dict, then ``_nvml_sample`` installs them.
    """
    return {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: f"handle-{i}",
        "nvmlDeviceGetUUID": lambda h: "GPU-1234",
        "nvmlDeviceGetName": lambda h: b"NVIDIA H100 80GB HBM3",
        "nvmlSystemGetDriverVersion": lambda: "570.86.15",
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=77, memory=33),
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=2 << 30, total=80 << 30),
        "nvmlDeviceGetPowerUsage": lambda h: 312_500,
        "nvmlDeviceGetTotalEnergyConsumption": lambda h: 9_000_000,
        "nvmlDeviceGetTemperature": lambda h, sensor: 55,
        "nvmlDeviceGetClockInfo": lambda h, clock: {
            pynvml.NVML_CLOCK_SM: 1755,
            pynvml.NVML_CLOCK_MEM: 2619,
        }[clock],
        "nvmlDeviceGetPcieThroughput": lambda h, counter: 100 + counter,
        "nvmlDeviceGetTotalEccErrors": lambda h, kind, counter: 0,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [
            SimpleNamespace(pid=4242, usedGpuMemory=1 << 30),
            SimpleNamespace(pid=4343, usedGpuMemory=None),
        ],
        "nvmlEventSetCreate": lambda: "event-set",
        "nvmlDeviceRegisterEvents": _not_supported,
        "nvmlEventSetWait": lambda s, timeout: (_ for _ in ()).throw(
            pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        ),
        "nvmlEventSetFree": lambda s: None,
    }


def _nvml_sample(
    fns: dict[str, Callable[..., Any]], monkeypatch: pytest.MonkeyPatch
) -> telemetry_pb2.HostSample:
    for name, fn in fns.items():
        monkeypatch.setattr(pynvml, name, fn)
    collector = NvmlCollector("gpu-07")
    try:
        return collector.sample()
    finally:
        collector.close()


def test_nvml_not_supported_metric_is_left_unset(
    fake_nvml: dict[str, Callable[..., Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml["nvmlDeviceGetPowerUsage"] = _not_supported
    sample = _nvml_sample(fake_nvml, monkeypatch)
    assert sample.backend == telemetry_pb2.COLLECTOR_BACKEND_NVML
    gpu = sample.gpus[0]
    assert gpu.HasField("power_watts") is False
    assert gpu.HasField("last_xid") is False  # XID registration NotSupported
    assert (gpu.uuid, gpu.name) == ("GPU-1234", "NVIDIA H100 80GB HBM3")
    assert gpu.gpu_utilization_percent == 77 and gpu.memory_utilization_percent == 33
    assert gpu.fb_used_bytes == 2 << 30 and gpu.energy_millijoules == 9_000_000
    assert (gpu.sm_clock_mhz, gpu.mem_clock_mhz, gpu.temperature_celsius) == (1755, 2619, 55)
    assert (gpu.pcie_tx_kbps, gpu.pcie_rx_kbps) == (100, 101)
    assert gpu.HasField("ecc_corrected") and gpu.HasField("ecc_uncorrected")
    assert [(p.pid, p.used_memory_bytes) for p in gpu.processes] == [(4242, 1 << 30), (4343, 0)]


def test_nvml_reports_power_and_last_xid(
    fake_nvml: dict[str, Callable[..., Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [SimpleNamespace(eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=79)]

    def wait(event_set: object, timeout_ms: int) -> Any:
        assert timeout_ms == 0  # never blocks the sampling thread
        if events:
            return events.pop()
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    fake_nvml["nvmlDeviceRegisterEvents"] = lambda h, kinds, s: None
    fake_nvml["nvmlEventSetWait"] = wait
    gpu = _nvml_sample(fake_nvml, monkeypatch).gpus[0]
    assert gpu.power_watts == pytest.approx(312.5)
    assert gpu.last_xid == 79


def test_auto_backend_without_driver_falls_back_to_sim(caplog: pytest.LogCaptureFixture) -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present: auto picks NVML here")
    with caplog.at_level(logging.WARNING):
        collector = make_collector("auto", "node-z", 3)
    assert isinstance(collector, SimCollector) and collector.gpu_count == 3
    assert collector.sample().backend == telemetry_pb2.COLLECTOR_BACKEND_SIM
    assert any("SIMULATED" in r.getMessage() for r in caplog.records)


# --- config and CLI -------------------------------------------------------------------------


def test_config_from_flags() -> None:
    config = parse_args(
        ["--host", "gpu-1.rack-2", "--backend", "sim", "--sim-gpus", "8", "--interval", "0.5"]
    )
    assert (config.host, config.backend, config.sim_gpus, config.interval_s) == (
        "gpu-1.rack-2",
        "sim",
        8,
        0.5,
    )
    assert (config.metrics_port, config.metrics_addr) == (9400, "127.0.0.1")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--interval", "0"], "must be a finite number > 0"),
        (["--interval", "soon"], "not a number"),
        (["--sim-gpus", "-1"], "must be >= 0"),
        (["--metrics-port", "70000"], "0..65535"),
        (["--backend", "cuda"], "invalid choice"),
        (["--host", "a b"], "host must be"),
        (["--host", "node.*"], "host must be"),
    ],
)
def test_bad_flags_exit_with_reason(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert reason in capsys.readouterr().err


async def test_cli_prints_ready_line_and_stops_on_sigterm(nats_server: NatsServer) -> None:
    env = {**os.environ, bus.ENV_NATS_URL: nats_server.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ganglion_sensing",
        "--host",
        "node-cli",
        "--backend",
        "sim",
        "--sim-gpus",
        "2",
        "--metrics-port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert re.fullmatch(
            r"ganglion-sensing node-cli backend=sim gpus=2 metrics=http://127\.0\.0\.1:\d+/metrics\n",
            line,
        ), line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), TIMEOUT)


def test_a_taken_metrics_port_is_named_in_the_error() -> None:
    taken = MetricsServer(lambda: None, port=0, addr="127.0.0.1")
    try:
        with pytest.raises(OSError, match=rf"metrics on 127\.0\.0\.1:{taken.port}: "):
            MetricsServer(lambda: None, port=taken.port, addr="127.0.0.1")
    finally:
        taken.close()
