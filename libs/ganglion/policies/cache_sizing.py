"""Cache sizing: per-tenant byte budgets on one host from the tenants' miss-ratio curves.

A tenant with ``r`` requests and miss-ratio curve ``m(c)`` expects ``r * (1 - m(c))`` hits
with a budget of ``c`` bytes. :class:`GreedyMarginalSizer` hands out the capacity in quanta,
each time to the tenant whose next quanta buy the most hits per quantum, looking ahead over
every run of quanta (UCP's lookahead, Qureshi & Patt, MICRO'06): plain one-quantum greed stalls
in front of a cliff, such as a scan that only starts hitting once its whole loop fits.
A small reserve stays with the shared pool, for tenants that arrive between two sizings.

Pure functions of typed values, registered by name; a learned sizer registers beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ganglion.cache.shards import MissRatioCurve
from ganglion.policies.registry import Registry


@dataclass(frozen=True)
class TenantDemand:
    """What one tenant asked of a host's cache."""

    tenant: str
    """Tenant name."""
    requests: int
    """Requests in the window the curve covers (the tenant's weight)."""
    curve: MissRatioCurve
    """Miss ratio against cache bytes."""


@dataclass(frozen=True)
class HostDemand:
    """One host's cache and its tenants."""

    host: str
    """Host name."""
    capacity: int
    """Bytes to divide."""
    tenants: tuple[TenantDemand, ...]
    """Tenants seen on the host."""


@dataclass(frozen=True)
class HostSizing:
    """Budgets for one host, with the model's expectation and the equal-split baseline."""

    host: str
    """Host name."""
    budgets: Mapping[str, int]
    """Bytes per tenant; they add up to at most the capacity (the rest is the shared pool)."""
    expected_miss_ratios: Mapping[str, float]
    """Each tenant's modelled miss ratio at its budget."""
    expected_hit_ratio: float
    """Modelled hits / requests over all tenants."""
    equal_split_hit_ratio: float
    """The same with the capacity split equally (the baseline to beat)."""
    reason: str
    """One line on why."""


class CacheSizer(Protocol):
    """``size(host) -> budgets``; pure."""

    name: str
    version: str

    def size(self, host: HostDemand, quantum: int = 0) -> HostSizing: ...


SIZERS: Registry[CacheSizer] = Registry("cache sizing", "greedy-mrc")
"""Sizing policies by name (``greedy-mrc`` default, ``equal-split``)."""


def _hits_table(t: TenantDemand, grid: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Expected hits of ``t`` at each budget of ``grid``."""
    sizes = np.asarray(t.curve.sizes, dtype=np.float64)
    ratios = np.asarray(t.curve.miss_ratios, dtype=np.float64)
    miss = np.interp(grid, sizes, ratios, right=ratios[-1])
    return np.asarray(t.requests * (1.0 - miss), dtype=np.float64)


def _hit_ratio(host: HostDemand, budgets: Mapping[str, int]) -> tuple[float, dict[str, float]]:
    total = sum(t.requests for t in host.tenants)
    misses = {t.tenant: t.curve.miss_ratio_at(budgets.get(t.tenant, 0)) for t in host.tenants}
    hits = sum(t.requests * (1.0 - misses[t.tenant]) for t in host.tenants)
    return (hits / total if total else 0.0), misses


def equal_split(host: HostDemand, reserve: float) -> dict[str, int]:
    n = len(host.tenants)
    share = int(host.capacity * (1.0 - reserve)) // n if n else 0
    return {t.tenant: share for t in host.tenants}


def _default_quantum(capacity: int) -> int:
    return max(1, capacity // 256)


class GreedyMarginalSizer:
    """Lookahead greedy allocation maximising expected hits (see the module docstring)."""

    name = "greedy-mrc"
    version = "1"

    def __init__(self, reserve: float = 0.05) -> None:
        if not 0 <= reserve < 1:
            raise ValueError(f"reserve must be in [0, 1), got {reserve}")
        self.reserve = reserve

    def size(self, host: HostDemand, quantum: int = 0) -> HostSizing:
        q = quantum or _default_quantum(host.capacity)
        n_quanta = int(host.capacity * (1.0 - self.reserve)) // q
        grid = np.arange(n_quanta + 1, dtype=np.float64) * q
        tables = [_hits_table(t, grid) for t in host.tenants]
        given = [0] * len(tables)
        left = n_quanta
        while left > 0 and tables:
            best_gain, best_t, best_k = 0.0, -1, 0
            for i, h in enumerate(tables):
                a = given[i]
                ahead = h[a + 1 : a + left + 1] - h[a]
                if ahead.size == 0:
                    continue
                per = ahead / np.arange(1, ahead.size + 1)
                k = int(np.argmax(per))
                if per[k] > best_gain:
                    best_gain, best_t, best_k = float(per[k]), i, k + 1
            if best_t < 0:
                break  # no tenant gains from more bytes
            given[best_t] += best_k
            left -= best_k
        if left > 0 and tables:
            # Nobody gains by the model: share the rest by request count, which hedges the
            # curves' estimation error at no modelled cost.
            weights = np.array([max(t.requests, 1) for t in host.tenants], dtype=np.float64)
            extra = np.floor(left * weights / weights.sum()).astype(int)
            given = [g + int(e) for g, e in zip(given, extra, strict=True)]
        budgets = {t.tenant: g * q for t, g in zip(host.tenants, given, strict=True)}
        ratio, misses = _hit_ratio(host, budgets)
        equal, _ = _hit_ratio(host, equal_split(host, self.reserve))
        top = sorted(budgets.items(), key=lambda kv: -kv[1])[:3]
        reason = (
            f"lookahead greedy over {n_quanta} quanta of {q} B: expected hit ratio "
            f"{ratio:.3f} vs {equal:.3f} equal split; largest: "
            + ", ".join(f"{name or '(default)'}={b}" for name, b in top)
        )
        return HostSizing(host.host, budgets, misses, ratio, equal, reason)


class EqualSplitSizer:
    """Every tenant the same share: the baseline."""

    name = "equal-split"
    version = "1"

    def __init__(self, reserve: float = 0.05) -> None:
        self.reserve = reserve

    def size(self, host: HostDemand, quantum: int = 0) -> HostSizing:
        budgets = equal_split(host, self.reserve)
        ratio, misses = _hit_ratio(host, budgets)
        return HostSizing(
            host.host, budgets, misses, ratio, ratio, f"equal split of {host.capacity} B"
        )


SIZERS.register(GreedyMarginalSizer.name)(GreedyMarginalSizer)
SIZERS.register(EqualSplitSizer.name)(EqualSplitSizer)
