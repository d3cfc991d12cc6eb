"""The job SDK: embedded leases shared by real processes, cluster mode against a running
stack, metrics into telemetry, argument errors, the example script.

Embedded tests use simulated GPUs (``backend="sim"``, labelled so by the SDK) and a state
directory per test; cluster tests run NATS, an executor (simulated GPUs) and the controller
as real processes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ganglion import AllocationError, Lease, Scheduler, bus, rpc
from ganglion.cli.stack import LocalStack, Service
from ganglion.gpus import Backend, discover
from ganglion.sdk import (
    AllocationTimeout,
    MetricsBook,
    SchedulerClosedError,
    SdkError,
    follow_job_metrics,
    latest_metrics,
)
from ganglion.sdk.holder import EXIT_EXPIRED, EXIT_RELEASED
from ganglion.sdk.metrics import (
    JOB_METRICS_TYPE,
    TYPE_HEADER,
    job_metrics_subject,
    read_metrics_file,
)
from ganglion.sdk.statefile import Holder, LeaseRecord, StateStore
from ganglion.v1 import (
    cluster_pb2,
    controller_pb2,
    controller_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
    telemetry_pb2,
)
from tests.conftest import ROOT

GPUS = [0, 1, 2, 3]


def sched(state: Path, **kw: object) -> Scheduler:
    return Scheduler(gpus=GPUS, backend="sim", state_dir=state, **kw)


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise AssertionError(
                f"helper exited with {proc.returncode}: {proc.stderr and proc.stderr.read()!r}"
            )
        time.sleep(0.02)
    raise AssertionError(f"{path} not written within {timeout_s}s")


def spawn(code: str, *args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stderr=subprocess.PIPE, cwd=ROOT
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()


# --- embedded mode: leases across real processes ---------------------------------------

HOLD = """
import pathlib, sys, time
from ganglion import Scheduler
s = Scheduler(gpus=[0, 1, 2, 3], backend="sim", state_dir=sys.argv[1])
lease = s.allocate(gpus=int(sys.argv[2]), timeout=20)
pathlib.Path(sys.argv[3]).write_text(",".join(map(str, lease)))
time.sleep(100)
"""


def test_lease_expires_when_its_holder_is_killed(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    holder = spawn(HOLD, tmp_path / "state", 4, ready)
    try:
        assert wait_for_file(ready, holder) == "0,1,2,3"
        with sched(tmp_path / "state") as s:
            with pytest.raises(TimeoutError):
                s.allocate(gpus=1, timeout=0.2)
            holder.kill()  # not reaped yet: a zombie must count as dead too
            lease = s.allocate(gpus=4, timeout=10)
            assert list(lease) == GPUS
            state = StateStore(tmp_path / "state").read()
            assert [r.id for r in state.leases] == [lease.id]
    finally:
        stop(holder)


def test_recycled_pid_frees_the_lease(tmp_path: Path) -> None:
    """A lease whose pid now belongs to another process (start time differs) is freed."""
    store = StateStore(tmp_path)
    me = Holder.current()
    impostor = Holder(me.pid, me.start_ticks - 1, me.pid_ns)
    with store.locked() as state:
        state.leases.append(LeaseRecord("old", "gone-job", "t", (0, 1, 2, 3), impostor, 1.0, 1.0))
    with sched(tmp_path) as s:
        assert list(s.allocate(gpus=4, timeout=2)) == GPUS


def test_leases_of_another_pid_namespace_are_kept(tmp_path: Path) -> None:
    """A holder in another pid namespace (a container sharing the dir) cannot be checked
    through our /proc, so its lease is kept rather than double-booked."""
    foreign = Holder(2**22 + 7, 1, "pid:[1]")  # no such pid here
    with StateStore(tmp_path).locked() as state:
        state.leases.append(LeaseRecord("foreign", "other-job", "t", (0, 1), foreign, 1.0, 1.0))
    with sched(tmp_path) as s:
        assert list(s.allocate(gpus=2, timeout=2)) == [2, 3]
        with pytest.raises(TimeoutError):
            s.allocate(gpus=3, timeout=0.1)


SHARE = """
import json, pathlib, sys, time
from ganglion import Scheduler
state, mine, other = sys.argv[1:4]
with Scheduler(gpus=[0, 1, 2, 3], backend="sim", state_dir=state) as s:
    lease = s.allocate(gpus=2, timeout=20)
    pathlib.Path(mine).write_text(json.dumps(list(lease)))
    deadline = time.monotonic() + 20
    while not pathlib.Path(other).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
"""


def test_two_processes_share_gpus_without_overlap(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [spawn(SHARE, tmp_path / "state", a, b), spawn(SHARE, tmp_path / "state", b, a)]
    try:
        got_a = set(json.loads(wait_for_file(a, procs[0])))
        got_b = set(json.loads(wait_for_file(b, procs[1])))
        for p in procs:
            assert p.wait(30) == 0
    finally:
        for p in procs:
            stop(p)
    # Both held their GPUs at the barrier at the same time.
    assert len(got_a) == len(got_b) == 2
    assert not got_a & got_b
    assert got_a | got_b == set(GPUS)


CONTEND = """
import json, pathlib, sys, time
from ganglion import Scheduler
state, out, me, other, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
held = []
with Scheduler(gpus=[0, 1, 2, 3], backend="sim", state_dir=state) as s:
    pathlib.Path(me).touch()
    deadline = time.monotonic() + 30
    while not pathlib.Path(other).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for _ in range(rounds):
        lease = s.allocate(gpus=3, timeout=30)
        t0 = time.monotonic()
        time.sleep(0.01)
        held.append((t0, time.monotonic(), list(lease)))
        lease.release()
pathlib.Path(out).write_text(json.dumps(held))
"""


def test_contending_processes_never_hold_the_same_gpu_at_once(tmp_path: Path) -> None:
    """Two processes each take 3 of 4 GPUs, 10 times: their holding intervals never overlap."""
    outs = [tmp_path / "p0", tmp_path / "p1"]
    marks = [tmp_path / "m0", tmp_path / "m1"]
    procs = [
        spawn(CONTEND, tmp_path / "state", outs[i], marks[i], marks[1 - i], 10) for i in (0, 1)
    ]
    try:
        for p in procs:
            assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        for p in procs:
            stop(p)
    a, b = (json.loads(o.read_text()) for o in outs)
    assert len(a) == len(b) == 10
    # They really contended: each got GPUs while the other was between grants.
    assert a[0][0] < b[-1][0] and b[0][0] < a[-1][0]
    # CLOCK_MONOTONIC is system-wide; each recorded interval lies inside the real lease.
    for s0, e0, g0 in a:
        for s1, e1, g1 in b:
            if set(g0) & set(g1):
                assert e0 <= s1 or e1 <= s0, f"overlap: {(s0, e0, g0)} vs {(s1, e1, g1)}"


def test_timeout_when_nothing_is_free_withdraws_the_request(tmp_path: Path) -> None:
    with sched(tmp_path) as holder, sched(tmp_path) as waiter:
        holder.allocate(gpus=3)
        t0 = time.monotonic()
        with pytest.raises(AllocationTimeout) as err:
            waiter.allocate(gpus=2, timeout=0.3)
        assert time.monotonic() - t0 < 5
        assert isinstance(err.value, TimeoutError) and isinstance(err.value, AllocationError)
        assert "1 of 4 GPUs free" in str(err.value)
        state = StateStore(tmp_path).read()
        assert state.waiting == [] and len(state.leases) == 1
        assert waiter.lease is None
        assert len(waiter.allocate(gpus=1, timeout=0)) == 1


def test_issue_loop_works_as_written(tmp_path: Path) -> None:
    """The usage from the issue: allocate every epoch, never release explicitly."""
    scheduler = sched(tmp_path)
    seen = []
    for epoch in range(10):
        gpus = scheduler.allocate(gpus=2)  # blocks until granted
        seen.append(list(gpus))
        scheduler.update({"throughput": 812.0 + epoch, "loss": 0.41})
    state = StateStore(tmp_path).read()
    assert len(state.leases) == 1 and list(state.leases[0].gpus) == seen[-1]
    assert all(len(g) == 2 and set(g) <= set(GPUS) for g in seen)
    records = read_metrics_file(scheduler.metrics_file or tmp_path / "none")
    assert [r.sequence for r in records] == list(range(1, 11))
    assert records[-1].values["throughput"] == 821.0 and records[-1].gpu_indices == tuple(seen[-1])
    latest = latest_metrics(scheduler.job_id)[scheduler.job_id]
    assert latest.sequence == 10 and latest.lease_id == state.leases[0].id
    scheduler.close()
    assert StateStore(tmp_path).read().leases == []
    for call in (lambda: scheduler.allocate(gpus=1), lambda: scheduler.update({"loss": 0.4})):
        with pytest.raises(SchedulerClosedError, match="the scheduler is closed"):
            call()
    assert issubclass(SchedulerClosedError, SdkError) and issubclass(
        SchedulerClosedError, RuntimeError
    )


def test_lease_is_a_sequence_and_a_context_manager(tmp_path: Path) -> None:
    with sched(tmp_path, policy="fifo") as s:
        with s.allocate(gpus=2) as lease:
            assert isinstance(lease, Lease) and lease.active
            assert len(lease) == 2 and lease[0] == 0 and list(lease) == [0, 1] and 1 in lease
            assert lease.visible_devices == "0,1" and lease.simulated is True
            assert lease.grant.decided_by.startswith("fifo:")
            assert s.lease is lease
        assert not lease.active and lease.end_reason == "released"
        assert s.lease is None and StateStore(tmp_path).read().leases == []
        first = s.allocate(gpus=1)
        second = s.allocate(gpus=1)
        assert not first.active and first.end_reason.startswith("replaced")
        assert [r.id for r in StateStore(tmp_path).read().leases] == [second.id]


async def test_async_twins_and_cancellation(tmp_path: Path) -> None:
    async with sched(tmp_path) as s, sched(tmp_path) as other:
        async with await s.allocate_async(gpus=2, timeout=5) as lease:
            assert lease.active
        assert not lease.active
        hog = await other.allocate_async(gpus=4, timeout=5)
        task = asyncio.create_task(s.allocate_async(gpus=1))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        await hog.release_async()
        # The cancelled request is withdrawn: nobody ends up holding or waiting.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            state = StateStore(tmp_path).read()
            if not state.waiting and not state.leases:
                break
            await asyncio.sleep(0.05)
        assert state.waiting == [] and state.leases == []
        record = await s.update_async({"accuracy": 0.9})
        assert record.values == {"accuracy": 0.9}
        lease = await s.allocate_async(gpus=4, timeout=5)
        await s.release_async()
        assert not lease.active


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    for gpus, match in [([0, 0], "twice"), ([-1], ">= 0"), ([], "empty"), (["a"], "integers")]:
        with pytest.raises(ValueError, match=match):
            Scheduler(gpus=gpus, backend="sim", state_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown policy"):
        sched(tmp_path, policy="no-such-policy")
    with pytest.raises(ValueError, match="job_id"):
        sched(tmp_path, job_id="has.dot")
    with sched(tmp_path) as s:
        for n, match in [(0, "at least 1"), (-2, "at least 1"), (5, "has 4")]:
            with pytest.raises(ValueError, match=match):
                s.allocate(gpus=n)
        with pytest.raises(TypeError):
            s.allocate(gpus=1.5)
        with pytest.raises(ValueError, match="timeout"):
            s.allocate(gpus=1, timeout=-1)
        bad: list[tuple[dict[object, object], str]] = [
            ({}, "empty"),
            ({"": 1.0}, "non-empty"),
            ({"loss": math.nan}, "finite"),
            ({"loss": math.inf}, "finite"),
            ({"loss": "0.4"}, "real number"),
            ({"ok": True}, "real number"),
            ({3: 1.0}, "non-empty strings"),
        ]
        for metrics, match in bad:
            with pytest.raises(ValueError, match=match):
                s.update(metrics)
        assert StateStore(tmp_path).read().leases == []


def test_unknown_gpu_ids_on_an_nvml_host(tmp_path: Path) -> None:
    inventory = discover("auto", "probe", 0)
    if inventory.backend is not Backend.NVML:
        pytest.skip("no NVIDIA driver on this machine: unknown ids are only checkable via NVML")
    with pytest.raises(ValueError, match="unknown GPU ids"):
        Scheduler(gpus=[0, inventory.count], state_dir=tmp_path)
    with Scheduler(state_dir=tmp_path) as s:
        assert s.gpus == tuple(range(inventory.count)) and s.simulated is False
        lease = s.allocate(gpus=1, timeout=5)
        assert lease.visible_devices == inventory.uuids[lease[0]]


# --- metrics into telemetry ---------------------------------------------------------------


async def test_update_publishes_job_metrics_into_the_telemetry_stream(
    nats_server: bus.NatsServer, nc: object, tmp_path: Path
) -> None:
    from nats.aio.client import Client as NatsClient

    assert isinstance(nc, NatsClient)
    book = MetricsBook()
    sub = await follow_job_metrics(nc, book)
    async with sched(tmp_path, nats_url=nats_server.url, job_id="train-7") as s:
        assert s.metrics_file is None
        lease = await s.allocate_async(gpus=2, timeout=5)
        await s.update_async({"throughput": 812.0, "loss": 0.41, "step_time_s": 0.02})
        await s.update_async({"throughput": 815.5, "loss": 0.39, "accuracy": 0.8})
        assert await s.flush_async(10)
        assert s.metrics_stats is not None and s.metrics_stats.published == 2
        subject = job_metrics_subject(s.config.host, "train-7")
    js = nc.jetstream()
    raw = await asyncio.wait_for(js.get_last_msg(bus.TELEMETRY_STREAM, subject), 5)
    assert raw.headers is not None and raw.headers[TYPE_HEADER] == JOB_METRICS_TYPE
    msg = telemetry_pb2.JobMetrics.FromString(raw.data)
    assert msg.job_id == "train-7" and msg.lease_id == lease.id and msg.sequence == 2
    assert dict(msg.values) == {"throughput": 815.5, "loss": 0.39, "accuracy": 0.8}
    assert list(msg.gpu_indices) == list(lease)
    info = await asyncio.wait_for(js.stream_info(bus.TELEMETRY_STREAM), 5)
    assert info.state.messages == 2
    deadline = time.monotonic() + 5
    while (rec := book.latest("train-7")) is None or rec.sequence < 2:
        assert time.monotonic() < deadline, "the NATS follower never saw the metrics"
        await asyncio.sleep(0.02)
    assert rec.values["throughput"] == 815.5
    await sub.unsubscribe()


# --- cluster mode ---------------------------------------------------------------------------


@pytest.fixture
async def stack(nats_server: bus.NatsServer, tmp_path: Path) -> AsyncIterator[LocalStack]:
    s = LocalStack(
        tmp_path / "run", env={bus.ENV_NATS_URL: nats_server.url, "OTEL_TRACES_EXPORTER": "none"}
    )
    try:
        yield s
    finally:
        await asyncio.wait_for(s.close(), 60)


async def start_cluster(stack: LocalStack, gpus: int = 4) -> tuple[Service, Service]:
    executor = await stack.start(
        "executor",
        "ganglion_executor",
        [
            *("--host", "host-a", "--backend", "sim", "--sim-gpus", str(gpus), "--port", "0"),
            *("--state-dir", str(stack.run_dir / "host-a"), "--stop-jobs-on-exit", "--grace", "2"),
        ],
    )
    controller = await stack.start(
        "controller", "ganglion_controller", ["--port", "0", "--interval", "0.2"]
    )
    async with rpc.channel(controller.address) as channel:
        stub = controller_pb2_grpc.JobServiceStub(channel)
        deadline = time.monotonic() + 20
        while (await stub.Stats(controller_pb2.StatsRequest(), timeout=5)).gpus < gpus:
            assert time.monotonic() < deadline, "the controller never saw the executor"
            await asyncio.sleep(0.1)
    return executor, controller


async def executor_jobs(executor: Service) -> dict[str, executor_pb2.JobStatus]:
    async with rpc.channel(executor.address) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        status = await stub.Status(executor_pb2.StatusRequest(), timeout=5)
    return {j.job_id: j for j in status.jobs}


async def test_cluster_mode_allocates_through_controller_and_executor(
    stack: LocalStack, nats_server: bus.NatsServer, nc: object, tmp_path: Path
) -> None:
    from nats.aio.client import Client as NatsClient

    assert isinstance(nc, NatsClient)
    executor, controller = await start_cluster(stack)
    common = {"address": controller.address, "nats_url": nats_server.url, "state_dir": tmp_path}
    async with Scheduler(job_id="trainer", **common) as s, Scheduler(job_id="other", **common) as t:
        lease = await s.allocate_async(gpus=2, timeout=30)
        jobs = await executor_jobs(executor)
        assert jobs[lease.id].state == cluster_pb2.JOB_STATE_RUNNING
        assert list(jobs[lease.id].gpu_indices) == list(lease)  # what the executor assigned
        assert lease.host == "host-a" and lease.simulated is True and len(lease) == 2
        assert lease.grant.decided_by.startswith("fallback:")  # no decision service here
        with pytest.raises(ValueError, match="cluster has 4"):
            await s.allocate_async(gpus=5)  # can never be met: the lease held stays
        assert lease.active and s.lease is lease
        assert (await executor_jobs(executor))[lease.id].state == cluster_pb2.JOB_STATE_RUNNING

        with pytest.raises(ValueError, match="cluster has 4"):
            await t.allocate_async(gpus=5)
        with pytest.raises(TimeoutError):
            await t.allocate_async(gpus=3, timeout=1.0)
        async with rpc.channel(controller.address) as channel:
            stub = controller_pb2_grpc.JobServiceStub(channel)
            listing = (await stub.List(controller_pb2.ListRequest(), timeout=5)).jobs
        others = [j for j in listing if j.job.id.startswith("other-")]
        assert len(others) == 1 and others[0].state == cluster_pb2.JOB_STATE_CANCELLED

        await s.update_async({"throughput": 640.0, "loss": 1.25})
        assert await s.flush_async(10)
        js = nc.jetstream()
        raw = await asyncio.wait_for(
            js.get_last_msg(bus.TELEMETRY_STREAM, job_metrics_subject("host-a", "trainer")), 5
        )
        msg = telemetry_pb2.JobMetrics.FromString(raw.data)
        assert msg.lease_id == lease.id and dict(msg.values) == {"throughput": 640.0, "loss": 1.25}

        await lease.release_async()
        assert not lease.active
        assert (await executor_jobs(executor))[lease.id].state != cluster_pb2.JOB_STATE_RUNNING
        full = await t.allocate_async(gpus=4, timeout=30)  # the released GPUs are free again
        assert sorted(full) == GPUS
    assert all(
        j.state != cluster_pb2.JOB_STATE_RUNNING for j in (await executor_jobs(executor)).values()
    )


CLUSTER_HOLD = """
import pathlib, sys, time
from ganglion import Scheduler
s = Scheduler(address=sys.argv[1], nats_url=sys.argv[2], lease_ttl_s=1.5, state_dir=sys.argv[3])
lease = s.allocate(gpus=4, timeout=30)
pathlib.Path(sys.argv[4]).write_text(lease.id)
time.sleep(100)
"""


async def test_cluster_lease_is_freed_when_its_client_dies(
    stack: LocalStack, nats_server: bus.NatsServer, tmp_path: Path
) -> None:
    executor, controller = await start_cluster(stack)
    ready = tmp_path / "ready"
    client = spawn(CLUSTER_HOLD, controller.address, nats_server.url, tmp_path, ready)
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text()):
            assert client.poll() is None and time.monotonic() < deadline, "client never got GPUs"
            await asyncio.sleep(0.05)
        lease_id = ready.read_text()
        client.send_signal(signal.SIGKILL)
        async with Scheduler(
            address=controller.address, nats_url=nats_server.url, state_dir=tmp_path
        ) as s:
            lease = await s.allocate_async(gpus=4, timeout=30)
            assert sorted(lease) == GPUS
        ended = (await executor_jobs(executor))[lease_id]
        assert ended.exit_code == EXIT_EXPIRED, ended
    finally:
        stop(client)


async def test_holder_exits_without_keepalive_and_on_sigterm(nats_server: bus.NatsServer) -> None:
    env = {**os.environ, bus.ENV_NATS_URL: nats_server.url, "GANGLION_JOB_ID": "h1"}
    cmd = [sys.executable, "-m", "ganglion.sdk.holder"]
    expiring = await asyncio.create_subprocess_exec(
        *cmd, "--ttl", "0.5", env=env, stdout=subprocess.DEVNULL
    )
    assert await asyncio.wait_for(expiring.wait(), 20) == EXIT_EXPIRED
    held = await asyncio.create_subprocess_exec(
        *cmd, "--ttl", "0", env=env, stdout=asyncio.subprocess.PIPE
    )
    assert held.stdout is not None
    assert b"holds GPUs" in await asyncio.wait_for(held.stdout.readline(), 20)
    assert b"holding until released" in await asyncio.wait_for(held.stdout.readline(), 20)
    held.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(held.wait(), 20) == EXIT_RELEASED


# --- packaging and the example ----------------------------------------------------------------


def test_import_ganglion_stays_cheap() -> None:
    code = (
        "import sys, ganglion, ganglion.workload, ganglion.sdk, ganglion.sdk.holder\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'numpy', 'torch'))\n"
        "print(heavy)\n"
        "from ganglion import Scheduler, Lease, AllocationError\n"
        "print(Scheduler.__module__, 'numpy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out == ["[]", "ganglion.sdk.scheduler True"]


def test_example_training_script_runs(tmp_path: Path) -> None:
    script = ROOT / "tools" / "examples" / "train_sdk.py"
    out = subprocess.run(
        [
            *(sys.executable, str(script), "--epochs", "3", "--samples", "1024"),
            *("--backend", "sim", "--state-dir", str(tmp_path), "--timeout", "30"),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        env={
            k: v
            for k, v in os.environ.items()
            if k not in ("GANGLION_CONTROLLER", bus.ENV_NATS_URL)
        },
    )
    assert out.returncode == 0, out.stderr
    assert "simulated GPUs" in out.stdout
    records = read_metrics_file(tmp_path / "metrics.jsonl")
    assert [r.sequence for r in records] == [1, 2, 3]
    assert {"throughput", "step_time_s", "loss", "accuracy"} <= set(records[0].values)
    # It really trains: the loss of the last epoch is below the first's.
    assert records[-1].values["loss"] < records[0].values["loss"]
    assert StateStore(tmp_path).read().leases == []
