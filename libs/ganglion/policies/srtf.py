"""``srtf``: shortest remaining time first, preemptive. An ORACLE: the reference, not a contender.

It reads ``Job.duration_hint_s`` (the true run time), which only the trace simulator sets;
remaining time = hint - attained service / GPUs. Jobs without a hint (as the live controller
sends them) rank after every job with one, in submit order. A new job preempts the running
job with the longest remaining time when it is shorter; running jobs keep their GPUs on ties.
Priorities only change on arrivals and completions, so it needs no quantum.

Registered as ``srtf`` (first-fit placement) and ``srtf-bestfit`` (best-fit/consolidated).
``srgt`` and ``srgt-bestfit`` are the same oracle ordering by remaining GPU-time (remaining
time x GPUs), which weighs what a gang job holds back from the queue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ganglion.domain import ClusterState, Decision, Job, JobColumns
from ganglion.policies.base import register
from ganglion.policies.placement import Fit
from ganglion.policies.priority import (
    PRIORITY_VERSION,
    Levels,
    Rank,
    level_ranks,
    schedule_by_levels,
)


def remaining_s(job: Job) -> float:
    """Oracle remaining run time; inf without a hint."""
    if job.duration_hint_s is None:
        return math.inf
    return max(0.0, job.duration_hint_s - job.attained_service_s / job.gpus)


class Srtf:
    """Preemptive SRTF with gang placement (see the module docstring)."""

    version = PRIORITY_VERSION
    quantum_s: float | None = None

    def __init__(self, name: str = "srtf", fit: Fit = Fit.FIRST) -> None:
        self.name = name
        self.fit = fit

    @staticmethod
    def levels(jobs: JobColumns, running: bool, now: float) -> Levels:
        """Jobs with a hint first, by ``remaining_s``; then the others, by submit time."""
        del running, now
        hint = jobs.duration_hint_s
        known = ~np.isnan(hint)
        remaining = np.maximum(0.0, hint - jobs.attained_service_s / jobs.gpus)
        return (
            np.where(known, 0, 1),
            np.where(known, remaining, jobs.submit_time_s),
        )

    @staticmethod
    def rank(jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        """The rank tuples (lower runs first), as ``schedule`` orders jobs."""
        return level_ranks(Srtf.levels, jobs, running, now)

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return schedule_by_levels(state, pending, self.levels, self.fit, self.name)


@register("srtf")
def _srtf() -> Srtf:
    return Srtf("srtf", Fit.FIRST)


@register("srtf-bestfit")
def _srtf_bestfit() -> Srtf:
    return Srtf("srtf-bestfit", Fit.BEST)


class Srgt(Srtf):
    """Shortest remaining GPU-time first: :class:`Srtf`'s ranking with each known remaining
    time multiplied by the job's GPUs. Also an ORACLE."""

    @staticmethod
    def levels(jobs: JobColumns, running: bool, now: float) -> Levels:
        tier, key = Srtf.levels(jobs, running, now)
        return tier, np.where(tier == 0, key * jobs.gpus, key)

    @staticmethod
    def rank(jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        return level_ranks(Srgt.levels, jobs, running, now)


@register("srgt")
def _srgt() -> Srgt:
    return Srgt("srgt", Fit.FIRST)


@register("srgt-bestfit")
def _srgt_bestfit() -> Srgt:
    return Srgt("srgt-bestfit", Fit.BEST)
