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

import bisect
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Decision, Job
from ganglion.policies.base import register
from ganglion.policies.placement import Fit
from ganglion.policies.priority import PRIORITY_VERSION, Rank, running_first, schedule_by_ranks


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


_PRIORITY = operator.attrgetter("priority")
_SUBMIT = operator.attrgetter("submit_time_s")
_ID = operator.attrgetter("id")
_GPUS = operator.attrgetter("gpus")
_ATTAINED = operator.attrgetter("attained_service_s")


def attained_of(jobs: Sequence[Job]) -> npt.NDArray[np.float64]:
    """The jobs' attained service as a column."""
    return np.fromiter(map(_ATTAINED, jobs), dtype=np.float64, count=len(jobs))


def queue_of(attained_gpu_s: float, thresholds: Sequence[float]) -> int:
    """Index of the queue a job with this attained service is in (0 = highest priority)."""
    return bisect.bisect_right(thresholds, attained_gpu_s)


def promoted(job: Job, now: float, knob: float) -> bool:
    """Tiresias' starvation rule for a waiting job that has run before: waited since it was
    last queued >= knob x the time it has run."""
    if knob <= 0 or job.attained_service_s <= 0:
        return False
    since = job.submit_time_s if job.queued_since_s is None else job.queued_since_s
    return now - since >= knob * job.attained_service_s / job.gpus


class Las:
    """LAS with a service quantum (see the module docstring)."""

    version = PRIORITY_VERSION

    def __init__(self, name: str = "las", fit: Fit = Fit.FIRST, config: LasConfig | None = None):
        self.name = name
        self.fit = fit
        self.config = config or LasConfig()
        self.quantum_s: float | None = None  # it reports Decision.next_decision_s itself

    def rank(self, jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        width, r = self.config.level_gpu_s, running_first(running)
        return [
            (-j.priority, int(j.attained_service_s // width), r, j.submit_time_s, j.id)
            for j in jobs
        ]

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return schedule_by_ranks(state, pending, self.rank, self.fit, self.name, self.next_change)

    def next_change(
        self, now: float, running: Sequence[Job], pending: Sequence[Job]
    ) -> float | None:
        """When a running job first climbs above the lowest waiting level (then a waiting
        job outranks it); priorities change only that way between events."""
        if not pending or not running:
            return None
        width = self.config.level_gpu_s
        lowest = min(math.floor(j.attained_service_s / width) for j in pending)
        goal = (lowest + 1) * width
        due = [
            now + (goal - j.attained_service_s) / j.gpus
            for j in running
            if j.attained_service_s < goal
        ]
        return min(due, default=None)


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

    def queue(self, job: Job, running: bool, now: float) -> int:
        """0 is the top queue; a waiting job may be promoted there (see ``promoted``)."""
        if not running and promoted(job, now, self.config.promote_knob):
            return 0
        return bisect.bisect_right(self.config.thresholds_gpu_s, job.attained_service_s)

    def rank(self, jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        thresholds = self.config.thresholds_gpu_s
        queue = bisect.bisect_right
        if running:  # running jobs are never promoted: their queue is their attained service
            # Column-wise (C-level attribute reads, one searchsorted, tuples built by zip): a
            # full cluster runs hundreds of jobs, ranked on every decision.
            queues = np.searchsorted(thresholds, attained_of(jobs), side="right").tolist()
            keys: list[Rank] = list(
                zip(
                    map(operator.neg, map(_PRIORITY, jobs)),
                    queues,
                    itertools.repeat(0, len(jobs)),
                    map(_SUBMIT, jobs),
                    map(_ID, jobs),
                    strict=True,
                )
            )
            return keys
        # ``queue`` inlined: this runs for every waiting job on every decision. A job that
        # never ran is in the top queue (thresholds are positive) and is never promoted.
        knob = self.config.promote_knob
        out: list[Rank] = []
        for j in jobs:
            a = j.attained_service_s
            if a <= 0:
                q = 0
            elif (
                knob > 0
                and now - (j.submit_time_s if j.queued_since_s is None else j.queued_since_s)
                >= knob * a / j.gpus
            ):
                q = 0  # promoted, as in ``promoted``
            else:
                q = queue(thresholds, a)
            out.append((-j.priority, q, 1, j.submit_time_s, j.id))
        return out

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return schedule_by_ranks(state, pending, self.rank, self.fit, self.name, self.next_change)

    def next_change(
        self, now: float, running: Sequence[Job], pending: Sequence[Job]
    ) -> float | None:
        """The next threshold crossing of a running job that drops it below a waiting job's
        queue, or the next promotion of a waiting job (the Tiresias simulator's "next job
        jump")."""
        if not pending or not running:
            return None
        thresholds = self.config.thresholds_gpu_s
        knob = self.config.promote_knob
        due = math.inf
        # One pass over the waiting jobs: the best queue among them, and the next promotion.
        # Even when every running job is in the top queue now, it may have dropped by the time
        # of a promotion; a promotion that changes nothing costs one call.
        top_waiting = len(thresholds)
        for j in pending:
            a = j.attained_service_s
            if a <= 0:  # never ran: the top queue, and no promotion to come
                top_waiting = 0
                continue
            if knob > 0:
                since = j.submit_time_s if j.queued_since_s is None else j.queued_since_s
                at = since + knob * a / j.gpus
                if now >= at:
                    top_waiting = 0
                    continue
                if at < due and thresholds:
                    due = at
            q = bisect.bisect_right(thresholds, a)
            if q < top_waiting:
                top_waiting = q
        if top_waiting < len(thresholds):
            # The running jobs column-wise: the same float operations as a loop, per job.
            attained = attained_of(running)
            queues = np.searchsorted(thresholds, attained, side="right")
            crossing = (queues >= top_waiting) & (queues < len(thresholds))
            if crossing.any():
                gpus = np.fromiter(map(_GPUS, running), dtype=np.float64, count=len(running))
                bounds = np.asarray(thresholds, dtype=np.float64)[queues[crossing]]
                at = float((now + (bounds - attained[crossing]) / gpus[crossing]).min())
                if at < due:
                    due = at
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
