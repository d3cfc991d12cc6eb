"""Cache values <-> ``ganglion.v1`` messages (CacheStats, MissRatioCurve, CacheBudget)."""

from __future__ import annotations

import itertools

from ganglion.cache.shards import MissRatioCurve
from ganglion.cache.store import CacheSnapshot
from ganglion.v1 import data_pb2


def curve_to_proto(curve: MissRatioCurve) -> data_pb2.MissRatioCurve:
    return data_pb2.MissRatioCurve(
        cache_bytes=list(curve.sizes),
        miss_ratio=list(curve.miss_ratios),
        requests=curve.requests,
        sample_rate=curve.sample_rate,
    )


def curve_from_proto(msg: data_pb2.MissRatioCurve) -> MissRatioCurve:
    """Raises ValueError for a curve whose columns differ in length or are not ascending."""
    sizes = tuple(int(s) for s in msg.cache_bytes)
    ratios = tuple(float(r) for r in msg.miss_ratio)
    if len(sizes) != len(ratios):
        raise ValueError(f"{len(sizes)} cache_bytes but {len(ratios)} miss_ratio values")
    if any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ValueError("cache_bytes must be strictly ascending")
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError("miss_ratio values must be in [0, 1]")
    if not sizes:
        sizes, ratios = (0,), (1.0,)
    return MissRatioCurve(sizes, ratios, int(msg.requests), float(msg.sample_rate) or 1.0)


def snapshot_to_proto(host: str, snap: CacheSnapshot, sequence: int = 0) -> data_pb2.CacheStats:
    return data_pb2.CacheStats(
        host=host,
        time_s=snap.time_s,
        sequence=sequence,
        capacity_bytes=snap.capacity,
        used_bytes=snap.used,
        blobs=snap.blobs,
        policy=snap.policy,
        partitions=[
            data_pb2.PartitionStats(
                name=p.name,
                budget_bytes=p.capacity,
                used_bytes=p.used,
                entries=p.entries,
                evictions=p.counters.evictions,
                evicted_bytes=p.counters.evicted_bytes,
                rejected=p.counters.rejected,
            )
            for p in snap.partitions
        ],
        tenants=[
            data_pb2.TenantCacheStats(
                tenant=t.tenant,
                partition=t.partition,
                hits=t.hits,
                misses=t.misses,
                hit_bytes=t.hit_bytes,
                miss_bytes=t.miss_bytes,
                mrc=curve_to_proto(t.curve),
            )
            for t in snap.tenants
        ],
    )
