"""What a simulation produced: per-job outcomes, a timeline, and the metrics derived from them.

Metrics follow the usual definitions: JCT = finish - submit; queueing delay = first start -
submit; makespan = last finish - first submit; GPU utilisation = GPU-seconds held (restart
penalties included) / (GPUs x makespan). Finish-time fairness is Themis' (NSDI'20)
rho = JCT / T_independent, where T_independent is the job's run time on a dedicated 1/n share
of the cluster, n = the mean number of tenants with jobs in the system over the job's life
(rho <= 1: the tenant lost nothing by sharing).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ganglion.sim.cluster import ClusterSpec
from ganglion.traces import Trace

if TYPE_CHECKING:
    from ganglion.sim.engine import SimConfig

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int32]
PlacementRecord = tuple[float, str, tuple[tuple[str, tuple[int, ...]], ...]]
"""(time, job id, ((host, GPU indices), ...))."""


@dataclass(frozen=True)
class TenantMetrics:
    """One tenant's outcome."""

    jobs: int
    """Jobs of the tenant that finished."""
    gpu_s: float
    """GPU-seconds of useful work of those jobs."""
    share: float
    """Its fraction of all useful GPU-seconds."""
    avg_jct_s: float
    """Mean JCT of its jobs."""
    ftf_avg: float
    """Mean Themis finish-time fairness rho of its jobs."""
    ftf_max: float
    """Worst rho of its jobs."""


@dataclass(frozen=True)
class Metrics:
    """The summary a run is judged by (``ganglion sim --json`` writes these fields)."""

    policy: str
    """Policy that decided."""
    trace: str
    """Trace and transformations (window, load scale)."""
    cluster: str
    """Cluster name."""
    gpus: int
    """GPUs in the cluster."""
    jobs: int
    """Jobs that finished."""
    jobs_total: int
    """Jobs in the trace."""
    unfinished: int
    """Jobs that never finished (the policy left them waiting with nothing left to happen)."""
    dropped: int
    """Jobs asking for more GPUs than the cluster has (never queued)."""
    avg_jct_s: float
    p50_jct_s: float
    p95_jct_s: float
    p99_jct_s: float
    avg_queue_s: float
    """Mean delay from submit to first start."""
    max_wait_s: float
    """Longest delay from submit to first start."""
    makespan_s: float
    gpu_utilization: float
    """GPU-seconds held / (GPUs x makespan), 0..1."""
    preemptions: int
    """Jobs stopped by the policy (each restart pays the restart penalty)."""
    ftf_avg: float
    """Mean finish-time fairness rho over jobs."""
    ftf_max_tenant: float
    """The worst tenant's mean rho."""
    restart_penalty_s: float
    quantum_s: float | None
    seed: int
    events: int
    """Arrivals, completions and quantum ticks handled."""
    calls: int
    """Times the policy was asked."""
    wall_s: float
    """Wall-clock seconds the run took."""
    events_per_s: float
    per_tenant: dict[str, TenantMetrics]

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: NaN and infinities become null."""
        clean = _finite(asdict(self))
        assert isinstance(clean, dict)
        return clean

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


@dataclass(frozen=True, eq=False)
class SimResult:
    """Everything a run produced. Per-job arrays follow the trace's order."""

    trace: Trace
    cluster: ClusterSpec
    policy: str
    config: SimConfig
    first_start: FloatArray
    """Time of each job's first start; inf if it never started."""
    finish: FloatArray
    """Completion time; inf if unfinished."""
    preemptions: IntArray
    """Times each job was preempted."""
    tenants_sharing: FloatArray
    """Mean number of tenants with jobs in the system over each job's life (Themis' n)."""
    fits: npt.NDArray[np.bool_]
    """False for jobs larger than the cluster."""
    busy_gpu_s: float
    """GPU-seconds held over the run."""
    timeline: tuple[FloatArray, IntArray, IntArray]
    """(time, busy GPUs, pending jobs), sampled at every event and decision."""
    events: int
    calls: int
    wall_s: float
    placements: tuple[PlacementRecord, ...] = ()
    """Every placement, when ``SimConfig.record_placements`` is set."""
    preempted: tuple[tuple[float, str], ...] = ()
    """Every preemption (time, job id), when ``SimConfig.record_placements`` is set."""

    @property
    def done(self) -> npt.NDArray[np.bool_]:
        return np.isfinite(self.finish)

    @property
    def jct_s(self) -> FloatArray:
        """JCT of finished jobs, in trace order."""
        d = self.done
        return self.finish[d] - self.trace.submit_s[d]

    @functools.cached_property
    def _metrics(self) -> Metrics:
        return self._compute_metrics()

    def metrics(self) -> Metrics:
        """The summary (computed once)."""
        return self._metrics

    def _compute_metrics(self) -> Metrics:
        t = self.trace
        d = self.done
        jct = self.jct_s
        queue = self.first_start[d] - t.submit_s[d]
        dur = t.duration_s[d]
        gpus = t.num_gpus[d].astype(np.float64)
        start = float(t.submit_s[0]) if len(t) else 0.0
        makespan = float(self.finish[d].max() - start) if d.any() else 0.0
        capacity = self.cluster.num_gpus
        share = capacity / np.maximum(self.tenants_sharing[d], 1.0)
        t_ind = dur * np.maximum(1.0, gpus / share)
        rho = np.divide(jct, t_ind, out=np.full_like(jct, np.nan), where=t_ind > 0)
        tenants = np.array(t.tenant, dtype=object)[d]
        work = dur * gpus
        total_work = float(work.sum()) or 1.0
        per_tenant: dict[str, TenantMetrics] = {}
        for name in sorted(set(tenants.tolist())):
            m = tenants == name
            r = rho[m][np.isfinite(rho[m])]
            per_tenant[name] = TenantMetrics(
                jobs=int(m.sum()),
                gpu_s=float(work[m].sum()),
                share=float(work[m].sum()) / total_work,
                avg_jct_s=float(jct[m].mean()),
                ftf_avg=float(r.mean()) if len(r) else math.nan,
                ftf_max=float(r.max()) if len(r) else math.nan,
            )
        finite_rho = rho[np.isfinite(rho)]
        tenant_rho = [v.ftf_avg for v in per_tenant.values() if math.isfinite(v.ftf_avg)]

        def pct(q: float) -> float:
            return float(np.percentile(jct, q)) if len(jct) else math.nan

        return Metrics(
            policy=self.policy,
            trace=t.source,
            cluster=self.cluster.name,
            gpus=capacity,
            jobs=int(d.sum()),
            jobs_total=len(t),
            unfinished=int((~d & self.fits).sum()),
            dropped=int((~self.fits).sum()),
            avg_jct_s=float(jct.mean()) if len(jct) else math.nan,
            p50_jct_s=pct(50),
            p95_jct_s=pct(95),
            p99_jct_s=pct(99),
            avg_queue_s=float(queue.mean()) if len(queue) else math.nan,
            max_wait_s=float(queue.max()) if len(queue) else math.nan,
            makespan_s=makespan,
            gpu_utilization=self.busy_gpu_s / (capacity * makespan) if makespan > 0 else 0.0,
            preemptions=int(self.preemptions.sum()),
            ftf_avg=float(finite_rho.mean()) if len(finite_rho) else math.nan,
            ftf_max_tenant=max(tenant_rho) if tenant_rho else math.nan,
            restart_penalty_s=self.config.restart_penalty_s,
            quantum_s=self.config.quantum_s,
            seed=self.config.seed,
            events=self.events,
            calls=self.calls,
            wall_s=self.wall_s,
            events_per_s=self.events / self.wall_s if self.wall_s > 0 else math.nan,
            per_tenant=per_tenant,
        )


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
