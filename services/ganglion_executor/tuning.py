"""Closes the data-plane loop on one host: ask the decision service, apply the answer.

Every ``--tune-interval`` seconds, with ``--decision-addr`` set:

* ``SizeCaches`` with this host's CacheStats (capacity, per-tenant requests and SHARDS
  curves); the budgets it returns are applied like a ``SetCacheBudgets``.
* ``TuneTransport`` with ``--link-bandwidth`` (skipped when 0, i.e. unknown) and what this host
  measures itself: the lz4 ratio and speeds on a sample of the blobs it caches. The chunk
  size, level and on/off it returns become the defaults of this host's TransferService (for
  what it serves) and of its read-through fetches.

A slow or absent decision service costs a logged warning and the previous settings stay.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import grpc
import lz4.frame

from ganglion import rpc
from ganglion.cache.errors import BlobNotFoundError, BudgetError
from ganglion.transport.frames import TransportSettings
from ganglion.v1 import data_pb2, decision_pb2, decision_pb2_grpc
from ganglion_executor.datacache import DataPlane

log = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 20


@dataclass(frozen=True)
class Compressibility:
    """lz4 (level 0) on a sample of cached data."""

    ratio: float
    """Compressed / raw bytes."""
    compress_bytes_per_s: float
    """Raw bytes compressed per second."""
    decompress_bytes_per_s: float
    """Raw bytes decompressed per second."""


def measure(
    dataplane: DataPlane, blobs: int = 4, rng: random.Random | None = None
) -> Compressibility | None:
    """Compress the first MiB of a few cached blobs; None when the cache is empty."""
    raw = stored = 0
    t_c = t_d = 0.0
    for blob_id in dataplane.store.sample(blobs, rng):
        try:
            with dataplane.store.open(blob_id, record=False) as r:
                data = r.pread(0, SAMPLE_BYTES)
        except BlobNotFoundError:
            continue  # evicted meanwhile
        t0 = time.perf_counter()
        packed = lz4.frame.compress(data, content_checksum=False)
        t1 = time.perf_counter()
        lz4.frame.decompress(packed)
        t2 = time.perf_counter()
        raw += len(data)
        stored += min(len(packed), len(data))
        t_c += t1 - t0
        t_d += t2 - t1
    if raw == 0:
        return None
    return Compressibility(stored / raw, raw / max(t_c, 1e-9), raw / max(t_d, 1e-9))


class DataPlaneTuner:
    """See the module docstring."""

    def __init__(
        self,
        dataplane: DataPlane,
        decision_addr: str,
        interval_s: float,
        link_bandwidth_bytes_per_s: float = 0.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._dp = dataplane
        self._addr = decision_addr
        self._interval_s = interval_s
        self._bandwidth = link_bandwidth_bytes_per_s
        self._timeout_s = timeout_s
        self.rounds = 0
        """Rounds in which SizeCaches answered and its budgets were applied."""

    async def tick(self, stub: decision_pb2_grpc.DecisionServiceAsyncStub) -> None:
        stats = self._dp.backend.cache_stats()
        if stats.tenants:
            resp = await stub.SizeCaches(
                decision_pb2.SizeCachesRequest(hosts=[stats]), timeout=self._timeout_s
            )
            (host,) = resp.hosts
            # The default tenant ("", whatever runs without GANGLION_TENANT) is the shared
            # pool, which gets what the others leave: a budget for it was refused, and with
            # it the whole answer, every round.
            budgets = {b.tenant: b.budget_bytes for b in host.budgets if b.tenant}
            try:
                if await self._dp.set_budgets(budgets, None):
                    log.info(
                        "cache budgets from SizeCaches",
                        extra={"budgets": budgets, "policy": resp.policy, "reason": host.reason},
                    )
                self.rounds += 1
            except BudgetError as exc:  # a decision we cannot apply: keep the old budgets
                log.warning("SizeCaches answer not applied: %s", exc)
        if self._bandwidth <= 0:
            return
        seen = await asyncio.to_thread(measure, self._dp)
        if seen is None:
            return
        plan = await stub.TuneTransport(
            decision_pb2.TuneTransportRequest(
                link_bandwidth_bytes_per_s=self._bandwidth,
                compressibility=max(seen.ratio, 1e-3),
                lz4_compress_bytes_per_s=seen.compress_bytes_per_s,
                lz4_decompress_bytes_per_s=seen.decompress_bytes_per_s,
            ),
            timeout=self._timeout_s,
        )
        settings = TransportSettings(
            chunk_bytes=plan.chunk_bytes,
            compress=plan.compression != data_pb2.COMPRESSION_NONE,
            lz4_level=plan.lz4_level,
        )
        if settings != self._dp.servicer.settings:
            log.info("transport settings from TuneTransport", extra={"reason": plan.reason})
        self._dp.servicer.settings = settings
        self._dp.backend.settings = settings

    async def run(self) -> None:
        async with rpc.channel(self._addr) as ch:
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            while True:
                try:
                    await self.tick(stub)
                except grpc.aio.AioRpcError as exc:
                    log.warning("decision service: %s %s", exc.code().name, exc.details())
                await asyncio.sleep(self._interval_s)
