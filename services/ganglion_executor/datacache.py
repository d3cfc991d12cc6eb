"""The executor's data plane: the host's blob cache, its TransferService, live budgets,
cache statistics on NATS and on Prometheus ``/metrics``, and the environment of jobs.

* The cache lives in ``<state-dir>/cache`` within ``--cache-bytes``; misses read through to
  peer executors (found in the hosts KV bucket) and then ``--origin``.
* ``SetCacheBudgets`` (on ExecutorService) replaces the per-tenant budgets; it is declarative,
  so re-sending it is a no-op.
* Every ``--cache-stats-interval`` a ``CacheStats`` goes to ``ganglion.telemetry.<host>.cache``
  (header ``Ganglion-Type: ganglion.v1.CacheStats``), into the telemetry stream.
* Jobs find the cache through ``GANGLION_CACHE_DIR`` and ``GANGLION_EXECUTOR_ADDR``
  (see :mod:`ganglion.data`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PromCollector

from ganglion.bus import telemetry_subject
from ganglion.cache.errors import BudgetError
from ganglion.cache.store import BlobStore
from ganglion.observability import inject_headers
from ganglion.transport.backends import StoreBackend
from ganglion.transport.frames import TransportSettings
from ganglion.transport.service import SERVICE_NAME as TRANSFER_SERVICE
from ganglion.transport.service import TransferServicer
from ganglion.v1 import data_pb2_grpc, executor_pb2
from ganglion_executor.executor import Executor
from ganglion_executor.servicer import ExecutorServicer

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "GANGLION_CACHE_DIR"
ENV_EXECUTOR_ADDR = "GANGLION_EXECUTOR_ADDR"
CACHE_STATS_TYPE = "ganglion.v1.CacheStats"
MAX_PEER_PROBES = 8
"""Peers asked for a missing blob before the origin (each probe is one round trip)."""
PEERS_TTL_S = 5.0

__all__ = ["TRANSFER_SERVICE", "DataPlane", "DataPlaneExecutorServicer", "cache_subject"]


def cache_subject(host: str) -> str:
    return f"{telemetry_subject(host)}.cache"


class PeerDirectory:
    """Addresses of the other executors, from the hosts KV bucket, refreshed every few s."""

    def __init__(self, kv: KeyValue | None, host: str, origin: str) -> None:
        self._kv = kv
        self._host = host
        self._origin = origin
        self._peers: list[str] = []
        self._at = -PEERS_TTL_S

    async def peers(self) -> list[str]:
        # An empty list is asked again every time: seen before the other executors registered
        # (they start together), it would hide them for PEERS_TTL_S.
        fresh = time.monotonic() - self._at < PEERS_TTL_S
        if self._kv is None or (fresh and self._peers):
            return self._peers
        self._at = time.monotonic()
        found: list[str] = []
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            keys = []
        except (NatsError, OSError, TimeoutError) as exc:
            log.warning("could not list peers: %s", exc)
            return self._peers
        for key in keys:
            if not key.startswith("executor.") or key == f"executor.{self._host}":
                continue
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                entry = await self._kv.get(key)
                if entry.value:
                    found.append(executor_pb2.ExecutorInfo.FromString(entry.value).address)
        self._peers = found
        return found

    async def sources(self) -> Sequence[str]:
        """A few peers (in random order, spreading load), then the origin."""
        peers = list(await self.peers())
        random.shuffle(peers)
        return [*peers[:MAX_PEER_PROBES], *([self._origin] if self._origin else [])]


class DataPlane:
    """Owns the cache and everything around it for one executor."""

    def __init__(
        self,
        host: str,
        cache_dir: Path,
        capacity: int,
        policy: str,
        origin: str = "",
        kv: KeyValue | None = None,
        settings: TransportSettings | None = None,
    ) -> None:
        self.host = host
        self.cache_dir = cache_dir
        self.store = BlobStore(cache_dir, capacity, policy)
        self.peers = PeerDirectory(kv, host, origin)
        self.backend = StoreBackend(self.store, host, self.peers.sources, settings)
        self.servicer = TransferServicer(self.backend, settings)
        self._boot_id = uuid.uuid4().hex[:12]
        self.published = 0
        """CacheStats messages the telemetry stream acknowledged."""

    def register(self, server: grpc.aio.Server) -> None:
        data_pb2_grpc.add_TransferServiceServicer_to_server(self.servicer, server)

    async def set_budgets(self, budgets: Mapping[str, int], capacity: int | None) -> bool:
        # Evictions unlink files: off the event loop.
        return await asyncio.to_thread(self.store.set_budgets, budgets, capacity)

    async def publish_stats(self, nc: NatsClient, timeout_s: float = 2.0) -> bool:
        msg = self.backend.cache_stats()
        try:
            await nc.jetstream().publish(
                cache_subject(self.host),
                msg.SerializeToString(),
                timeout=timeout_s,
                headers=inject_headers(
                    {
                        "Nats-Msg-Id": f"{self.host}:cache:{self._boot_id}:{msg.sequence}",
                        "Ganglion-Type": CACHE_STATS_TYPE,
                    }
                ),
            )
        except Exception as exc:  # NATS away: the next interval publishes fresh numbers
            log.warning("cache stats publish failed: %s: %s", type(exc).__name__, exc)
            return False
        self.published += 1
        return True

    async def publish_forever(self, nc: NatsClient, interval_s: float) -> None:
        while True:
            await self.publish_stats(nc)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        await self.backend.close()


def job_environment(cache_dir: Path, executor_addr: str) -> dict[str, str]:
    """What a job needs to reach this host's cache (read by ``ganglion.data``)."""
    return {ENV_CACHE_DIR: str(cache_dir), ENV_EXECUTOR_ADDR: executor_addr}


class DataPlaneExecutorServicer(ExecutorServicer):
    """ExecutorService plus ``SetCacheBudgets``."""

    def __init__(self, executor: Executor, dataplane: DataPlane) -> None:
        super().__init__(executor)
        self._host = executor.host
        self._dataplane = dataplane

    async def SetCacheBudgets(
        self,
        request: executor_pb2.SetCacheBudgetsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> executor_pb2.SetCacheBudgetsResponse:
        if request.host and request.host != self._host:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"host: is {request.host!r} but this executor runs {self._host!r}",
            )
        budgets: dict[str, int] = {}
        for i, b in enumerate(request.budgets):
            if b.tenant in budgets:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"budgets[{i}].tenant: duplicate tenant {b.tenant!r}",
                )
            budgets[b.tenant] = b.budget_bytes
        try:
            changed = await self._dataplane.set_budgets(budgets, request.capacity_bytes or None)
        except BudgetError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"budgets: {exc}")
        if changed:
            log.info("cache budgets applied", extra={"budgets": budgets})
        return executor_pb2.SetCacheBudgetsResponse(
            changed=changed, stats=self._dataplane.backend.cache_stats()
        )


class CacheCollector(PromCollector):
    """Renders the store's snapshot at scrape time."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    def collect(self) -> Iterator[Metric]:
        dp = self._dp
        snap = dp.store.snapshot()
        host = dp.host
        for name, doc, value in (
            ("ganglion_cache_capacity_bytes", "Cache budget of the host.", snap.capacity),
            ("ganglion_cache_used_bytes", "Bytes of distinct blobs on disk.", snap.used),
            ("ganglion_cache_blobs", "Distinct blobs on disk.", snap.blobs),
        ):
            g = GaugeMetricFamily(name, doc, labels=["host"])
            g.add_metric([host], value)
            yield g
        tenant_counters = (
            ("ganglion_cache_hits", "Requests served from this host's cache.", "hits"),
            ("ganglion_cache_misses", "Requests not found in this host's cache.", "misses"),
            ("ganglion_cache_hit_bytes", "Bytes served from the cache.", "hit_bytes"),
            ("ganglion_cache_miss_bytes", "Bytes written to the cache after misses.", "miss_bytes"),
        )
        for name, doc, attr in tenant_counters:
            c = CounterMetricFamily(name, doc, labels=["host", "tenant"])
            for t in snap.tenants:
                c.add_metric([host, t.tenant], getattr(t, attr))
            yield c
        budget = GaugeMetricFamily(
            "ganglion_cache_budget_bytes", "Budget per partition.", labels=["host", "partition"]
        )
        used = GaugeMetricFamily(
            "ganglion_cache_partition_used_bytes",
            "Bytes per partition.",
            labels=["host", "partition"],
        )
        evicted = CounterMetricFamily(
            "ganglion_cache_evictions", "Entries evicted.", labels=["host", "partition"]
        )
        for p in snap.partitions:
            budget.add_metric([host, p.name], p.capacity)
            used.add_metric([host, p.name], p.used)
            evicted.add_metric([host, p.name], p.counters.evictions)
        yield from (budget, used, evicted)
        up = CounterMetricFamily(
            "ganglion_transfer_upstream_bytes",
            "Payload bytes fetched from peers/origin.",
            labels=["host"],
        )
        up.add_metric([host], dp.backend.upstream_bytes)
        yield up


class MetricsServer:
    """``/metrics`` in a daemon thread from its own registry (port 0: a free one)."""

    def __init__(self, dataplane: DataPlane, port: int, addr: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CacheCollector(dataplane))
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._server.server_address[1])
        self.url = f"http://{addr}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
