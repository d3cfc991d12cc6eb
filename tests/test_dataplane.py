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
from typing import Any

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
        # 100 MiB in 1-byte steps held the service for seconds (1 TiB: terabytes of grid).
        (decision_pb2.SizeCachesRequest(hosts=[host], quantum_bytes=1), "quantum_bytes"),
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
    # A speed that underflowed to 0 in the goodput model: INTERNAL (ZeroDivisionError) before.
    tiny = decision_pb2.TuneTransportRequest(
        link_bandwidth_bytes_per_s=1e308, compressibility=0.3, lz4_compress_bytes_per_s=5e-324
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decision.TuneTransport(tiny, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("lz4_compress_bytes_per_s")


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
        # Also the default tenant (no GANGLION_TENANT): its budget was refused, and with it
        # every answer, so no budget was ever applied.
        await DataClient(executor_addr=f"127.0.0.1:{port}").aput(b"shared" * 1000)
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


# --- read-through under failure --------------------------------------------------------------


class _Stalls(data_pb2_grpc.TransferServiceServicer):
    """A real TransferService that announces a blob and then sends nothing."""

    def __init__(self, blob_id: str, size: int) -> None:
        self.blob_id, self.size = blob_id, size

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield data_pb2.FetchResponse(info=data_pb2.BlobInfo(blob_id=self.blob_id, size=self.size))
        await asyncio.sleep(3600)


@contextlib.asynccontextmanager
async def transfer_server(servicer: Any) -> AsyncIterator[str]:
    def register(server: grpc.aio.Server) -> None:
        data_pb2_grpc.add_TransferServiceServicer_to_server(servicer, server)

    server, port, _ = await rpc.start_server(register, [SERVICE_NAME])
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def _sources(*addresses: str) -> Any:
    async def sources() -> list[str]:
        return list(addresses)

    return sources


async def test_a_cancelled_read_through_releases_the_blob(tmp_path: Path) -> None:
    """The caller gave up mid-transfer: the blob stayed 'being written' until a restart, and
    every later fetch of it failed."""
    from ganglion.cache.store import BlobStore
    from ganglion.transport.backends import StoreBackend

    data = os.urandom(64 * 1024)
    blob = blob_id_of(data)
    good = MemoryBackend()
    good.add(data)
    async with (
        transfer_server(_Stalls(blob, len(data))) as stalls,
        origin_server(good) as origin,
    ):
        store = BlobStore(tmp_path / "cache", 8 * MIB, durable=False)
        backend = StoreBackend(store, "h1", _sources(stalls))
        fetching = asyncio.create_task(backend.open_blob(blob, "", local_only=False))
        await asyncio.sleep(0.5)  # announced, then nothing: the writer is open
        fetching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(fetching, TIMEOUT)
        backend = StoreBackend(store, "h1", _sources(origin))
        reader = await asyncio.wait_for(backend.open_blob(blob, "", local_only=False), TIMEOUT)
        with reader:
            assert reader.read() == data
        await backend.close()


async def test_read_through_moves_past_a_corrupt_source_and_reports_a_down_one(
    tmp_path: Path,
) -> None:
    from ganglion.cache.store import BlobStore
    from ganglion.transport.backends import StoreBackend
    from ganglion.transport.errors import TransferError

    data = os.urandom(256 * 1024)
    good, bad = MemoryBackend(), MemoryBackend()
    blob = good.add(data)
    bad.blobs[blob] = bytes(len(data))  # the right size, the wrong bytes
    store = BlobStore(tmp_path / "cache", 8 * MIB, durable=False)
    async with origin_server(bad) as liar, origin_server(good) as origin:
        backend = StoreBackend(store, "h1", _sources(liar, origin))
        reader = await asyncio.wait_for(backend.open_blob(blob, "", local_only=False), TIMEOUT)
        with reader:
            assert reader.read() == data  # IntegrityError escaped before the origin was asked
        await backend.close()
    # A source that cannot answer is retryable (UNAVAILABLE), not NOT_FOUND ("no one has it").
    other = os.urandom(1024)
    down = StoreBackend(store, "h1", _sources(f"127.0.0.1:{free_port()}"))
    with pytest.raises(TransferError, match="no source could send it"):
        await asyncio.wait_for(down.open_blob(blob_id_of(other), "", local_only=False), TIMEOUT)
    await down.close()
    # ... unless the last source, the origin, says no one has it: that is final.
    from ganglion.cache.errors import BlobNotFoundError

    async with origin_server(MemoryBackend()) as empty_origin:
        missing = StoreBackend(store, "h1", _sources(f"127.0.0.1:{free_port()}", empty_origin))
        with pytest.raises(BlobNotFoundError):
            await asyncio.wait_for(
                missing.open_blob(blob_id_of(other), "", local_only=False), TIMEOUT
            )
        await missing.close()


async def test_get_refuses_a_cached_copy_changed_on_disk(tmp_path: Path) -> None:
    from ganglion.data import DataError

    data = os.urandom(64 * 1024)
    blob = blob_id_of(data)
    path = tmp_path / "cache" / "blobs" / blob[:2] / blob
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    client = DataClient(tmp_path / "cache", "", tenant="t")
    with pytest.raises(DataError, match="does not match its sha256"):
        await client.aget(blob)
    # With a source to ask, the good copy comes from there.
    origin = MemoryBackend()
    origin.add(data)
    async with origin_server(origin) as address:
        with_source = DataClient(tmp_path / "cache", "", (address,), tenant="t")
        assert await with_source.aget(blob) == data


async def test_a_first_caller_giving_up_does_not_fail_the_others_waiting(tmp_path: Path) -> None:
    """Concurrent misses of one blob share one fill; when the caller that started it was
    cancelled, every other waiter failed with 'cancelled' though the fill could finish."""
    from ganglion.cache.store import BlobStore
    from ganglion.transport.backends import StoreBackend
    from ganglion.transport.proxy import BandwidthProxy

    data = os.urandom(512 * 1024)
    good = MemoryBackend()
    blob = good.add(data)
    async with origin_server(good) as origin:
        host, port = origin.rsplit(":", 1)
        async with BandwidthProxy(host, int(port), 512 * 1024, burst_bytes=32 * 1024) as slow:
            store = BlobStore(tmp_path / "cache", 8 * MIB, durable=False)
            backend = StoreBackend(store, "h1", _sources(slow.address))
            first = asyncio.create_task(backend.open_blob(blob, "", local_only=False))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(backend.open_blob(blob, "", local_only=False))
            await asyncio.sleep(0.2)  # the fill is ~1 s at 512 KiB/s
            first.cancel()
            reader = await asyncio.wait_for(second, TIMEOUT)
            with reader:
                assert reader.read() == data
            with pytest.raises(asyncio.CancelledError):
                await first
            await backend.close()
