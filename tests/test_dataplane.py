"""The data plane end to end: SizeCaches/TuneTransport on the real decision service, and a
real executor (NATS, gRPC on port 0) serving TransferService, reading through to an origin
and to a peer, applying budgets live, publishing CacheStats and /metrics, and its jobs
reading blobs with ``ganglion.data``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from ganglion import rpc
from ganglion.bus import NatsServer, free_port
from ganglion.cache.proto import curve_to_proto
from ganglion.cache.shards import MissRatioCurve
from ganglion.cache.store import blob_id_of
from ganglion.data import DataClient
from ganglion.transport import decode_frame
from ganglion.transport.backends import MemoryBackend
from ganglion.transport.service import SERVICE_NAME, TransferServicer
from ganglion.v1 import (
    cluster_pb2,
    data_pb2,
    data_pb2_grpc,
    decision_pb2,
    decision_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
)
from ganglion_decision import DecisionConfig
from ganglion_decision import serve as serve_decision
from ganglion_executor import ExecutorConfig
from ganglion_executor import serve as serve_executor
from ganglion_executor.datacache import CACHE_STATS_TYPE, cache_subject

TIMEOUT = 20
MIB = 1 << 20


# --- decision: SizeCaches / TuneTransport --------------------------------------------


@pytest.fixture
async def decision_port() -> AsyncIterator[int]:
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_decision(DecisionConfig(port=0), stop, ready.set_result))
    yield await asyncio.wait_for(ready, TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)


@pytest.fixture
async def decision(decision_port: int) -> AsyncIterator[decision_pb2_grpc.DecisionServiceAsyncStub]:
    async with rpc.channel(f"127.0.0.1:{decision_port}") as ch:
        yield decision_pb2_grpc.DecisionServiceStub(ch)


def tenant(name: str, requests: int, points: list[tuple[int, float]]) -> data_pb2.TenantCacheStats:
    sizes, ratios = zip(*points, strict=True)
    curve = MissRatioCurve(tuple(sizes), tuple(ratios), requests, 1.0)
    return data_pb2.TenantCacheStats(tenant=name, mrc=curve_to_proto(curve))


async def test_size_caches_beats_an_equal_split(
    decision: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> None:
    cap = 100 * MIB
    host = data_pb2.CacheStats(
        host="h1",
        capacity_bytes=cap,
        tenants=[
            # Working set of 30 MiB, then flat.
            tenant("small", 1000, [(0, 1.0), (30 * MIB, 0.1), (200 * MIB, 0.1)]),
            # A scan: nothing hits until the whole 60 MiB loop fits (a cliff).
            tenant("scan", 1000, [(0, 1.0), (60 * MIB - 1, 1.0), (60 * MIB, 0.0)]),
            # Never reuses anything.
            tenant("stream", 1000, [(0, 1.0), (200 * MIB, 1.0)]),
        ],
    )
    resp = await decision.SizeCaches(decision_pb2.SizeCachesRequest(hosts=[host]), timeout=TIMEOUT)
    assert resp.policy == "greedy-mrc" and resp.version
    (h,) = resp.hosts
    budgets = {b.tenant: b.budget_bytes for b in h.budgets}
    assert sum(budgets.values()) <= cap
    assert budgets["small"] >= 30 * MIB and budgets["scan"] >= 60 * MIB - cap // 256
    assert h.expected_hit_ratio > 2 * h.equal_split_hit_ratio and h.reason

    equal = await decision.SizeCaches(
        decision_pb2.SizeCachesRequest(hosts=[host], policy="equal-split"), timeout=TIMEOUT
    )
    assert equal.hosts[0].expected_hit_ratio == pytest.approx(h.equal_split_hit_ratio)

    bad = data_pb2.CacheStats(host="h1", capacity_bytes=cap)
    bad.tenants.add(tenant="x", mrc=data_pb2.MissRatioCurve(cache_bytes=[0, 5], miss_ratio=[1.0]))
    for req, field in (
        (decision_pb2.SizeCachesRequest(hosts=[bad]), "hosts[0].tenants[0].mrc"),
        (decision_pb2.SizeCachesRequest(hosts=[host], policy="nope"), "policy"),
        (decision_pb2.SizeCachesRequest(hosts=[data_pb2.CacheStats()]), "hosts[0].host"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await decision.SizeCaches(req, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(field)


async def test_tune_transport_compresses_only_where_it_pays(
    decision: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> None:
    async def tune(bandwidth: float, ratio: float) -> decision_pb2.TuneTransportResponse:
        req = decision_pb2.TuneTransportRequest(
            link_bandwidth_bytes_per_s=bandwidth, compressibility=ratio
        )
        return await decision.TuneTransport(req, timeout=TIMEOUT)

    slow = await tune(10e6, 0.25)  # 10 MB/s link, data shrinks 4x
    assert slow.compression == data_pb2.COMPRESSION_LZ4 and slow.policy == "analytic"
    assert slow.expected_goodput_bytes_per_s > 3 * slow.raw_goodput_bytes_per_s
    assert slow.lz4_level > 0  # a slow link can afford a high-compression level
    fast = await tune(10e9, 0.25)  # faster than lz4 itself
    assert fast.compression == data_pb2.COMPRESSION_NONE
    noise = await tune(10e6, 0.97)  # saves under 10%
    assert noise.compression == data_pb2.COMPRESSION_NONE
    assert 256 * 1024 <= slow.chunk_bytes <= fast.chunk_bytes <= 4 * MIB
    for bandwidth, ratio, field in ((0.0, 0.5, "link_bandwidth"), (1e6, 1.5, "compressibility")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await tune(bandwidth, ratio)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(field)


# --- executor: TransferService, budgets, stats ---------------------------------------


@contextlib.asynccontextmanager
async def running_executor(config: ExecutorConfig, nats_url: str) -> AsyncIterator[int]:
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_executor(config, nats_url, stop, ready.set_result))
    done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready in done, "executor did not become ready"
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def origin_server(backend: MemoryBackend) -> AsyncIterator[str]:
    def register(server: grpc.aio.Server) -> None:
        data_pb2_grpc.add_TransferServiceServicer_to_server(TransferServicer(backend), server)

    server, port, _ = await rpc.start_server(register, [SERVICE_NAME])
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def config(tmp_path: Path, host: str, origin: str = "", **kw: object) -> ExecutorConfig:
    return ExecutorConfig(
        host=host,
        state_dir=tmp_path / host,
        port=0,
        backend="sim",
        sim_gpus=2,
        stop_jobs_on_exit=True,
        poll_interval_s=0.05,
        origin=origin,
        cache_bytes=8 * MIB,
        cache_stats_interval_s=0.2,
        register_interval_s=0.2,
        **kw,  # type: ignore[arg-type]
    )


async def test_executor_reads_through_counts_and_applies_budgets(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    origin = MemoryBackend()
    shard = os.urandom(3 * MIB)
    text = b"step=1 loss=0.5 acc=0.9\n" * 40_000
    ids = [origin.add(shard), origin.add(text)]
    metrics_port = free_port()
    async with (
        origin_server(origin) as origin_addr,
        running_executor(
            config(tmp_path, "h1", origin_addr, metrics_port=metrics_port), nats_server.url
        ) as port,
        rpc.channel(f"127.0.0.1:{port}") as ch,
    ):
        client = DataClient(tmp_path / "h1" / "cache", f"127.0.0.1:{port}", tenant="alice")
        assert await client.aget(ids[0]) == shard  # miss: the executor fetched from the origin
        assert await client.aget(ids[0]) == shard  # hit: read from the cache directory
        with await client.aopen(ids[1]) as f:
            assert f.read() == text
        transfer = data_pb2_grpc.TransferServiceStub(ch)
        stats = await transfer.GetCacheStats(data_pb2.GetCacheStatsRequest(), timeout=TIMEOUT)
        (alice,) = [t for t in stats.tenants if t.tenant == "alice"]
        assert (alice.hits, alice.misses) == (1, 2) and stats.used_bytes == len(shard) + len(text)
        assert alice.mrc.requests == 3

        # Budgets: declarative and idempotent; shrinking evicts.
        ex = executor_pb2_grpc.ExecutorServiceStub(ch)
        req = executor_pb2.SetCacheBudgetsRequest(
            host="h1",
            budgets=[data_pb2.CacheBudget(tenant="alice", budget_bytes=2 * MIB)],
            capacity_bytes=4 * MIB,
        )
        first = await ex.SetCacheBudgets(req, timeout=TIMEOUT)
        again = await ex.SetCacheBudgets(req, timeout=TIMEOUT)
        assert first.changed and not again.changed
        # The blobs were cached in the shared pool, now 2 MiB: the 3 MiB shard had to go.
        assert again.stats.used_bytes == len(text) and again.stats.blobs == 1
        parts = {p.name: p.budget_bytes for p in again.stats.partitions}
        assert parts == {"": 2 * MIB, "alice": 2 * MIB}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ex.SetCacheBudgets(
                executor_pb2.SetCacheBudgetsRequest(
                    budgets=[data_pb2.CacheBudget(tenant="a", budget_bytes=9 * MIB)]
                ),
                timeout=TIMEOUT,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Stats on NATS, in the telemetry stream, typed by header.
        msg = await nc.jetstream().get_last_msg("GANGLION_TELEMETRY", cache_subject("h1"))
        assert (msg.headers or {}).get("Ganglion-Type") == CACHE_STATS_TYPE
        assert data_pb2.CacheStats.FromString(msg.data).host == "h1"

        # And on /metrics.
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        metrics = await asyncio.to_thread(_scrape, url)
        assert 'ganglion_cache_hits_total{host="h1",tenant="alice"} 1.0' in metrics


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return r.read().decode()


JOB_READS_BLOB = (
    "import sys, ganglion.data; open(sys.argv[1], 'wb').write(ganglion.data.get(sys.argv[2]))"
)


async def test_a_job_reads_a_blob_another_host_holds(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = os.urandom(MIB + 123)
    out = tmp_path / "job-output"
    async with (
        running_executor(config(tmp_path, "h1"), nats_server.url) as p1,
        running_executor(config(tmp_path, "h2"), nats_server.url) as p2,
        rpc.channel(f"127.0.0.1:{p2}") as ch,
    ):
        # A checkpoint written on h1 (no origin anywhere: h2 can only get it from its peer).
        blob = await DataClient(executor_addr=f"127.0.0.1:{p1}").aput(data)
        assert blob == blob_id_of(data)
        job = cluster_pb2.Job(
            id="reader",
            tenant="t",
            gpus=1,
            command=[sys.executable, "-c", JOB_READS_BLOB, str(out), blob],
        )
        ex = executor_pb2_grpc.ExecutorServiceStub(ch)
        await ex.Apply(
            executor_pb2.ApplyRequest(
                host="h2",
                generation=1,
                assignments=[executor_pb2.Assignment(job=job, gpu_indices=[0])],
            ),
            timeout=TIMEOUT,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            status = await ex.Status(executor_pb2.StatusRequest(), timeout=TIMEOUT)
            (j,) = status.jobs
            if j.state in (cluster_pb2.JOB_STATE_SUCCEEDED, cluster_pb2.JOB_STATE_FAILED):
                break
            assert time.monotonic() < deadline, "job did not finish"
            await asyncio.sleep(0.1)
        assert j.state == cluster_pb2.JOB_STATE_SUCCEEDED, _read(Path(j.log_path))
        assert _read(out) == data
        stats = await data_pb2_grpc.TransferServiceStub(ch).GetCacheStats(
            data_pb2.GetCacheStatsRequest(), timeout=TIMEOUT
        )
        assert stats.blobs == 1 and sum(t.misses for t in stats.tenants) == 1


async def test_executor_applies_what_the_decision_service_decides(
    nats_server: NatsServer,
    tmp_path: Path,
    decision: decision_pb2_grpc.DecisionServiceAsyncStub,
    decision_port: int,
) -> None:
    cfg = config(
        tmp_path,
        "h1",
        decision_addr=f"127.0.0.1:{decision_port}",
        tune_interval_s=0.1,
        link_bandwidth=10e6,  # 10 MB/s: TuneTransport picks 256 KiB chunks (default 1 MiB)
    )
    text = b"gpu=3 util=97 fb_used=71234 power=612.5\n" * 50_000
    async with (
        running_executor(cfg, nats_server.url) as port,
        rpc.channel(f"127.0.0.1:{port}") as ch,
    ):
        blob = await DataClient(executor_addr=f"127.0.0.1:{port}", tenant="alice").aput(text)
        transfer = data_pb2_grpc.TransferServiceStub(ch)
        deadline = time.monotonic() + TIMEOUT
        while True:
            stats = await transfer.GetCacheStats(data_pb2.GetCacheStatsRequest(), timeout=TIMEOUT)
            if any(p.name == "alice" for p in stats.partitions):
                break
            assert time.monotonic() < deadline, "SizeCaches budgets never applied"
            await asyncio.sleep(0.1)
        frames = [
            r.frame
            async for r in transfer.Fetch(data_pb2.FetchRequest(blob_id=blob), timeout=TIMEOUT)
            if r.frame
        ]
        assert len(frames) == -(-len(text) // (256 * 1024))  # the tuned chunk size
        assert all(decode_frame(f).compressed for f in frames)


def test_importing_the_job_client_is_cheap() -> None:
    code = "import sys, ganglion.data; print(sorted({'grpc', 'numpy', 'google.protobuf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_peers_not_yet_registered_are_found_on_the_next_miss(nc: NatsClient) -> None:
    """Executors start together: a peer list read before the others registered is empty,
    and an empty list must not hide them for the cache's refresh period."""
    from ganglion import bus
    from ganglion_executor.datacache import PeerDirectory

    kv = await bus.ensure_streams(nc.jetstream())
    peers = PeerDirectory(kv, "h2", origin="")
    assert await peers.peers() == []
    info = executor_pb2.ExecutorInfo(host="h1", address="127.0.0.1:5001", gpu_count=1)
    await kv.put(bus.executor_key("h1"), info.SerializeToString())
    assert await asyncio.wait_for(peers.peers(), 10) == ["127.0.0.1:5001"]
