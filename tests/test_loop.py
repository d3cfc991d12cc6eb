"""The whole loop across real processes: NATS, decision, controller, executor, sensing.

Covers the fallback when the decision service is down or slow, and one OpenTelemetry trace
running Submit -> Schedule -> Apply -> process start across three services.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ganglion import bus, rpc
from ganglion.cli.stack import LocalStack
from ganglion.v1 import (
    cluster_pb2,
    controller_pb2,
    controller_pb2_grpc,
    decision_pb2,
    decision_pb2_grpc,
)
from tests.otlp_sink import OtlpSink

TERMINAL = {
    cluster_pb2.JOB_STATE_SUCCEEDED,
    cluster_pb2.JOB_STATE_FAILED,
    cluster_pb2.JOB_STATE_CANCELLED,
}


def job(job_id: str, gpus: int, seconds: float = 0.3) -> controller_pb2.SubmitRequest:
    return controller_pb2.SubmitRequest(
        job_id=job_id,
        tenant="t",
        gpus=gpus,
        command=[sys.executable, "-m", "ganglion.workload", "--seconds", str(seconds)],
    )


async def wait_done(
    stub: controller_pb2_grpc.JobServiceAsyncStub, ids: list[str], timeout_s: float = 60
) -> dict[str, controller_pb2.JobInfo]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = {
            j.job.id: j for j in (await stub.List(controller_pb2.ListRequest(), timeout=5)).jobs
        }
        if all(i in jobs and jobs[i].state in TERMINAL for i in ids):
            return jobs
        await asyncio.sleep(0.2)
    raise AssertionError(f"jobs not done in {timeout_s}s: {[(i, jobs.get(i)) for i in ids]}")


async def start_host(stack: LocalStack, host: str, gpus: int = 4) -> None:
    common = ["--host", host, "--backend", "sim", "--sim-gpus", str(gpus)]
    await stack.start(
        f"executor-{host}",
        "ganglion_executor",
        [*common, "--port", "0", "--state-dir", str(stack.run_dir / host), "--stop-jobs-on-exit"],
    )
    await stack.start(
        f"sensing-{host}", "ganglion_sensing", [*common, "--metrics-port", "0", "--interval", "0.5"]
    )


@pytest.fixture
async def stack(nats_server: bus.NatsServer, tmp_path: Path) -> AsyncIterator[LocalStack]:
    s = LocalStack(
        tmp_path, env={bus.ENV_NATS_URL: nats_server.url, "OTEL_TRACES_EXPORTER": "none"}
    )
    try:
        yield s
    finally:
        await asyncio.wait_for(s.close(), 60)


async def test_jobs_run_through_decision_and_executors(stack: LocalStack) -> None:
    decision = await stack.start("decision", "ganglion_decision", ["--port", "0"])
    await start_host(stack, "host-a")
    await start_host(stack, "host-b")
    controller = await stack.start(
        "controller", "ganglion_controller", ["--port", "0", "--decision-addr", decision.address]
    )
    async with rpc.channel(controller.address) as channel:
        stub = controller_pb2_grpc.JobServiceStub(channel)
        ids = ["one", "two", "four", "eight"]
        for i, g in zip(ids, [1, 2, 4, 8], strict=True):
            await stub.Submit(job(i, g), timeout=5)
        jobs = await wait_done(stub, ids)
        stats = await stub.Stats(controller_pb2.StatsRequest(), timeout=5)
    for i in ids:
        assert jobs[i].state == cluster_pb2.JOB_STATE_SUCCEEDED, jobs[i]
        assert not jobs[i].decided_by.startswith("fallback"), jobs[i].decided_by
    # The 8-GPU job spans both 4-GPU hosts, as whole hosts.
    assert sorted(len(s.gpu_indices) for s in jobs["eight"].segments) == [4, 4]
    assert stats.decisions >= 1 and stats.fallbacks == 0 and stats.hosts == 2


async def test_fallback_when_decision_service_is_down(stack: LocalStack) -> None:
    await start_host(stack, "host-a")
    dead = f"127.0.0.1:{bus.free_port()}"  # nothing listens here
    controller = await stack.start(
        "controller", "ganglion_controller", ["--port", "0", "--decision-addr", dead]
    )
    async with rpc.channel(controller.address) as channel:
        stub = controller_pb2_grpc.JobServiceStub(channel)
        await stub.Submit(job("x", 2), timeout=5)
        jobs = await wait_done(stub, ["x"])
        stats = await stub.Stats(controller_pb2.StatsRequest(), timeout=5)
    assert jobs["x"].state == cluster_pb2.JOB_STATE_SUCCEEDED
    assert jobs["x"].decided_by.startswith("fallback:")
    assert stats.fallbacks >= 1 and stats.decisions == 0


class SlowDecision(decision_pb2_grpc.DecisionServiceServicer):
    """A real gRPC decision service that answers after the controller's deadline."""

    async def Schedule(
        self,
        request: decision_pb2.ScheduleRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> decision_pb2.ScheduleResponse:
        await asyncio.sleep(2.0)
        return decision_pb2.ScheduleResponse(policy="slow", version="0")


async def test_fallback_when_decision_service_is_slow(stack: LocalStack) -> None:
    server, port, _ = await rpc.start_server(
        lambda s: decision_pb2_grpc.add_DecisionServiceServicer_to_server(SlowDecision(), s),
        ["ganglion.v1.DecisionService"],
    )
    try:
        await start_host(stack, "host-a")
        controller = await stack.start(
            "controller",
            "ganglion_controller",
            ["--port", "0", "--decision-addr", f"127.0.0.1:{port}", "--deadline", "0.2"],
        )
        async with rpc.channel(controller.address) as channel:
            stub = controller_pb2_grpc.JobServiceStub(channel)
            await stub.Submit(job("y", 1), timeout=5)
            jobs = await wait_done(stub, ["y"])
            stats = await stub.Stats(controller_pb2.StatsRequest(), timeout=5)
        assert jobs["y"].state == cluster_pb2.JOB_STATE_SUCCEEDED
        assert jobs["y"].decided_by.startswith("fallback:")
        assert stats.fallbacks >= 1
    finally:
        await server.stop(0)


async def test_one_trace_spans_controller_decision_and_executor(stack: LocalStack) -> None:
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with OtlpSink() as sink:
        otel["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
        decision = await stack.start("decision", "ganglion_decision", ["--port", "0"], env=otel)
        common = ["--host", "host-a", "--backend", "sim", "--sim-gpus", "2"]
        await stack.start(
            "executor",
            "ganglion_executor",
            [
                *common,
                "--port",
                "0",
                "--state-dir",
                str(stack.run_dir / "ex"),
                "--stop-jobs-on-exit",
            ],
            env=otel,
        )
        controller = await stack.start(
            "controller",
            "ganglion_controller",
            ["--port", "0", "--decision-addr", decision.address],
            env=otel,
        )
        async with rpc.channel(controller.address) as channel:
            stub = controller_pb2_grpc.JobServiceStub(channel)
            await stub.Submit(job("traced", 1, seconds=0.1), timeout=5)
            jobs = await wait_done(stub, ["traced"])
        assert jobs["traced"].state == cluster_pb2.JOB_STATE_SUCCEEDED
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            submit = [s for s in sink.snapshot() if s.name.endswith("JobService/Submit")]
            if submit:
                trace_id = submit[0].trace_id
                in_trace = [s for s in sink.snapshot() if s.trace_id == trace_id]
                names = {s.name for s in in_trace}
                services = {s.service for s in in_trace}
                if {
                    "ganglion-controller",
                    "ganglion-decision",
                    "ganglion-executor",
                } <= services and any(n.startswith("executor.start_process") for n in names):
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"no complete trace; spans: {sink.snapshot()}")
        assert any(n.endswith("DecisionService/Schedule") for n in names)
        assert any(n.endswith("ExecutorService/Apply") for n in names)


async def test_controller_crash_loses_nothing_and_runs_no_job_twice(stack: LocalStack) -> None:
    """SIGKILL the controller while jobs run and queue; a new controller replays JetStream,
    finishes every job, and no job process is started a second time."""
    await start_host(stack, "host-a")
    args = ["--port", "0"]
    controller = await stack.start("controller", "ganglion_controller", args)
    ids = [f"c{i}" for i in range(5)]
    async with rpc.channel(controller.address) as channel:
        stub = controller_pb2_grpc.JobServiceStub(channel)
        for i in ids:
            await stub.Submit(job(i, 2, seconds=1.0), timeout=5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listing = (await stub.List(controller_pb2.ListRequest(), timeout=5)).jobs
            if any(j.state == cluster_pb2.JOB_STATE_RUNNING for j in listing):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no job started")
    await stack.kill(controller)
    controller = await stack.start("controller", "ganglion_controller", args)
    async with rpc.channel(controller.address) as channel:
        stub = controller_pb2_grpc.JobServiceStub(channel)
        jobs = await wait_done(stub, ids)
    assert all(jobs[i].state == cluster_pb2.JOB_STATE_SUCCEEDED for i in ids), jobs
    for i in ids:
        log = (stack.run_dir / "host-a" / "logs" / f"{i}.log").read_text()
        assert log.count("on GPUs") == 1, f"job {i} ran {log.count('on GPUs')} times:\n{log}"


async def test_a_job_cancelled_while_its_round_decides_never_starts(
    stack: LocalStack, tmp_path: Path
) -> None:
    """The round's placement of a job cancelled meanwhile was applied anyway: Cancel said
    CANCELLED while the job ran untracked on GPUs the controller thought free."""
    server, port, _ = await rpc.start_server(
        lambda s: decision_pb2_grpc.add_DecisionServiceServicer_to_server(SlowDecision(), s),
        ["ganglion.v1.DecisionService"],
    )
    started = tmp_path / "victim-started"
    try:
        await start_host(stack, "host-a")
        controller = await stack.start(
            "controller",
            "ganglion_controller",
            ["--port", "0", "--decision-addr", f"127.0.0.1:{port}", "--deadline", "1.5"],
        )
        async with rpc.channel(controller.address) as channel:
            stub = controller_pb2_grpc.JobServiceStub(channel)
            deadline = time.monotonic() + 20
            while not (await stub.Stats(controller_pb2.StatsRequest(), timeout=5)).hosts:
                assert time.monotonic() < deadline, "the host never registered"
                await asyncio.sleep(0.1)
            touch = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(30)"
            victim = controller_pb2.SubmitRequest(
                job_id="victim", gpus=4, command=[sys.executable, "-c", touch]
            )
            await stub.Submit(victim, timeout=5)
            await asyncio.sleep(0.5)  # the round waits on the decision service (1.5 s)
            cancelled = await stub.Cancel(controller_pb2.CancelRequest(job_id="victim"), timeout=5)
            assert cancelled.job.state == cluster_pb2.JOB_STATE_CANCELLED
            await stub.Submit(job("after", 4), timeout=5)  # needs the GPUs victim would hold
            jobs = await wait_done(stub, ["after"])
        assert jobs["after"].state == cluster_pb2.JOB_STATE_SUCCEEDED
        assert jobs["victim"].state == cluster_pb2.JOB_STATE_CANCELLED
        assert not started.exists()
    finally:
        await server.stop(0)


async def test_a_cancel_made_while_the_executor_is_down_stops_the_job_once_it_is_back(
    stack: LocalStack,
) -> None:
    """Cancel sent one Preempt; if the executor was down, the job ran to its natural end."""
    await start_host(stack, "host-a")
    controller = await stack.start("controller", "ganglion_controller", ["--port", "0"])
    async with rpc.channel(controller.address) as channel:
        stub = controller_pb2_grpc.JobServiceStub(channel)
        await stub.Submit(job("long", 2, seconds=120), timeout=5)
        deadline = time.monotonic() + 30
        while (await stub.Get(controller_pb2.GetRequest(job_id="long"), timeout=5)).job.state != (
            cluster_pb2.JOB_STATE_RUNNING
        ):
            assert time.monotonic() < deadline, "the job never started"
            await asyncio.sleep(0.1)
        [executor] = [s for s in stack.services if s.name == "executor-host-a"]
        await stack.kill(executor)  # the job's process lives on, in its own session
        await stub.Cancel(controller_pb2.CancelRequest(job_id="long"), timeout=5)
        await asyncio.sleep(1.0)  # a round or two with the executor down
        same = ["--host", "host-a", "--backend", "sim", "--sim-gpus", "4", "--port", "0"]
        same += ["--state-dir", str(stack.run_dir / "host-a"), "--stop-jobs-on-exit"]
        await stack.start("executor-host-a", "ganglion_executor", same)  # re-adopts the job
        jobs = await wait_done(stub, ["long"], timeout_s=40)
    assert jobs["long"].state == cluster_pb2.JOB_STATE_CANCELLED
