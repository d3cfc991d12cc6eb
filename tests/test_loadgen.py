"""The load generator against real servers (in-process gRPC, a real NATS), the decision
service's worker processes on one port, and a quick run of the benchmark runner."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from ganglion import bus, rpc
from ganglion.bus import NatsServer
from ganglion.convert import job_from_proto, job_to_proto, state_from_proto, state_to_proto
from ganglion.loadgen import (
    OK,
    SCHEDULE_METHOD,
    DecisionLoad,
    LoadgenError,
    LoadReport,
    RawScheduleClient,
    Schedule,
    TelemetryLoad,
    load_decision,
    load_telemetry,
    open_loop,
    synthetic_request,
    transfer_available,
)
from ganglion.v1 import decision_pb2, telemetry_pb2
from ganglion_decision import DecisionConfig, serve

TIMEOUT_S = 10.0
GANGLION = Path(sys.executable).parent / "ganglion"


@pytest.fixture
async def decision_addr() -> AsyncIterator[str]:
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(DecisionConfig(port=0), stop, ready=port.set_result))
    await asyncio.wait_for(asyncio.shield(port), TIMEOUT_S)
    yield f"127.0.0.1:{port.result()}"
    stop.set()
    await asyncio.wait_for(task, TIMEOUT_S)


async def test_cli_decision_open_loop_records_every_call(
    decision_addr: str, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    proc = await asyncio.create_subprocess_exec(
        str(GANGLION),
        "loadgen",
        "decision",
        "--addr",
        decision_addr,
        "--rate",
        "40",
        "--duration",
        "1",
        "--warmup",
        "0.25",
        "--state-gpus",
        "64",
        "--pending",
        "4",
        "--json",
        str(out),
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert "throughput" in stdout.decode() and "p99" in stdout.decode()
    report = LoadReport.from_json(out.read_text())
    # 40/s for 1 s after the warm-up: exactly 40 calls were scheduled in the window.
    assert (report.mode, report.sent, report.ok, report.failed) == ("open", 40, 40, 0)
    histogram = report.histogram_object()
    assert histogram.get_total_count() == report.latency.count == 40
    assert 0 < report.latency.p(50) <= report.latency.p(99) <= report.latency.max_ms
    assert report.params["state_gpus"] == 64 and report.params["placements"] > 0
    assert LoadReport.from_json(report.to_json()) == report
    assert json.loads(out.read_text())["target"] == "decision"


def test_synthetic_request_survives_the_converters() -> None:
    """The request the load generator sends decodes to domain values and encodes back to
    the same message (the hot-path converters are lossless)."""
    request = synthetic_request(100, 6, seed=3)
    state = state_from_proto(request.cluster)
    jobs = [job_from_proto(j) for j in request.pending]
    assert state.num_gpus == 100 and len(state.hosts) == 13 and state.running
    assert all(j.command and j.env for j in jobs)
    again = decision_pb2.ScheduleRequest(
        cluster=state_to_proto(state), pending=[job_to_proto(j) for j in jobs]
    )
    assert again == request


async def test_closed_loop_mode_measures_throughput(decision_addr: str) -> None:
    report = await load_decision(
        DecisionLoad(
            decision_addr, rate=None, duration_s=0.5, warmup_s=0.1, state_gpus=32, pending=2
        )
    )
    assert report.mode == "closed" and report.ok > 0 and report.failed == 0
    assert report.latency.count == report.completed
    assert report.achieved_per_s > 0


async def test_bad_target_is_a_clear_error(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(GANGLION),
        "loadgen",
        "decision",
        "--addr",
        f"127.0.0.1:{bus.free_port()}",
        "--rate",
        "10",
        "--duration",
        "1",
        "--timeout",
        "1",
        "--quiet",
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "no gRPC server answered" in stderr.decode()


async def test_open_loop_charges_a_stall_to_every_call_scheduled_during_it() -> None:
    """No coordinated omission: one slow call holds the only slot for 0.3 s; the calls
    scheduled meanwhile are late, and their latency counts from when they were due."""
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3 if calls == 1 else 0)
        return OK

    schedule = Schedule(time.perf_counter(), warmup_s=0.0, duration_s=1.0)
    tally = await open_loop(call, rate=100, schedule=schedule, max_inflight=1, drain_s=5.0)
    assert tally.sent == tally.ok == 100
    h = tally.histogram
    assert h.get_max_value() >= 290_000  # us: the stalled call itself
    # Calls due at 10, 20, ... 190 ms waited for the slot until ~300 ms: >= 100 ms late.
    late = sum(
        item.count_at_value_iterated_to
        for item in h.get_recorded_iterator()
        if item.value_iterated_to >= 100_000
    )
    assert late >= 15


async def test_telemetry_load_publishes_every_batch(
    nats_server: NatsServer, nc: NatsClient
) -> None:
    config = TelemetryLoad(nats_server.url, gpus=20, gpus_per_host=8, hz=4, duration_s=1.0)
    report = await load_telemetry(config)
    assert config.hosts == 3 and config.batches == 12
    assert (report.sent, report.ok, report.failed) == (12, 12, 0)
    js = nc.jetstream()
    info = await js.stream_info(bus.TELEMETRY_STREAM)
    assert info.state.messages == 12
    kv = await js.key_value(bus.HOSTS_BUCKET)
    for i, gpus in enumerate([8, 8, 4]):
        entry = await kv.get(bus.telemetry_key(f"loadgen-{i:05d}"))
        sample = telemetry_pb2.HostSample.FromString(entry.value or b"")
        assert sample.backend == telemetry_pb2.COLLECTOR_BACKEND_SIM  # labelled simulated
        assert len(sample.gpus) == gpus
        assert all(g.HasField("gpu_utilization_percent") for g in sample.gpus)
    msg = await js.get_last_msg(bus.TELEMETRY_STREAM, bus.telemetry_subject("loadgen-00002"))
    batch = telemetry_pb2.TelemetryBatch.FromString(msg.data or b"")
    assert batch.sequence == 4 and batch.samples[0].host == "loadgen-00002"


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(inode)
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue  # closed meanwhile
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            out.add(m.group(1))
    return out


async def test_workers_serve_one_port_from_two_processes(tmp_path: Path) -> None:
    log_path = tmp_path / "decision.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ganglion_decision",
            "--port",
            "0",
            "--workers",
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            m = re.fullmatch(
                r"ganglion-decision listening on 127\.0\.0\.1:(\d+) policy=\S+ workers=2 "
                r"pids=(\d+),(\d+)\n",
                line,
            )
            assert m, (line, log_path.read_text())
            port, pids = int(m.group(1)), {int(m.group(2)), int(m.group(3))}
            assert len(pids) == 2 and proc.pid not in pids
            listening = _listening_inodes(port)
            for pid in pids:  # each worker holds its own listening socket on the port
                assert _socket_inodes(pid) & listening, f"pid {pid} does not listen on {port}"
            # 16 connections: the kernel hashes each to a worker, so both get some.
            report = await load_decision(
                DecisionLoad(
                    f"127.0.0.1:{port}",
                    rate=200,
                    duration_s=0.5,
                    warmup_s=0.0,
                    state_gpus=16,
                    pending=2,
                    connections=16,
                )
            )
            assert report.ok == 100 and report.failed == 0
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
    served: dict[int, int] = {}
    for raw in log_path.read_text().splitlines():
        record: dict[str, Any] = json.loads(raw)
        if record.get("msg") == "decision service stopping":
            served[record["pid"]] = record["requests"]
    assert set(served) == pids, log_path.read_text()
    assert all(n > 0 for n in served.values()), served  # two different processes answered
    assert sum(served.values()) >= 100  # the load, plus each client's probe


@pytest.mark.skipif(not transfer_available(), reason="TransferService not in this build")
async def test_transfer_load_fetches_the_pushed_blob() -> None:
    from ganglion.loadgen.transfer import TransferLoad, load_transfer
    from ganglion.transport.backends import MemoryBackend
    from ganglion.transport.service import SERVICE_NAME, TransferServicer
    from ganglion.v1 import data_pb2_grpc

    servicer = TransferServicer(MemoryBackend())

    def register(server: grpc.aio.Server) -> None:
        data_pb2_grpc.add_TransferServiceServicer_to_server(servicer, server)

    server, port, _ = await rpc.start_server(register, [SERVICE_NAME])
    try:
        report = await load_transfer(
            TransferLoad(
                f"127.0.0.1:{port}", rate=10, duration_s=0.5, warmup_s=0.0, blob_bytes=256 * 1024
            )
        )
    finally:
        await server.stop(grace=None)
    assert (report.sent, report.ok, report.failed) == (5, 5, 0)
    assert report.params["blob_bytes"] == 256 * 1024


@pytest.mark.skipif(not transfer_available(), reason="TransferService not in this build")
async def test_transfer_load_on_a_server_without_the_service_says_so() -> None:
    from ganglion.loadgen.transfer import TransferLoad, load_transfer

    server, port, _ = await rpc.start_server(lambda s: None, [])
    try:
        load = TransferLoad(f"127.0.0.1:{port}", rate=10, duration_s=0.5, warmup_s=0.0)
        with pytest.raises(LoadgenError, match=rf"^no TransferService at 127.0.0.1:{port}$"):
            await asyncio.wait_for(load_transfer(load), 30)
    finally:
        await server.stop(grace=None)


def test_bench_quick_core_writes_results(tmp_path: Path) -> None:
    from tools.bench.__main__ import load, main

    assert main(["--quick", "--only", "core", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["results"]
    assert rows and {r["module"] for r in rows} == {"core"}
    for r in rows:
        assert r["value"] > 0 and r["baseline"] > 0
        assert r["ratio"] == pytest.approx(r["baseline"] / r["value"])
    table = (tmp_path / "results.md").read_text()
    assert "| module | benchmark | value | baseline | ratio | note |" in table
    assert all(r["name"] in table for r in rows)
    assert load("no_such_benchmark") is None  # "not written yet", reported as absent


async def test_calls_go_to_the_connection_with_fewest_in_flight() -> None:
    """Two connections, one answered slowly (as a busier worker would): the client sends most
    calls on the other, where blind round-robin would split them evenly."""
    peers: dict[str, int] = {}
    slow: list[str] = []

    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        peer = context.peer()
        peers[peer] = peers.get(peer, 0) + 1
        if not slow:
            slow.append(peer)  # the first connection to call in is the slow one
        if peer == slow[0]:
            await asyncio.sleep(0.05)
        return b""

    service, method = SCHEDULE_METHOD.strip("/").split("/")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service, {method: grpc.unary_unary_rpc_method_handler(answer)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = RawScheduleClient(f"127.0.0.1:{port}", 2)
    try:
        await client.wait_ready(TIMEOUT_S)

        async def loop() -> None:
            for _ in range(25):
                await client.call(b"", TIMEOUT_S)

        await asyncio.wait_for(asyncio.gather(*(loop() for _ in range(4))), TIMEOUT_S)
        assert client.in_flight == (0, 0)
    finally:
        await client.close()
        await server.stop(grace=None)
    assert sum(peers.values()) == 100 and len(peers) == 2
    assert peers[slow[0]] < 25, peers  # round-robin would have sent it 50


@pytest.mark.parametrize("chunk_kib", ["1", "20000"])
def test_transfer_chunk_size_out_of_range_is_one_line(
    chunk_kib: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It ended in a ValueError traceback from deep in the run."""
    from ganglion.cli import main as ganglion

    argv = ["loadgen", "transfer", "--addr", "127.0.0.1:1", "--max", "--chunk-kib", chunk_kib]
    with pytest.raises(SystemExit) as done:
        ganglion([*argv, "--duration", "1"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "chunk size must be 4 to 16384 KiB" in err and "Traceback" not in err
