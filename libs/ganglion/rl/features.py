"""The observation schema of the learned scheduling policies (version :data:`SCHEMA_VERSION`).

One row per candidate job (running and pending together), each row the job's own features
followed by a summary of the cluster, so a per-row network scores every job with the same
weights whatever the queue length. Everything here is **non-clairvoyant**: it reads what the
live controller knows (GPUs asked, submit time, attained service, tenant, what runs where)
and never ``Job.duration_hint_s``.

The raw features are log-scaled so they are O(1); the network normalises them further with
the mean and standard deviation recorded at training time (stored in the model's weights
and manifest). Any change to the columns, their order or their meaning must bump
:data:`SCHEMA_VERSION`: a model trained on another schema is refused at load time.

Candidates: at most ``k`` jobs, taken in a base order (:func:`base_key`, Tiresias' two
queues). Jobs beyond ``k`` are not scored; they rank after every scored job, in that same
base order.
"""

from __future__ import annotations

import enum
import heapq
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Job

SCHEMA_VERSION = 1
"""Bumped on any change to the columns below."""

TENANT_BUCKETS = 16
"""Tenants are hashed (crc32, stable across processes) into this many one-hot buckets."""

JOB_FEATURES: tuple[str, ...] = (
    "log_gpus",
    "log_attained_gpu_h",
    "log_ran_h",
    "log_age_h",
    "log_waited_h",
    "attained_below_1_gpu_h",
    "running",
    "fits_free",
    "tenant_gpu_share",
    "tenant_job_share",
    "priority",
    *(f"tenant_bucket_{i}" for i in range(TENANT_BUCKETS)),
)
"""Per-job columns, in order."""

CLUSTER_FEATURES: tuple[str, ...] = (
    "free_fraction",
    "log_pending",
    "log_running",
    "log_pending_demand",
    "log_capacity",
    "log_tenants",
    "largest_free_block",
)
"""Cluster-summary columns (repeated on every row), in order."""

FEATURES: tuple[str, ...] = (*JOB_FEATURES, *CLUSTER_FEATURES)
NUM_FEATURES = len(FEATURES)
DEFAULT_K = 192
"""Candidates scored per decision (training pads to this many rows). At least the GPUs of
the cluster trained on (128) in 1-GPU jobs: with fewer, the candidates all fit and their
order decides nothing, while the jobs beyond K (in base order) decide everything."""

_HOUR = 3600.0


class ActionForm(enum.Enum):
    """How a model's scores become a decision (:mod:`ganglion.rl.decide`)."""

    RANK = "rank"
    """Rank running and pending jobs; preemptive."""
    PICK = "pick"
    """Pick pending jobs one at a time, or wait; never preempts."""


_TENANT_CACHE: dict[str, int] = {}


def tenant_bucket(tenant: str) -> int:
    """Stable bucket of a tenant name (Python's ``hash`` is salted per process)."""
    b = _TENANT_CACHE.get(tenant)
    if b is None:
        if len(_TENANT_CACHE) > 100_000:  # bounded: names come from requests
            _TENANT_CACHE.clear()
        b = _TENANT_CACHE[tenant] = zlib.crc32(tenant.encode()) % TENANT_BUCKETS
    return b


@dataclass(frozen=True, eq=False)
class Observation:
    """Features of one decision's candidates."""

    features: npt.NDArray[np.float32]
    """(n, NUM_FEATURES) raw features, one row per candidate, n <= k."""
    jobs: tuple[Job, ...]
    """The candidates, in base order (rows of ``features``)."""
    running: npt.NDArray[np.bool_]
    """Whether each candidate is running."""
    scored: frozenset[str]
    """Ids of the candidates (the other jobs are never scored; they rank last, in base
    order)."""
    capacity: int
    """GPUs in the cluster."""


def base_key(job: Job, running: bool) -> tuple[int, int, float, str]:
    """Tiresias' order (two queues split at 1 GPU-hour of attained service; running jobs
    first inside a queue, then submit order): it picks the candidates, and ranks the jobs
    beyond ``k``, so that a long queue degrades to a good heuristic, not to an arbitrary one."""
    return (int(job.attained_service_s >= _HOUR), 0 if running else 1, job.submit_time_s, job.id)


def observe(state: ClusterState, pending: Sequence[Job], k: int = DEFAULT_K) -> Observation:
    """The candidates of one decision and their features (vectorised over jobs)."""
    jobs_all: list[Job] = [*state.running, *pending]
    flags = [True] * len(state.running) + [False] * len(pending)
    # The k first in base order; the rest need no order here (rank_decision ranks them).
    chosen = heapq.nsmallest(k, range(len(jobs_all)), key=lambda i: base_key(jobs_all[i], flags[i]))
    jobs = tuple(jobs_all[i] for i in chosen)
    running = np.array([flags[i] for i in chosen], dtype=bool)
    capacity = state.num_gpus
    free_gpus = int((state.gpu_job < 0).sum())
    n = len(jobs)
    x = np.zeros((n, NUM_FEATURES), dtype=np.float32)
    if n:
        now = state.now_s
        gpus = np.array([j.gpus for j in jobs], dtype=np.float64)
        attained = np.array([j.attained_service_s for j in jobs], dtype=np.float64)
        submit = np.array([j.submit_time_s for j in jobs], dtype=np.float64)
        ran = attained / gpus
        age = np.maximum(now - submit, 0.0)
        waited = np.maximum(age - ran, 0.0)
        held: dict[str, int] = {}
        for j in state.running:
            held[j.tenant] = held.get(j.tenant, 0) + j.gpus
        in_system: dict[str, int] = {}
        for j in jobs_all:
            in_system[j.tenant] = in_system.get(j.tenant, 0) + 1
        tenants = [j.tenant for j in jobs]
        x[:, 0] = np.log1p(gpus)
        x[:, 1] = np.log1p(attained / _HOUR)
        x[:, 2] = np.log1p(ran / _HOUR)
        x[:, 3] = np.log1p(age / _HOUR)
        x[:, 4] = np.log1p(waited / _HOUR)
        x[:, 5] = attained < _HOUR  # Tiresias' first queue: the prior starts from it
        x[:, 6] = running
        x[:, 7] = gpus <= free_gpus
        x[:, 8] = [held.get(t, 0) / max(capacity, 1) for t in tenants]
        x[:, 9] = [in_system[t] / len(jobs_all) for t in tenants]
        x[:, 10] = np.clip([j.priority for j in jobs], -10, 10)
        buckets = np.array([tenant_bucket(t) for t in tenants], dtype=np.int64)
        x[np.arange(n), 11 + buckets] = 1.0
        x[:, len(JOB_FEATURES) :] = cluster_summary(state, pending, free_gpus, len(in_system))
    return Observation(x, jobs, running, frozenset(j.id for j in jobs), capacity)


def cluster_summary(
    state: ClusterState, pending: Sequence[Job], free_gpus: int, tenants: int
) -> npt.NDArray[np.float32]:
    capacity = max(state.num_gpus, 1)
    free_per_host = np.bincount(state.gpu_host[state.gpu_job < 0], minlength=len(state.hosts))
    per_host = np.bincount(state.gpu_host, minlength=len(state.hosts))
    largest = float(free_per_host.max()) / max(float(per_host.max()), 1.0) if len(per_host) else 0
    demand = sum(j.gpus for j in pending)
    return np.array(
        [
            free_gpus / capacity,
            math.log1p(len(pending)),
            math.log1p(len(state.running)),
            math.log1p(demand / capacity),
            math.log1p(capacity / 8.0),
            math.log1p(tenants),
            largest,
        ],
        dtype=np.float32,
    )


def pad(obs: Observation, k: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """(k, NUM_FEATURES) features and a (k,) validity mask, zero-padded."""
    x = np.zeros((k, NUM_FEATURES), dtype=np.float32)
    mask = np.zeros(k, dtype=bool)
    n = min(len(obs.jobs), k)
    x[:n] = obs.features[:n]
    mask[:n] = True
    return x, mask


def contested_prefix(gpus: Sequence[int], order: Sequence[int], capacity: int) -> int:
    """How many leading positions of ``order`` decide the outcome of the select step
    (``ganglion.policies.priority``): up to where the GPU budget runs out; 0 when every job
    fits anyway (then the order changes nothing and carries no learning signal)."""
    if sum(gpus[i] for i in order) <= capacity:
        return 0
    budget = capacity
    for pos, i in enumerate(order):
        if gpus[i] <= budget:
            budget -= gpus[i]
            if budget == 0:
                return pos + 1
    return len(order)
