"""The decision service over real gRPC: in-process servers on port 0, and the CLI process."""

from __future__ import annotations

import asyncio
import math
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ganglion import policies, rpc
from ganglion.convert import decision_from_proto, job_to_proto, state_to_proto
from ganglion.domain import ClusterState, Job, Segment
from ganglion.v1 import decision_pb2, decision_pb2_grpc
from ganglion_decision import SERVICE_NAME, DecisionConfig, DecisionServicer, serve

TIMEOUT_S = 5.0
MAX_PENDING = 20
MAX_GPUS = 32

Mutate = Callable[[decision_pb2.ScheduleRequest], None]


async def start(config: DecisionConfig) -> tuple[str, asyncio.Event, asyncio.Task[None]]:
    """``serve`` in a task; returns once it has called ``ready`` (or raises what it raised)."""
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, ready=port.set_result))
    either: list[asyncio.Future[Any]] = [task, port]
    done, _ = await asyncio.wait(either, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert port in done, "server did not become ready"
    return f"127.0.0.1:{port.result()}", stop, task


async def stop_server(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, TIMEOUT_S)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    addr, stop, task = await start(
        DecisionConfig(port=0, max_pending=MAX_PENDING, max_gpus=MAX_GPUS)
    )
    yield addr
    await stop_server(stop, task)


@pytest.fixture
async def stub(address: str) -> AsyncIterator[decision_pb2_grpc.DecisionServiceAsyncStub]:
    async with rpc.channel(address) as channel:
        yield decision_pb2_grpc.DecisionServiceStub(channel)


def cluster() -> ClusterState:
    """h1 (4 GPUs, 0-1 busy) and h2 (4 GPUs, idle)."""
    busy = Job("r0", "t", 2, 10.0)
    return ClusterState.build(
        100.0, {"h1": 4, "h2": 4}, {"r0": [Segment("h1", (0, 1))]}, running=[busy]
    )


def jobs() -> list[Job]:
    return [Job(f"j{i}", "t", g, float(i)) for i, g in enumerate([2, 1, 3, 1])]


def request(policy: str = "") -> decision_pb2.ScheduleRequest:
    return decision_pb2.ScheduleRequest(
        cluster=state_to_proto(cluster()),
        pending=[job_to_proto(j) for j in jobs()],
        policy=policy,
    )


async def expect_error(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub,
    req: decision_pb2.ScheduleRequest,
    code: grpc.StatusCode,
) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Schedule(req, timeout=TIMEOUT_S)
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


# --- Schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", *policies.names()])
async def test_schedule_matches_the_in_process_policy(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub, name: str
) -> None:
    response = await stub.Schedule(request(name), timeout=TIMEOUT_S)
    policy = policies.create(name or policies.DEFAULT_POLICY)
    assert (response.policy, response.version) == (policy.name, policy.version)
    assert response.placements, "the request leaves room to place something"
    for p in response.placements:
        assert p.reason and p.segments
    assert decision_from_proto(response) == policy.schedule(cluster(), jobs())


async def test_schedule_reports_score_and_runner_up(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> None:
    req = request("best-fit")
    del req.pending[:]
    req.pending.append(job_to_proto(Job("j", "t", 1, 0.0)))
    (p,) = (await stub.Schedule(req, timeout=TIMEOUT_S)).placements
    # h1 has 2 free, h2 has 4: best-fit leaves 1 free on h1; h2 would have left 3.
    assert (p.segments[0].host, list(p.segments[0].gpu_indices)) == ("h1", [2])
    assert (p.score, p.runner_up_host, p.runner_up_score) == (-1.0, "h2", -3.0)
    assert "h1" in p.reason


def _set(field: str, i: int, value: float) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        getattr(r.cluster, field)[i] = value

    return mutate


def _drop_last(field: str) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        del getattr(r.cluster, field)[-1]

    return mutate


def _pending(i: int, **values: object) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        for k, v in values.items():
            setattr(r.pending[i], k, v)

    return mutate


def _now(value: float) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        r.cluster.now_s = value

    return mutate


def _host_name(i: int, name: str) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        r.cluster.hosts[i] = name

    return mutate


BAD_INPUTS: dict[str, tuple[Mutate, str]] = {
    "gpu_index shorter": (_drop_last("gpu_index"), "cluster.gpu_index"),
    "gpu_job shorter": (_drop_last("gpu_job"), "cluster.gpu_job"),
    "gpu_utilization shorter": (_drop_last("gpu_utilization"), "cluster.gpu_utilization"),
    "gpu_host out of range": (_set("gpu_host", 5, 2), "cluster.gpu_host[5]"),
    "gpu_job past running": (_set("gpu_job", 6, 1), "cluster.gpu_job[6]"),
    "gpu_job below -1": (_set("gpu_job", 3, -2), "cluster.gpu_job[3]"),
    "gpu_index not int32": (_set("gpu_index", 2, 2**31), "cluster.gpu_index[2]"),
    "duplicate gpu": (_set("gpu_index", 5, 0), "cluster.gpu_index[5]"),
    "utilization NaN": (_set("gpu_utilization", 0, math.nan), "cluster.gpu_utilization[0]"),
    "now NaN": (_now(math.nan), "cluster.now_s"),
    "now inf": (_now(math.inf), "cluster.now_s"),
    "duplicate host": (_host_name(1, "h1"), "cluster.hosts[1]"),
    "empty host": (_host_name(0, ""), "cluster.hosts[0]"),
    "empty id": (_pending(1, id=""), "pending[1].id"),
    "duplicate id": (_pending(3, id="j0"), "pending[3].id"),
    "zero gpus": (_pending(2, gpus=0), "pending[2].gpus"),
    "submit NaN": (_pending(0, submit_time_s=math.nan), "pending[0].submit_time_s"),
    "submit -inf": (_pending(2, submit_time_s=-math.inf), "pending[2].submit_time_s"),
    "attained negative": (_pending(1, attained_service_s=-1.0), "pending[1].attained_service_s"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub, case: str
) -> None:
    mutate, field = BAD_INPUTS[case]
    req = request()
    mutate(req)
    details = await expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith(f"{field}: "), details


async def test_unknown_policy_is_invalid_argument_listing_known(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> None:
    details = await expect_error(stub, request("nope"), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith("policy: ") and "'nope'" in details
    for name in policies.names():
        assert name in details


async def test_too_many_pending_is_resource_exhausted(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> None:
    req = request()
    req.pending.extend(
        job_to_proto(Job(f"x{i}", "t", 1, 0.0)) for i in range(MAX_PENDING + 1 - len(req.pending))
    )
    details = await expect_error(stub, req, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert details.startswith("pending: ") and str(MAX_PENDING) in details


async def test_too_many_gpus_is_resource_exhausted(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> None:
    big = ClusterState.build(0.0, {f"h{i}": 8 for i in range(MAX_GPUS // 8 + 1)})
    req = decision_pb2.ScheduleRequest(cluster=state_to_proto(big))
    details = await expect_error(stub, req, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert details.startswith("cluster.gpu_host: ") and str(MAX_GPUS) in details


async def test_message_over_the_byte_limit_is_resource_exhausted() -> None:
    addr, stop, task = await start(DecisionConfig(port=0, max_message_bytes=16 * 1024))
    try:
        async with rpc.channel(addr) as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            assert (await stub.Schedule(request(), timeout=TIMEOUT_S)).placements
            req = request()
            req.pending[0].command.append("x" * 32 * 1024)
            details = await expect_error(stub, req, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "larger than max" in details  # gRPC's own limit, before any servicer code
    finally:
        await stop_server(stop, task)


# --- servicer on rpc.start_server: stats and the worker-thread path -----------------------------


async def test_stats_per_policy_and_offloaded_requests_agree() -> None:
    servicer = DecisionServicer("fifo", offload_work=1)  # every request on a worker thread

    def register(server: grpc.aio.Server) -> None:
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(servicer, server)

    server, port, _ = await rpc.start_server(register, [SERVICE_NAME])
    try:
        async with rpc.channel(f"127.0.0.1:{port}") as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            for name in ("", "best-fit", "best-fit"):
                response = await stub.Schedule(request(name), timeout=TIMEOUT_S)
                policy = policies.create(name or "fifo")
                assert decision_from_proto(response) == policy.schedule(cluster(), jobs())
            bad = request("best-fit")
            bad.pending[0].gpus = 0
            await expect_error(stub, bad, grpc.StatusCode.INVALID_ARGUMENT)
            await expect_error(stub, request("nope"), grpc.StatusCode.INVALID_ARGUMENT)
    finally:
        await server.stop(grace=None)
    stats = servicer.stats.snapshot()
    assert set(stats) == {"fifo", "best-fit", "(unknown)"}
    assert (stats["fifo"].requests, stats["fifo"].errors) == (1, 0)
    assert (stats["best-fit"].requests, stats["best-fit"].errors) == (3, 1)
    assert (stats["(unknown)"].requests, stats["(unknown)"].errors) == (1, 1)
    assert 0 < stats["best-fit"].mean_s <= stats["best-fit"].max_s < TIMEOUT_S


# --- health and reflection --------------------------------------------------------------------


async def test_health_says_serving(address: str) -> None:
    async with rpc.channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in (SERVICE_NAME, ""):
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(address: str) -> None:
    async with rpc.channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S
        )
        async with asyncio.timeout(TIMEOUT_S):
            replies = [reply async for reply in call]
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


# --- config and the CLI -----------------------------------------------------------------------


def test_config_from_flags_and_env() -> None:
    c = DecisionConfig.from_args(
        ["--port", "0", "--policy", "fifo", "--max-pending", "7"],
        env={"GANGLION_DECISION_MAX_GPUS": "9", "GANGLION_DECISION_PORT": "1234"},
    )
    assert (c.port, c.policy, c.max_pending, c.max_gpus) == (0, "fifo", 7, 9)
    assert c.address(5) == "127.0.0.1:5"
    assert DecisionConfig(bind="::1").address(5) == "[::1]:5"
    assert DecisionConfig.from_args([], env={}) == DecisionConfig()


@pytest.mark.parametrize(
    ("argv", "env", "said"),
    [
        (["--policy", "nope"], {}, "unknown policy 'nope'"),
        (["--port", "70000"], {}, "port must be in 0..65535"),
        (["--max-gpus", "0"], {}, "max_gpus must be at least 1"),
        ([], {"GANGLION_DECISION_PORT": "x"}, "GANGLION_DECISION_PORT='x'"),
    ],
)
def test_config_rejects_bad_values(
    argv: list[str], env: dict[str, str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        DecisionConfig.from_args(argv, env=env)
    assert exc.value.code == 2
    assert said in capsys.readouterr().err


async def test_cli_prints_ready_line_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ganglion_decision",
            "--port",
            "0",
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            m = re.fullmatch(
                r"ganglion-decision listening on (127\.0\.0\.1:\d+) policy=(\S+)\n", line
            )
            assert m, (line, log_path.read_text())
            assert m.group(2) == policies.DEFAULT_POLICY
            async with rpc.channel(m.group(1)) as channel:
                stub = decision_pb2_grpc.DecisionServiceStub(channel)
                response = await stub.Schedule(request(), timeout=TIMEOUT_S)
            assert response.policy == policies.DEFAULT_POLICY and response.placements

            proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(proc.stdout.read(), 10)
            rc = await asyncio.wait_for(proc.wait(), 10)
            assert rc == 0, log_path.read_text()
            assert rest == b""  # the ready line was the only stdout line
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 5)
    assert "decision service stopping" in log_path.read_text()


async def test_a_taken_port_exits_2_with_one_line_naming_it() -> None:
    taken, port, _ = await rpc.start_server(lambda s: None, [])
    try:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "ganglion_decision", "--port", str(port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await taken.stop(grace=None)
    assert proc.returncode == 2 and out == b""
    assert f"could not listen on 127.0.0.1:{port}" in err.decode()
    assert "Traceback" not in err.decode()
