"""Typed domain values shared by services, policies and the simulator.

Services translate protobuf <-> these types at their edge (:mod:`ganglion.convert`); policies
only ever see these. Cluster state is columnar (numpy arrays, one entry per GPU).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class JobState(enum.IntEnum):
    """Mirrors ``ganglion.v1.JobState``."""

    QUEUED = 1
    SCHEDULED = 2
    RUNNING = 3
    SUCCEEDED = 4
    FAILED = 5
    CANCELLED = 6
    PREEMPTED = 7

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Job:
    """A job as policies see it. Non-clairvoyant: no true duration here."""

    id: str
    """Unique id."""
    tenant: str
    """Who pays for it; fairness is per tenant."""
    gpus: int
    """GPUs asked (gang: all or nothing)."""
    submit_time_s: float
    """Unix seconds (simulated seconds in the simulator)."""
    priority: int = 0
    """Higher runs first where a policy honours priority."""
    command: tuple[str, ...] = ()
    """argv of the process the executor starts."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the process."""
    attained_service_s: float = 0.0
    """GPU-seconds received so far (LAS-family policies)."""


@dataclass(frozen=True)
class Segment:
    """The GPUs of one job on one host."""

    host: str
    gpu_indices: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """Where one job goes, and why."""

    job_id: str
    segments: tuple[Segment, ...]
    score: float
    """The chosen placement's score under the policy (higher is better)."""
    runner_up_host: str = ""
    """The best rejected alternative, empty when there was none."""
    runner_up_score: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    placements: tuple[Placement, ...]
    policy: str
    version: str


@dataclass(frozen=True, eq=False)
class ClusterState:
    """The cluster at one instant, one column entry per GPU."""

    now_s: float
    hosts: tuple[str, ...]
    gpu_host: npt.NDArray[np.int32]
    """Index into ``hosts`` of each GPU."""
    gpu_index: npt.NDArray[np.int32]
    """Device index of each GPU on its host."""
    gpu_job: npt.NDArray[np.int32]
    """Index into ``running`` of the job holding each GPU; -1 when free."""
    gpu_utilization: npt.NDArray[np.float32]
    """Last sampled utilisation in percent; negative when unknown."""
    running: tuple[Job, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.gpu_host)
        for name in ("gpu_index", "gpu_job", "gpu_utilization"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, gpu_host has {n}")
        if n and (int(self.gpu_host.min()) < 0 or int(self.gpu_host.max()) >= len(self.hosts)):
            raise ValueError("gpu_host refers to a host that is not in hosts")
        if n and int(self.gpu_job.max()) >= len(self.running):
            raise ValueError("gpu_job refers to a job that is not in running")
        if n and int(self.gpu_job.min()) < -1:
            raise ValueError("gpu_job must be -1 (free) or an index into running")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError("hosts has duplicate names")
        if n and len(np.unique(np.stack([self.gpu_host, self.gpu_index]), axis=1).T) != n:
            raise ValueError("the same (host, gpu_index) appears twice")

    @property
    def num_gpus(self) -> int:
        return len(self.gpu_host)

    def capacity_by_host(self) -> dict[str, int]:
        counts = np.bincount(self.gpu_host, minlength=len(self.hosts))
        return {h: int(c) for h, c in zip(self.hosts, counts, strict=True)}

    def free_by_host(self) -> dict[str, list[int]]:
        """Free device indices per host (sorted), every host present, in ``hosts`` order."""
        out: dict[str, list[int]] = {h: [] for h in self.hosts}
        free = np.flatnonzero(self.gpu_job < 0)
        order = np.lexsort((self.gpu_index[free], self.gpu_host[free]))
        for i in free[order]:
            out[self.hosts[int(self.gpu_host[i])]].append(int(self.gpu_index[i]))
        return out

    @classmethod
    def build(
        cls,
        now_s: float,
        host_gpus: Mapping[str, int],
        allocations: Mapping[str, Sequence[Segment]] | None = None,
        running: Sequence[Job] = (),
        utilization: Mapping[tuple[str, int], float] | None = None,
    ) -> ClusterState:
        """Columns from row-wise facts: GPU counts per host and the running jobs' segments."""
        hosts = tuple(host_gpus)
        host_pos = {h: i for i, h in enumerate(hosts)}
        gpu_host = np.repeat(np.arange(len(hosts), dtype=np.int32), [host_gpus[h] for h in hosts])
        gpu_index = np.concatenate(
            [np.arange(host_gpus[h], dtype=np.int32) for h in hosts] or [np.zeros(0, np.int32)]
        )
        offsets = np.concatenate([[0], np.cumsum([host_gpus[h] for h in hosts])]).astype(np.int64)
        gpu_job = np.full(len(gpu_host), -1, dtype=np.int32)
        job_pos = {j.id: i for i, j in enumerate(running)}
        for job_id, segments in (allocations or {}).items():
            if job_id not in job_pos:
                raise ValueError(f"allocation for job {job_id!r} which is not running")
            for seg in segments:
                if seg.host not in host_pos:
                    continue  # host gone (TTL expired); its GPUs are not offered
                base = offsets[host_pos[seg.host]]
                for idx in seg.gpu_indices:
                    if 0 <= idx < host_gpus[seg.host]:
                        gpu_job[base + idx] = job_pos[job_id]
        util = np.full(len(gpu_host), -1.0, dtype=np.float32)
        for (host, idx), value in (utilization or {}).items():
            if host in host_pos and 0 <= idx < host_gpus[host]:
                util[offsets[host_pos[host]] + idx] = value
        return cls(now_s, hosts, gpu_host, gpu_index, gpu_job, util, tuple(running))
