"""Least-attained-service policies: ``las`` and ``tiresias`` (2D-LAS, Gu et al., NSDI'19).

Both rank jobs by the service they have received so far, in GPU-seconds (``Job.
attained_service_s``: GPUs x time, the "2D" of Tiresias), so they need no job durations.

- ``las``: priority level = attained GPU-seconds // ``level_gpu_s`` (many narrow levels, i.e.
  LAS with a service quantum); inside a level running jobs keep their GPUs, then submit order.
  A job is preempted once it has attained a full level more than a waiting job.
- ``tiresias``: Tiresias-L, discretised 2D-LAS. Few queues split by GPU-second thresholds
  (default 3,600 and 36,000 GPU-s: three queues); inside a queue FIFO with running jobs
  first, so only a job from a higher queue preempts. Starvation promotion (the paper's
  PROMOTEKNOB): a waiting job that has run before moves to the top queue once the time it has
  waited since it was last queued (``Job.queued_since_s``: its last preemption) is at least
  ``promote_knob`` times the time it has run (attained / GPUs). The policy is stateless: a
  promoted job ranks by its attained service again once it runs (the paper's simulator
  instead resets its executed time), so it keeps its GPUs against jobs of its own queue.

Each comes with first-fit placement (``las``, ``tiresias``) and best-fit/consolidated
placement (``las-bestfit``, ``tiresias-bestfit``). Both report in ``Decision.next_decision_s``
when their answer next changes by itself (a running job crossing a level or threshold, a
waiting job due for promotion), so the simulator re-asks them exactly then, not on a fixed
quantum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Decision, Job, JobColumns
from ganglion.policies.base import register
from ganglion.policies.placement import Fit
from ganglion.policies.priority import (
    PRIORITY_VERSION,
    Levels,
    Mask,
    Rank,
    level_ranks,
    schedule_by_levels,
)


@dataclass(frozen=True)
class LasConfig:
    """Knobs of ``las``."""

    level_gpu_s: float = 600.0
    """Width of one priority level in attained GPU-seconds (the service quantum)."""

    def __post_init__(self) -> None:
        if not self.level_gpu_s > 0:
            raise ValueError("level_gpu_s must be positive")


@dataclass(frozen=True)
class TiresiasConfig:
    """Knobs of ``tiresias``."""

    thresholds_gpu_s: tuple[float, ...] = (3600.0, 36000.0)
    """Attained GPU-seconds at which a job drops to the next queue (K-1 values, increasing).
    Three queues: on a week of Philly (days 28-35, 64x8) the single 3,600 GPU-s threshold of
    the Tiresias simulator gave 3.07 h average JCT, p95 10.3 h and 3,686 preemptions; adding
    36,000 GPU-s gave 2.98 h, 6.9 h and 1,315 (a fourth queue at 360,000 changed little)."""
    promote_knob: float = 8.0
    """Promote a waiting job to the top queue once waited >= knob x ran; 0 disables."""

    def __post_init__(self) -> None:
        t = self.thresholds_gpu_s
        if any(v <= 0 for v in t) or list(t) != sorted(set(t)):
            raise ValueError("thresholds must be positive and strictly increasing")
        if self.promote_knob < 0:
            raise ValueError("promote_knob must be >= 0")


class Las:
    """LAS with a service quantum (see the module docstring)."""

    version = PRIORITY_VERSION

    def __init__(self, name: str = "las", fit: Fit = Fit.FIRST, config: LasConfig | None = None):
        self.name = name
        self.fit = fit
        self.config = config or LasConfig()
        self.quantum_s: float | None = None  # it reports Decision.next_decision_s itself

    def levels(self, jobs: JobColumns, running: bool, now: float) -> Levels:
        """The job's level: attained GPU-seconds // ``level_gpu_s``."""
        del running, now
        width = self.config.level_gpu_s
        return (np.floor_divide(jobs.attained_service_s, width).astype(np.int64),)

    def rank(self, jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        """The rank tuples (lower runs first), as ``schedule`` orders jobs."""
        return level_ranks(self.levels, jobs, running, now)

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return schedule_by_levels(
            state, pending, self.levels, self.fit, self.name, self.next_change
        )

    def next_change(self, now: float, jobs: JobColumns, running: Mask) -> float | None:
        """When a running job first climbs above the lowest waiting level (then a waiting
        job outranks it); priorities change only that way between events."""
        if running.all() or not running.any():
            return None
        width = self.config.level_gpu_s
        attained = jobs.attained_service_s
        lowest = float(np.floor(attained[~running] / width).min())
        goal = (lowest + 1) * width
        below = running & (attained < goal)
        if not below.any():
            return None
        return float((now + (goal - attained[below]) / jobs.gpus[below]).min())


class Tiresias:
    """Tiresias-L: discretised 2D-LAS with starvation promotion."""

    version = PRIORITY_VERSION

    def __init__(
        self, name: str = "tiresias", fit: Fit = Fit.FIRST, config: TiresiasConfig | None = None
    ):
        self.name = name
        self.fit = fit
        self.config = config or TiresiasConfig()
        self.quantum_s: float | None = None  # it reports Decision.next_decision_s itself
        self._thresholds = np.asarray(self.config.thresholds_gpu_s, dtype=np.float64)

    def levels(self, jobs: JobColumns, running: bool, now: float) -> Levels:
        """The job's queue (``queues``)."""
        return (self.queues(jobs, running, now),)

    def queues(self, jobs: JobColumns, running: bool, now: float) -> npt.NDArray[np.int64]:
        """The queue of each job (0 is the top): by attained service, 0 for a waiting job due
        for promotion (running jobs are never promoted) or that never ran (thresholds are
        positive). Promotion: a waiting job that has run before, once the time it waited since
        it was last queued is at least ``promote_knob`` x the time it has run."""
        attained = jobs.attained_service_s
        queues = np.searchsorted(self._thresholds, attained, side="right")
        if running:
            return queues
        knob = self.config.promote_knob
        top = attained <= 0
        if knob > 0:
            top |= now - jobs.queued_since_s >= knob * attained / jobs.gpus
        return np.where(top, 0, queues)

    def rank(self, jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        """The rank tuples (lower runs first), as ``schedule`` orders jobs."""
        return level_ranks(self.levels, jobs, running, now)

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return schedule_by_levels(
            state, pending, self.levels, self.fit, self.name, self.next_change
        )

    def next_change(self, now: float, jobs: JobColumns, running: Mask) -> float | None:
        """The next threshold crossing of a running job that drops it below a waiting job's
        queue, or the next promotion of a waiting job (the Tiresias simulator's "next job
        jump")."""
        if running.all() or not running.any():
            return None
        thresholds = self._thresholds
        knob = self.config.promote_knob
        due = math.inf
        # The waiting jobs: the best queue among them, and the next promotion. Only jobs
        # that ran before count: one that never ran is in the top queue and not promoted.
        # Even when every running job is in the top queue now, it may have dropped by the
        # time of a promotion; a promotion that changes nothing costs one call.
        attained = jobs.attained_service_s
        ran = attained > 0
        top_waiting = 0 if bool((~running & ~ran).any()) else len(thresholds)
        ran &= ~running
        if ran.any():
            served = attained[ran]
            if knob > 0:
                at = jobs.queued_since_s[ran] + knob * served / jobs.gpus[ran]
                if bool((now >= at).any()):
                    top_waiting = 0
                later = now < at
                served = served[later]
                if len(thresholds) and len(served):
                    due = float(at[later].min())
            if len(served):
                best = int(np.searchsorted(thresholds, served, side="right").min())
                top_waiting = min(top_waiting, best)
        if top_waiting < len(thresholds):
            # A running job crossing into a queue at or below the best waiting one.
            queues = np.searchsorted(thresholds, attained, side="right")
            crossing = running & (queues >= top_waiting) & (queues < len(thresholds))
            if crossing.any():
                bounds = thresholds[queues[crossing]]
                at_running = now + (bounds - attained[crossing]) / jobs.gpus[crossing]
                due = min(due, float(at_running.min()))
        return due if due < math.inf else None


@register("las")
def _las() -> Las:
    return Las("las", Fit.FIRST)


@register("las-bestfit")
def _las_bestfit() -> Las:
    return Las("las-bestfit", Fit.BEST)


@register("tiresias")
def _tiresias() -> Tiresias:
    return Tiresias("tiresias", Fit.FIRST)


@register("tiresias-bestfit")
def _tiresias_bestfit() -> Tiresias:
    return Tiresias("tiresias-bestfit", Fit.BEST)
