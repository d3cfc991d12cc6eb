"""``SizeCaches`` and ``TuneTransport``: proto -> typed values, the registered data-plane
policy, typed values -> proto. A mixin of :class:`ganglion_decision.servicer.DecisionServicer`.

Bad values are ``INVALID_ARGUMENT`` naming the field; too many hosts or tenants is
``RESOURCE_EXHAUSTED``; an unknown policy is ``INVALID_ARGUMENT`` on ``policy``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, NoReturn

import grpc

from ganglion.cache.proto import curve_from_proto
from ganglion.policies import UnknownPolicyError
from ganglion.policies.cache_sizing import SIZERS, CacheSizer, HostDemand, TenantDemand
from ganglion.policies.transport_tuning import TUNERS, LinkObservation, TransportTuner
from ganglion.v1 import data_pb2, decision_pb2
from ganglion_decision.validation import InvalidRequestError, RequestTooLargeError

log = logging.getLogger(__name__)

MAX_HOSTS = 100_000
MAX_QUANTA = 4096
"""Most budget steps (capacity / quantum_bytes) SizeCaches walks per host; the default
quantum gives 256."""
MAX_TENANTS_PER_HOST = 10_000
MAX_CURVE_POINTS = 4_096


def host_demand(i: int, msg: data_pb2.CacheStats) -> HostDemand:
    """Validate and convert one host's stats; raises InvalidRequestError naming the field."""
    field = f"hosts[{i}]"
    if not msg.host:
        raise InvalidRequestError(f"{field}.host", "must not be empty")
    if len(msg.tenants) > MAX_TENANTS_PER_HOST:
        raise RequestTooLargeError(
            f"{field}.tenants", f"{len(msg.tenants)} > {MAX_TENANTS_PER_HOST}"
        )
    tenants: list[TenantDemand] = []
    seen: set[str] = set()
    for j, t in enumerate(msg.tenants):
        tf = f"{field}.tenants[{j}]"
        if t.tenant in seen:
            raise InvalidRequestError(f"{tf}.tenant", f"duplicate tenant {t.tenant!r}")
        seen.add(t.tenant)
        if len(t.mrc.cache_bytes) > MAX_CURVE_POINTS:
            raise RequestTooLargeError(f"{tf}.mrc", f"more than {MAX_CURVE_POINTS} points")
        try:
            curve = curve_from_proto(t.mrc)
        except ValueError as exc:
            raise InvalidRequestError(f"{tf}.mrc", str(exc)) from exc
        requests = t.mrc.requests or (t.hits + t.misses)
        tenants.append(TenantDemand(t.tenant, int(requests), curve))
    return HostDemand(msg.host, int(msg.capacity_bytes), tuple(tenants))


def link_observation(msg: decision_pb2.TuneTransportRequest) -> LinkObservation:
    def finite(name: str, value: float, low: float, high: float = math.inf) -> float:
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidRequestError(name, f"must be in [{low}, {high}], got {value}")
        return value

    bandwidth = finite("link_bandwidth_bytes_per_s", msg.link_bandwidth_bytes_per_s, 0.0)
    if bandwidth == 0:
        raise InvalidRequestError("link_bandwidth_bytes_per_s", "must be > 0")
    ratio = finite("compressibility", msg.compressibility, 0.0, 1.0)
    if ratio == 0:
        raise InvalidRequestError("compressibility", "must be > 0 (compressed/raw size)")

    def speed(name: str, value: float) -> float:
        # 0 (unknown: the policy's default) or at least 1 B/s: 5e-324 underflowed to 0 inside
        # the goodput model and divided by it.
        value = finite(name, value, 0.0)
        if 0 < value < 1:
            raise InvalidRequestError(name, f"must be 0 (unknown) or >= 1, got {value}")
        return value

    return LinkObservation(
        bandwidth_bytes_per_s=bandwidth,
        compressibility=ratio,
        compress_bytes_per_s=speed("lz4_compress_bytes_per_s", msg.lz4_compress_bytes_per_s),
        decompress_bytes_per_s=speed("lz4_decompress_bytes_per_s", msg.lz4_decompress_bytes_per_s),
        rtt_s=finite("rtt_s", msg.rtt_s, 0.0),
        blob_bytes=int(msg.blob_bytes),
    )


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RequestTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, UnknownPolicyError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"policy: {exc}"
    return grpc.StatusCode.INTERNAL, f"decision failed: {type(exc).__name__}"


async def _fail(context: grpc.aio.ServicerContext[Any, Any], rpc: str, exc: Exception) -> NoReturn:
    code, details = _status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", rpc, exc_info=exc)
    await context.abort(code, details)
    raise AssertionError("unreachable: abort raises")


class DataplaneServicer:
    """SizeCaches and TuneTransport; policies are created once per name and reused."""

    _sizers: dict[str, CacheSizer]
    _tuners: dict[str, TransportTuner]

    def _sizer(self, name: str) -> CacheSizer:
        cache = self.__dict__.setdefault("_sizers", {})
        key = name or SIZERS.default
        if key not in cache:
            cache[key] = SIZERS.create(key)
        sizer: CacheSizer = cache[key]
        return sizer

    def _tuner(self, name: str) -> TransportTuner:
        cache = self.__dict__.setdefault("_tuners", {})
        key = name or TUNERS.default
        if key not in cache:
            cache[key] = TUNERS.create(key)
        tuner: TransportTuner = cache[key]
        return tuner

    def size_caches(
        self, request: decision_pb2.SizeCachesRequest
    ) -> decision_pb2.SizeCachesResponse:
        """Raises InvalidRequestError, RequestTooLargeError, UnknownPolicyError."""
        if len(request.hosts) > MAX_HOSTS:
            raise RequestTooLargeError("hosts", f"{len(request.hosts)} > {MAX_HOSTS}")
        sizer = self._sizer(request.policy)
        demands = [host_demand(i, h) for i, h in enumerate(request.hosts)]
        quantum = int(request.quantum_bytes)
        for i, d in enumerate(demands):
            # The sizers walk a grid of capacity / quantum steps (quadratic for greedy-mrc):
            # a 1-byte quantum over a few MiB held the service for seconds, over 1 TiB it
            # asked for terabytes.
            if quantum and d.capacity // quantum > MAX_QUANTA:
                raise InvalidRequestError(
                    "quantum_bytes",
                    f"{quantum} B makes {d.capacity // quantum} steps of hosts[{i}]'s "
                    f"{d.capacity} B, more than {MAX_QUANTA}; use at least "
                    f"{-(-d.capacity // MAX_QUANTA)} B, or 0 for the sizer's own",
                )
        out = decision_pb2.SizeCachesResponse(policy=sizer.name, version=sizer.version)
        for d in demands:
            s = sizer.size(d, quantum)
            out.hosts.append(
                decision_pb2.HostCacheBudgets(
                    host=s.host,
                    budgets=[
                        data_pb2.CacheBudget(
                            tenant=t,
                            budget_bytes=b,
                            expected_miss_ratio=s.expected_miss_ratios.get(t, 1.0),
                        )
                        for t, b in s.budgets.items()
                    ],
                    expected_hit_ratio=s.expected_hit_ratio,
                    equal_split_hit_ratio=s.equal_split_hit_ratio,
                    reason=s.reason,
                )
            )
        return out

    def tune_transport(
        self, request: decision_pb2.TuneTransportRequest
    ) -> decision_pb2.TuneTransportResponse:
        """Raises InvalidRequestError, UnknownPolicyError."""
        tuner = self._tuner(request.policy)
        plan = tuner.tune(link_observation(request))
        return decision_pb2.TuneTransportResponse(
            chunk_bytes=plan.chunk_bytes,
            compression=data_pb2.COMPRESSION_LZ4 if plan.compress else data_pb2.COMPRESSION_NONE,
            lz4_level=plan.lz4_level,
            expected_goodput_bytes_per_s=plan.expected_goodput,
            raw_goodput_bytes_per_s=plan.raw_goodput,
            reason=plan.reason,
            policy=tuner.name,
            version=tuner.version,
        )

    async def SizeCaches(
        self,
        request: decision_pb2.SizeCachesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> decision_pb2.SizeCachesResponse:
        try:
            # Up to MAX_QUANTA steps per host, for every tenant of every host: from
            # milliseconds to, for the largest requests, minutes, so not on the loop that
            # answers Schedule and health checks. (A bound on the whole request's work is
            # not set.)
            return await asyncio.to_thread(self.size_caches, request)
        except Exception as exc:
            await _fail(context, "SizeCaches", exc)

    async def TuneTransport(
        self,
        request: decision_pb2.TuneTransportRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> decision_pb2.TuneTransportResponse:
        try:
            return self.tune_transport(request)
        except Exception as exc:
            await _fail(context, "TuneTransport", exc)
