"""Executor: real NATS, real gRPC on port 0, real job processes, a real crash and restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ganglion import rpc
from ganglion.bus import NatsServer, connect, ensure_streams, events_subject, executor_key
from ganglion.domain import JobState
from ganglion.gpus import sim_inventory
from ganglion.observability import setup_tracing
from ganglion.v1 import cluster_pb2, executor_pb2, executor_pb2_grpc
from ganglion_executor import ExecutorConfig, serve
from ganglion_executor.errors import LedgerCorruptError
from ganglion_executor.executor import Executor
from ganglion_executor.ledger import (
    LEDGER_FILE,
    AllocatedRecord,
    FinishedRecord,
    GenerationRecord,
    Ledger,
    StartedRecord,
    encode,
)
from ganglion_executor.model import JobView
from ganglion_executor.processes import LaunchSpec, proc_info, spawn

RUNNING = cluster_pb2.JOB_STATE_RUNNING
SUCCEEDED = cluster_pb2.JOB_STATE_SUCCEEDED
FAILED = cluster_pb2.JOB_STATE_FAILED
PREEMPTED = cluster_pb2.JOB_STATE_PREEMPTED
ENV_PROBE = (
    "import json, os, sys; json.dump({k: os.environ.get(k) for k in "
    "('CUDA_VISIBLE_DEVICES', 'GANGLION_JOB_ID', 'GANGLION_HOST', 'EXTRA')}, open(sys.argv[1], 'w'))"
)


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def assignment(
    job_id: str, gpus: list[int], command: list[str], env: dict[str, str] | None = None
) -> executor_pb2.Assignment:
    job = cluster_pb2.Job(id=job_id, tenant="t", gpus=len(gpus), command=command, env=env or {})
    return executor_pb2.Assignment(job=job, gpu_indices=gpus)


@dataclass
class Running:
    stub: executor_pb2_grpc.ExecutorServiceAsyncStub
    config: ExecutorConfig
    port: int


@contextlib.asynccontextmanager
async def running_executor(config: ExecutorConfig, nats_url: str) -> AsyncIterator[Running]:
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, nats_url, stop, ready.set_result))
    done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what serve raised
    assert ready in done, "executor did not become ready"
    port = ready.result()
    async with rpc.channel(f"127.0.0.1:{port}") as ch:
        try:
            yield Running(executor_pb2_grpc.ExecutorServiceStub(ch), config, port)
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)


@pytest.fixture
async def executor(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Running]:
    config = ExecutorConfig(
        host="h1",
        state_dir=tmp_path / "state",
        port=0,
        backend="sim",
        sim_gpus=4,
        grace_s=1.0,
        stop_jobs_on_exit=True,
        poll_interval_s=0.05,
    )
    async with running_executor(config, nats_server.url) as ex:
        yield ex


async def wait_for_job(
    stub: executor_pb2_grpc.ExecutorServiceAsyncStub,
    job_id: str,
    states: set[int],
    timeout_s: float = 10.0,
) -> executor_pb2.JobStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await stub.Status(executor_pb2.StatusRequest(), timeout=5)
        job = next((j for j in status.jobs if j.job_id == job_id), None)
        if job is not None and job.state in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"{job_id} not in {states} after {timeout_s}s: {job}")
        await asyncio.sleep(0.05)


async def collect_events(
    nc: NatsClient,
    host: str,
    enough: Callable[[list[executor_pb2.JobEvent]], bool],
    timeout_s: float = 10.0,
) -> list[tuple[executor_pb2.JobEvent, dict[str, str]]]:
    """Events of ``host`` from the start of the stream until ``enough`` says so."""
    sub = await nc.jetstream().subscribe(events_subject(host), ordered_consumer=True)
    out: list[tuple[executor_pb2.JobEvent, dict[str, str]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not enough([e for e, _ in out]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"events so far: {[e for e, _ in out]}")
            with contextlib.suppress(NatsTimeoutError):
                msg = await sub.next_msg(timeout=min(remaining, 1.0))
                out.append((executor_pb2.JobEvent.FromString(msg.data), dict(msg.headers or {})))
    finally:
        await sub.unsubscribe()
    return out


def has(job_id: str, state: int) -> Callable[[list[executor_pb2.JobEvent]], bool]:
    return lambda events: any(e.job_id == job_id and e.state == state for e in events)


def all_of(
    *preds: Callable[[list[executor_pb2.JobEvent]], bool],
) -> Callable[[list[executor_pb2.JobEvent]], bool]:
    return lambda events: all(p(events) for p in preds)


def live_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` that are not zombies (an orphan's reaping may lag)."""
    out = []
    for name in os.listdir("/proc"):
        info = proc_info(int(name)) if name.isdigit() else None
        if info is not None and info.pgrp == pgid and info.running:
            out.append(int(name))
    return out


# --- Apply, events, registration ------------------------------------------------------------


async def test_apply_runs_jobs_with_visible_devices_and_publishes_events(
    executor: Running, nc: NatsClient, tmp_path: Path
) -> None:
    probe = tmp_path / "env.json"
    plan = executor_pb2.ApplyRequest(
        host="h1",
        generation=1,
        assignments=[
            assignment("ok", [1, 3], py(ENV_PROBE, str(probe)), {"EXTRA": "x"}),
            assignment("bad", [0], py("print('bye'); raise SystemExit(7)")),
        ],
    )
    resp = await executor.stub.Apply(plan, timeout=10)
    assert sorted(resp.started_job_ids) == ["bad", "ok"] and not resp.known_job_ids

    ok = await wait_for_job(executor.stub, "ok", {SUCCEEDED})
    bad = await wait_for_job(executor.stub, "bad", {FAILED})
    assert json.loads(probe.read_text()) == {
        "CUDA_VISIBLE_DEVICES": "1,3",
        "GANGLION_JOB_ID": "ok",
        "GANGLION_HOST": "h1",
        "EXTRA": "x",
    }
    assert ok.exit_code == 0 and list(ok.gpu_indices) == [1, 3] and ok.pid > 0
    assert ok.end_time_s >= ok.start_time_s > 0
    assert bad.exit_code == 7
    assert Path(bad.log_path).read_text().strip() == "bye"  # noqa: ASYNC240

    events = await collect_events(
        nc, "h1", all_of(has("ok", RUNNING), has("ok", SUCCEEDED), has("bad", FAILED))
    )
    headers = {(e.job_id, e.state): h for e, h in events}
    assert headers[("ok", SUCCEEDED)]["Nats-Msg-Id"] == "ok:h1:SUCCEEDED"
    final = next(e for e, _ in events if e.job_id == "bad" and e.state == FAILED)
    assert final.exit_code == 7 and list(final.gpu_indices) == [0] and final.host == "h1"

    kv = await ensure_streams(nc.jetstream())
    info = executor_pb2.ExecutorInfo.FromString((await kv.get(executor_key("h1"))).value or b"")
    assert info.address == f"127.0.0.1:{executor.port}" and info.gpu_count == 4
    assert list(info.gpu_uuids) == [f"SIM-h1-{i}" for i in range(4)]


async def test_start_process_span_links_the_running_event(
    executor: Running, nc: NatsClient, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = setup_tracing("test")
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    try:
        with trace.get_tracer("test").start_as_current_span("submit") as root:
            plan = executor_pb2.ApplyRequest(
                host="h1", generation=1, assignments=[assignment("t1", [2], py("pass"))]
            )
            await executor.stub.Apply(plan, timeout=10)
        events = await collect_events(nc, "h1", has("t1", RUNNING))
        apply_key = ("ganglion.v1.ExecutorService/Apply", SpanKind.SERVER)
        deadline = time.monotonic() + 5
        while True:
            spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
            if apply_key in spans or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    finally:
        processor.shutdown()
    trace_id = format(root.get_span_context().trace_id, "032x")
    running = next(h for e, h in events if e.state == RUNNING)
    assert running["traceparent"].split("-")[1] == trace_id
    start = spans["executor.start_process", SpanKind.INTERNAL]
    apply_span = spans[apply_key]
    assert start.context is not None and start.context.trace_id == root.get_span_context().trace_id
    assert start.parent is not None and apply_span.context is not None
    assert start.parent.span_id == apply_span.context.span_id
    assert start.attributes is not None and start.attributes["ganglion.job_id"] == "t1"
    assert start.attributes["process.pid"] > 0


async def test_apply_is_idempotent_and_rejects_stale_generations(executor: Running) -> None:
    plan = executor_pb2.ApplyRequest(
        host="h1",
        generation=5,
        assignments=[assignment("j", [0], py("import time; time.sleep(30)"))],
    )
    first = await executor.stub.Apply(plan, timeout=10)
    again = await executor.stub.Apply(plan, timeout=10)
    assert list(first.started_job_ids) == ["j"]
    assert not again.started_job_ids and list(again.known_job_ids) == ["j"]
    later = await executor.stub.Apply(
        executor_pb2.ApplyRequest(host="h1", generation=6, assignments=plan.assignments), timeout=10
    )
    assert not later.started_job_ids and list(later.known_job_ids) == ["j"]
    status = await executor.stub.Status(executor_pb2.StatusRequest(), timeout=5)
    assert status.generation == 6 and [j.job_id for j in status.jobs] == ["j"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor.stub.Apply(executor_pb2.ApplyRequest(host="h1", generation=4), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "4" in (err.value.details() or "") and "6" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"host": "other"}, "host"),
        ({"assignments": [assignment("e", [0], [])]}, "assignments[0].job.command"),
        ({"assignments": [assignment("r", [4], py("pass"))]}, "assignments[0].gpu_indices"),
        ({"assignments": [assignment("d", [1, 1], py("pass"))]}, "assignments[0].gpu_indices"),
        ({"assignments": [assignment("", [0], py("pass"))]}, "assignments[0].job.id"),
    ],
)
async def test_apply_invalid_argument_names_the_field(
    executor: Running, request_fields: dict[str, object], field: str
) -> None:
    fields: dict[str, object] = {"host": "h1", "generation": 1, **request_fields}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor.stub.Apply(executor_pb2.ApplyRequest(**fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")


async def test_held_gpu_rejects_the_whole_plan(executor: Running, tmp_path: Path) -> None:
    sleep = py("import time; time.sleep(30)")
    await executor.stub.Apply(
        executor_pb2.ApplyRequest(
            host="h1", generation=1, assignments=[assignment("a", [0, 1], sleep)]
        ),
        timeout=10,
    )
    marker = tmp_path / "b-ran"
    conflicting = executor_pb2.ApplyRequest(
        host="h1",
        generation=2,
        assignments=[
            assignment("b", [2], py("open(__import__('sys').argv[1], 'w')", str(marker))),
            assignment("c", [3, 1], sleep),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor.stub.Apply(conflicting, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details() or ""
    assert "GPU 1" in details and "'a'" in details
    status = await executor.stub.Status(executor_pb2.StatusRequest(), timeout=5)
    assert [j.job_id for j in status.jobs] == ["a"] and status.generation == 1
    assert not marker.exists()
    # The refused plan did not consume its generation.
    ok = await executor.stub.Apply(
        executor_pb2.ApplyRequest(
            host="h1", generation=2, assignments=[conflicting.assignments[0]]
        ),
        timeout=10,
    )
    assert list(ok.started_job_ids) == ["b"]


async def test_missing_command_fails_and_frees_its_gpus(executor: Running) -> None:
    plan = executor_pb2.ApplyRequest(
        host="h1", generation=1, assignments=[assignment("nf", [0], ["/nonexistent/ganglion-cmd"])]
    )
    assert list((await executor.stub.Apply(plan, timeout=10)).started_job_ids) == ["nf"]
    job = await wait_for_job(executor.stub, "nf", {FAILED})
    assert job.exit_code == 127 and job.pid == 0
    reuse = executor_pb2.ApplyRequest(
        host="h1", generation=2, assignments=[assignment("r", [0], py("pass"))]
    )
    assert list((await executor.stub.Apply(reuse, timeout=10)).started_job_ids) == ["r"]
    await wait_for_job(executor.stub, "r", {SUCCEEDED})


async def test_a_job_whose_files_cannot_be_named_fails_and_frees_its_gpus(
    executor: Running,
) -> None:
    """A run id longer than a file name may be: the OSError escaped after the GPUs were held,
    Apply answered UNKNOWN, and every later plan for those GPUs failed."""
    long_id = "x" * 300
    plan = executor_pb2.ApplyRequest(
        host="h1", generation=1, assignments=[assignment(long_id, [0], py("pass"))]
    )
    assert list((await executor.stub.Apply(plan, timeout=10)).started_job_ids) == [long_id]
    await wait_for_job(executor.stub, long_id, {FAILED})
    reuse = executor_pb2.ApplyRequest(
        host="h1", generation=2, assignments=[assignment("r", [0], py("pass"))]
    )
    assert list((await executor.stub.Apply(reuse, timeout=10)).started_job_ids) == ["r"]
    await wait_for_job(executor.stub, "r", {SUCCEEDED})


# --- Preempt --------------------------------------------------------------------------------


async def test_the_grace_sigkill_comes_even_when_the_preempt_call_is_gone(
    executor: Running, tmp_path: Path
) -> None:
    # A controller that dies mid-Preempt cancels its call; the stop it asked for goes on.
    armed = tmp_path / "armed"
    stubborn = py(
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').close(); time.sleep(60)",
        str(armed),
    )
    plan = executor_pb2.ApplyRequest(
        host="h1", generation=1, assignments=[assignment("g", [0], stubborn)]
    )
    await executor.stub.Apply(plan, timeout=10)
    deadline = time.monotonic() + 10
    while not armed.exists():
        assert time.monotonic() < deadline, "job never installed its SIGTERM handler"
        await asyncio.sleep(0.02)
    pid = (await wait_for_job(executor.stub, "g", {RUNNING})).pid
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await executor.stub.Preempt(
            executor_pb2.PreemptRequest(job_id="g", grace_s=1.0), timeout=0.2
        )
    assert gone.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    stopped = await wait_for_job(executor.stub, "g", {PREEMPTED}, timeout_s=10)
    assert stopped.exit_code == -signal.SIGKILL and not live_members(pid)


async def test_preempt_sigkills_a_job_that_ignores_sigterm(
    executor: Running, nc: NatsClient, tmp_path: Path
) -> None:
    armed = tmp_path / "armed"
    stubborn = py(
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').close(); time.sleep(60)",
        str(armed),
    )
    plan = executor_pb2.ApplyRequest(
        host="h1", generation=1, assignments=[assignment("s", [0], stubborn)]
    )
    await executor.stub.Apply(plan, timeout=10)
    deadline = time.monotonic() + 10
    while not armed.exists():
        assert time.monotonic() < deadline, "job never installed its SIGTERM handler"
        await asyncio.sleep(0.02)
    pid = (await wait_for_job(executor.stub, "s", {RUNNING})).pid

    t0 = time.monotonic()
    resp = await executor.stub.Preempt(
        executor_pb2.PreemptRequest(job_id="s", grace_s=0.5), timeout=10
    )
    elapsed = time.monotonic() - t0
    assert resp.status.state == PREEMPTED and resp.status.exit_code == -signal.SIGKILL
    assert 0.5 <= elapsed < 5
    assert not live_members(pid)

    again = await executor.stub.Preempt(executor_pb2.PreemptRequest(job_id="s"), timeout=10)
    assert again.status == resp.status
    await collect_events(nc, "h1", has("s", PREEMPTED))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor.stub.Preempt(executor_pb2.PreemptRequest(job_id="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- Ledger ---------------------------------------------------------------------------------


def test_ledger_replay_ignores_a_torn_last_line(tmp_path: Path) -> None:
    alloc = AllocatedRecord("j", (0, 1), ("true",), {"A": "b"}, "t", 1.0)
    good = [GenerationRecord(3, 1.0), alloc, StartedRecord("j", 42, 7, 2.0)]
    path = tmp_path / LEDGER_FILE
    path.write_bytes(b"".join(encode(r) for r in good) + b'{"type":"finished","job_id":"j","st')

    ledger, state = Ledger.open(tmp_path)
    assert state.repaired and state.generation == 3
    assert state.jobs["j"].allocated == alloc and state.jobs["j"].started == good[2]
    assert state.jobs["j"].finished is None
    done = FinishedRecord("j", JobState.SUCCEEDED, 0, 3.0)
    ledger.append(done)
    ledger.close()

    ledger, state = Ledger.open(tmp_path)
    ledger.close()
    assert not state.repaired and state.jobs["j"].finished == done

    # A whole last record that only lacks its newline is kept; garbage before the end is fatal.
    path.write_bytes(encode(good[0]) + encode(alloc).rstrip(b"\n"))
    ledger, state = Ledger.open(tmp_path)
    ledger.close()
    assert "j" in state.jobs and path.read_bytes().endswith(b"\n")
    path.write_bytes(encode(good[0]) + b"garbage\n" + encode(alloc))
    with pytest.raises(LedgerCorruptError):
        Ledger.open(tmp_path)


class _Events:
    def __init__(self) -> None:
        self.views: list[JobView] = []

    def publish(self, view: JobView) -> None:
        self.views.append(view)


def _wait_for_exec(pid: int, marker: bytes, timeout_s: float = 10.0) -> None:
    environ = Path(f"/proc/{pid}/environ")
    deadline = time.monotonic() + timeout_s
    while marker not in environ.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)


def _job_children(job_id: str, wrapper: int) -> list[int]:
    marker = f"GANGLION_JOB_ID={job_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != wrapper:
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{name}/environ").read_bytes():
                    found.append(int(name))
    return found


async def test_recover_kills_what_a_lost_job_left_running_before_freeing_its_gpus(
    tmp_path: Path,
) -> None:
    """Executor and wrapper both SIGKILLed: the job's own process lives on, on its GPU."""
    state_dir = tmp_path / "state"
    ledger, _ = Ledger.open(state_dir)
    alloc = AllocatedRecord("lost", (1,), (sys.executable, "-c", "import time; time.sleep(30)"))
    ledger.append(alloc)
    (state_dir / "logs").mkdir()
    (state_dir / "exit").mkdir()
    spec = LaunchSpec(
        "lost", "h9", alloc.command, {}, "1", state_dir / "logs" / "l.log", state_dir / "exit" / "l"
    )
    wrapper = spawn(spec, poll_s=0.05)
    children: list[int] = []
    try:
        for _ in range(200):  # until the wrapper has started the job (bounded: ~10 s)
            children = _job_children("lost", wrapper.pid)
            if children:
                break
            await asyncio.sleep(0.05)
        assert children, "the wrapper never started the job"
        os.kill(wrapper.pid, signal.SIGKILL)
        await asyncio.to_thread(os.waitpid, wrapper.pid, 0)
        ledger.close()
        ledger, replay = Ledger.open(state_dir)
        ex = Executor(
            "h9", sim_inventory("h9", 4), state_dir, ledger, _Events(), grace_s=0.5, poll_s=0.05
        )
        await ex.recover(replay)
        (view,) = ex.status().jobs
        assert view.state is JobState.FAILED and "lost while the executor was down" in view.message
        for pid in children:  # SIGKILLed: gone, or a zombie until init reaps it
            for _ in range(100):
                info = proc_info(pid)
                if info is None or not info.running:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"process {pid} of the lost job still runs")
        await ex.close(stop_jobs=True)
        ledger.close()
    finally:
        for pid in [wrapper.pid, *children]:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)


async def test_recover_finds_a_job_started_but_not_recorded(tmp_path: Path) -> None:
    """The executor died between starting a job and writing its ``started`` record."""
    state_dir = tmp_path / "state"
    ledger, _ = Ledger.open(state_dir)
    alloc = AllocatedRecord("orphan", (2,), (sys.executable, "-c", "import time; time.sleep(30)"))
    ledger.append(alloc)
    (state_dir / "logs").mkdir()
    (state_dir / "exit").mkdir()
    proc = spawn(
        LaunchSpec(
            "orphan",
            "h9",
            alloc.command,
            {},
            "2",
            state_dir / "logs" / "o.log",
            state_dir / "exit" / "orphan",
        ),
        poll_s=0.05,
    )
    try:
        # posix_spawn can return before the kernel shows the new image's environment; a real
        # restart comes seconds after the crash, so wait for exec to finish like it would.
        await asyncio.to_thread(_wait_for_exec, proc.pid, b"GANGLION_JOB_ID=orphan")
        ledger.close()
        ledger, replay = Ledger.open(state_dir)
        events = _Events()
        ex = Executor(
            "h9", sim_inventory("h9", 4), state_dir, ledger, events, grace_s=0.5, poll_s=0.05
        )
        await ex.recover(replay)
        (view,) = ex.status().jobs
        assert view.state is JobState.RUNNING and view.pid == proc.pid
        assert events.views[-1].state is JobState.RUNNING
        stopped = await asyncio.wait_for(ex.preempt("orphan"), 10)
        assert stopped.state is JobState.PREEMPTED
        await ex.close(stop_jobs=True)
        ledger.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)  # noqa: ASYNC222 (SIGKILLed: returns at once)


# --- Crash and restart ----------------------------------------------------------------------


class ExecutorProcess:
    """``python -m ganglion_executor`` as a real child process."""

    def __init__(self, state_dir: Path, nats_url: str, log: Path) -> None:
        self.state_dir, self.nats_url, self.log = state_dir, nats_url, log
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> executor_pb2_grpc.ExecutorServiceAsyncStub:
        argv = ["--host", "crash", "--port", "0", "--state-dir", str(self.state_dir)]
        argv += ["--backend", "sim", "--sim-gpus", "4", "--grace", "1"]
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ganglion_executor",
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "GANGLION_NATS_URL": self.nats_url},
            )
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode()
        assert " listening on " in line and "gpus=4 backend=sim" in line, (
            line,
            self.log.read_text(),
        )
        self.channel = rpc.channel(line.split(" listening on ")[1].split()[0])
        return executor_pb2_grpc.ExecutorServiceStub(self.channel)

    async def signal(self, sig: signal.Signals) -> int:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 15)


@pytest.fixture
def job_groups() -> Iterator[set[int]]:
    """Process groups of jobs a test started outside an in-process executor; killed at the end."""
    groups: set[int] = set()
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


async def test_executor_crash_restart_readopts_running_jobs(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path, job_groups: set[int]
) -> None:
    state_dir = tmp_path / "state"
    first = ExecutorProcess(state_dir, nats_server.url, tmp_path / "executor.log")
    second = ExecutorProcess(state_dir, nats_server.url, tmp_path / "executor.log")
    try:
        stub = await first.start()
        long_job = py("import time; time.sleep(60)")
        plan = executor_pb2.ApplyRequest(
            host="crash",
            generation=1,
            assignments=[
                assignment("long1", [0], long_job),
                assignment("long2", [1, 2], long_job),
                assignment("short", [3], py("import time; time.sleep(1.0); raise SystemExit(3)")),
            ],
        )
        await stub.Apply(plan, timeout=10)
        before = await stub.Status(executor_pb2.StatusRequest(), timeout=5)
        pids = {j.job_id: j.pid for j in before.jobs}
        job_groups.update(pids.values())
        assert {j.job_id: j.state for j in before.jobs} == dict.fromkeys(pids, RUNNING)

        assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
        exit_file = state_dir / "exit" / "short"
        deadline = time.monotonic() + 10
        while not exit_file.exists():  # "short" ends while no executor runs
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        stub = await second.start()
        after = await stub.Status(executor_pb2.StatusRequest(), timeout=5)
        jobs = {j.job_id: j for j in after.jobs}
        assert after.generation == 1
        for name in ("long1", "long2"):
            assert jobs[name].state == RUNNING and jobs[name].pid == pids[name]
        assert jobs["short"].state == FAILED and jobs["short"].exit_code == 3
        assert jobs["short"].pid == pids["short"] and jobs["short"].end_time_s > 0

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Apply(
                executor_pb2.ApplyRequest(
                    host="crash", generation=2, assignments=[assignment("thief", [2], long_job)]
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "long2" in (err.value.details() or "")
        reuse = executor_pb2.ApplyRequest(
            host="crash", generation=2, assignments=[assignment("next", [3], long_job)]
        )
        assert list((await stub.Apply(reuse, timeout=10)).started_job_ids) == ["next"]

        final = await stub.Status(executor_pb2.StatusRequest(), timeout=5)
        job_groups.update(j.pid for j in final.jobs if j.pid)
        held = [g for j in final.jobs if j.state == RUNNING for g in j.gpu_indices]
        assert sorted(held) == [0, 1, 2, 3]  # every GPU in exactly one live job
        events = await collect_events(nc, "crash", has("short", FAILED))
        assert next(e for e, _ in events if e.state == FAILED).exit_code == 3

        # A graceful stop leaves the jobs running and withdraws the registration.
        assert await second.signal(signal.SIGTERM) == 0
        os.killpg(pids["long1"], 0)
        kv = await ensure_streams(nc.jetstream())
        with pytest.raises(KeyNotFoundError):
            await kv.get(executor_key("crash"))
    finally:
        for ex in (first, second):
            if ex.proc is None:
                continue
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await ex.signal(signal.SIGKILL)


async def test_events_queued_during_a_nats_outage_are_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "nats"
    server = NatsServer(store_dir=store).start()
    go = tmp_path / "go"
    waiter = py(
        "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)", str(go)
    )
    config = ExecutorConfig(
        host="h2", state_dir=tmp_path / "state", port=0, backend="sim", stop_jobs_on_exit=True
    )
    try:
        async with running_executor(config, server.url) as ex:
            plan = executor_pb2.ApplyRequest(
                host="h2", generation=1, assignments=[assignment("w", [0], waiter)]
            )
            await ex.stub.Apply(plan, timeout=10)
            server.stop()
            go.touch()
            await wait_for_job(ex.stub, "w", {SUCCEEDED})  # its event is queued, NATS is down
            deadline = time.monotonic() + 10
            while "job event not acknowledged" not in caplog.text:  # the outbox is retrying
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            server = NatsServer(port=server.port, store_dir=store).start()
            client = await connect(server.url, "test")
            try:
                await ensure_streams(client.jetstream())
                events = await collect_events(client, "h2", has("w", SUCCEEDED), timeout_s=20)
            finally:
                await client.close()
            assert [e.state for e, _ in events] == [RUNNING, SUCCEEDED]
    finally:
        server.cleanup()


@pytest.mark.parametrize("host", ["node-1.example.com.", "gpu@rack1", "node:7", "a..b", "x*"])
def test_a_host_name_that_cannot_be_registered_is_refused_at_start(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As sensing does: such a name was accepted, then every registration failed forever."""
    from ganglion_executor.config import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--host", host])
    assert exc.value.code == 2
    assert "host must be" in capsys.readouterr().err


def test_a_second_executor_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    """Nothing stopped it: both replayed and appended to one ledger, and each evicted cache
    files the other still counted."""
    from ganglion_executor.ledger import Ledger, StateDirInUseError

    first, _ = Ledger.open(tmp_path)
    try:
        with pytest.raises(StateDirInUseError, match="in use by another executor"):
            Ledger.open(tmp_path)
    finally:
        first.close()
    again, _ = Ledger.open(tmp_path)  # the lock goes with the holder
    again.close()
