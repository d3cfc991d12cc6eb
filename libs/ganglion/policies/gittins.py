"""``gittins``: Tiresias-G, discretised 2D Gittins-index scheduling (Gu et al., NSDI'19).

Without job durations, but with their *distribution*: the Gittins index of a job that has
attained ``a`` GPU-seconds is

    G(a) = P(S - a <= delta | S > a) / E[min(S - a, delta) | S > a]

(the chance of finishing within the next ``delta`` GPU-seconds per GPU-second invested); the
job with the highest index runs first. S is drawn from the samples Tiresias ships
(``tiresias/yarn-gput10000.csv``, GPU-time of jobs on a production YARN cluster), delta is
the Tiresias default (3,250 GPU-s). As in the Tiresias simulator the index is evaluated at
the sample points; jobs are first split into the same queues as ``tiresias`` (with its
starvation promotion) and sorted by index inside each queue, running jobs first on ties.
A job's index is re-evaluated once per service quantum of ``delta`` GPU-seconds (the Gittins
policy with a quantum): re-sorting by an index that moves with every one of the 10,000
sample points passed made jobs preempt each other on nearly every event (75,000 preemptions
for 15,000 jobs in a week of Philly). ``Decision.next_decision_s`` carries the next queue
crossing, promotion, or quantum boundary at which a running job falls behind a waiting one.

Registered as ``gittins`` (first-fit) and ``gittins-bestfit`` (best-fit/consolidated).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Decision, Job, JobColumns
from ganglion.policies.base import PolicyError, register
from ganglion.policies.las import Tiresias, TiresiasConfig
from ganglion.policies.placement import Fit
from ganglion.policies.priority import (
    PRIORITY_VERSION,
    Levels,
    Mask,
    Rank,
    level_ranks,
    schedule_by_levels,
)
from ganglion.traces import traces_dir

DEFAULT_SAMPLES = "tiresias/yarn-gput10000.csv"


class GittinsDistributionError(PolicyError):
    """The service-time samples are missing or unusable."""


@dataclass(frozen=True)
class GittinsConfig:
    """Knobs of ``gittins``."""

    samples: Path | None = None
    """CSV with a ``duration`` column of job GPU-seconds; default ``$GANGLION_TRACES`` (or
    ``../shared/traces``) ``/tiresias/yarn-gput10000.csv``."""
    delta_gpu_s: float = 3250.0
    """The index's look-ahead in GPU-seconds."""
    thresholds_gpu_s: tuple[float, ...] = TiresiasConfig().thresholds_gpu_s
    """Queue thresholds, as for ``tiresias``."""
    promote_knob: float = 8.0
    """Starvation promotion, as for ``tiresias``; 0 disables."""


class GittinsTable:
    """G(a) as a step function over the sorted distinct sample values."""

    def __init__(self, samples: npt.ArrayLike, delta: float) -> None:
        s = np.sort(np.asarray(samples, dtype=np.float64))
        if len(s) == 0 or not np.all(np.isfinite(s)) or s[0] < 0 or not delta > 0:
            raise GittinsDistributionError("need finite, non-negative samples and delta > 0")
        n = len(s)
        csum = np.concatenate([[0.0], np.cumsum(s)])
        bounds = np.unique(s)
        a = np.concatenate([[0.0], bounds])  # the left end of each step
        lo = np.searchsorted(s, a, side="right")
        hi = np.searchsorted(s, a + delta, side="right")
        alive = n - lo
        finish = hi - lo
        spent = (csum[hi] - csum[lo]) - a * finish + delta * (n - hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            index = np.where(
                alive > 0, (finish / np.maximum(alive, 1)) / (spent / np.maximum(alive, 1)), 0.0
            )
        self.delta = delta
        self._bounds = bounds
        self._values = np.nan_to_num(index, nan=0.0)

    def index(self, attained: float) -> float:
        """G(attained); 0 beyond the largest sample (nothing is known to finish)."""
        return float(self._values[np.searchsorted(self._bounds, attained, side="right")])

    def indices(self, attained: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``index`` of each entry (any shape)."""
        return self._values[np.searchsorted(self._bounds, attained, side="right")]

    def quantum_indices(self, attained: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """G at the start of each job's current service quantum of ``delta`` GPU-seconds: a
        job's index is re-evaluated once per quantum it receives, as in the Gittins policy
        with a service quantum (and its priority does not flicker with every sample passed)."""
        return self.indices(np.floor(attained / self.delta) * self.delta)


@functools.lru_cache(maxsize=4)
def load_table(path: Path, delta: float) -> GittinsTable:
    try:
        text = path.read_text().split()
    except OSError as exc:
        raise GittinsDistributionError(
            f"gittins needs job-size samples at {path} ({exc.strerror}); "
            "set GANGLION_TRACES to the shared traces folder"
        ) from None
    if not text or text[0].strip() != "duration":
        raise GittinsDistributionError(f"{path}: expected a 'duration' column")
    try:
        values = [float(v) for v in text[1:]]
    except ValueError as exc:
        raise GittinsDistributionError(f"{path}: {exc}") from None
    return GittinsTable(values, delta)


class Gittins:
    """Discretised 2D Gittins index (see the module docstring)."""

    version = PRIORITY_VERSION

    def __init__(
        self, name: str = "gittins", fit: Fit = Fit.FIRST, config: GittinsConfig | None = None
    ):
        self.name = name
        self.fit = fit
        self.config = config or GittinsConfig()
        self.quantum_s: float | None = None  # it reports Decision.next_decision_s itself
        # Queue crossings and promotions are Tiresias' own; reuse its next_change.
        self._queues = Tiresias(
            name,
            fit,
            TiresiasConfig(
                thresholds_gpu_s=self.config.thresholds_gpu_s,
                promote_knob=self.config.promote_knob,
            ),
        )

    @functools.cached_property
    def table(self) -> GittinsTable:
        """Loaded on first use, so that listing or creating the policy needs no file; read
        once per policy object (a later change of ``GANGLION_TRACES`` needs a new one)."""
        path = self.config.samples or traces_dir() / DEFAULT_SAMPLES
        return load_table(path, self.config.delta_gpu_s)

    def levels(self, jobs: JobColumns, running: bool, now: float) -> Levels:
        """The job's queue (as ``tiresias``), then minus its index at its current quantum."""
        return (
            self._queues.queues(jobs, running, now),
            -self.table.quantum_indices(jobs.attained_service_s),
        )

    def rank(self, jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        """The rank tuples (lower runs first), as ``schedule`` orders jobs."""
        return level_ranks(self.levels, jobs, running, now)

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return schedule_by_levels(
            state, pending, self.levels, self.fit, self.name, self.next_change
        )

    def next_change(self, now: float, jobs: JobColumns, running: Mask) -> float | None:
        """Tiresias' queue crossings and promotions, and the first quantum boundary at which
        a running job's index drops below the best waiting index of its queue."""
        due = self._queues.next_change(now, jobs, running)
        if running.all() or not running.any():
            return due
        table, delta = self.table, self.config.delta_gpu_s
        thresholds = self.config.thresholds_gpu_s
        attained = jobs.attained_service_s
        queues = self._queues.queues(jobs, False, now)
        top = int(queues[~running].min())
        best = float(table.quantum_indices(attained[~running & (queues == top)]).max())
        # A better waiting queue already outranks a running job; a worse one never does.
        same = running & (np.searchsorted(thresholds, attained, side="right") == top)
        if not same.any():
            return due
        end = thresholds[top] if top < len(thresholds) else math.inf
        # Each such job's next _LOOKAHEAD_QUANTA quantum boundaries (a row per job) inside
        # its queue; the first where its index falls below ``best`` is when it yields.
        served = attained[same]
        ahead = np.floor(served / delta)[:, None] + np.arange(1, _LOOKAHEAD_QUANTA + 1)
        boundary = ahead * delta
        drops = (boundary < end) & (table.indices(boundary) < best)
        yields = drops.any(axis=1)
        if yields.any():
            first = boundary[yields, drops[yields].argmax(axis=1)]
            at = float((now + (first - served[yields]) / jobs.gpus[same][yields]).min())
            due = at if due is None else min(due, at)
        return due


_LOOKAHEAD_QUANTA = 64
"""How many quanta ahead ``next_change`` looks for a running job's index to drop; beyond
that the next arrival or completion re-evaluates it."""


@register("gittins")
def _gittins() -> Gittins:
    return Gittins("gittins", Fit.FIRST)


@register("gittins-bestfit")
def _gittins_bestfit() -> Gittins:
    return Gittins("gittins-bestfit", Fit.BEST)
