"""From a network's scores to a ``Decision``, the same code in training and in serving.

Two action forms (a model's manifest says which one it was trained with):

- ``rank`` (PPO, the default): the scores rank every candidate, running and pending; the
  shared preemptive machinery (:func:`ganglion.policies.priority.schedule_by_rank`) then
  selects, places, preempts and backfills exactly as it does for ``las`` or ``tiresias``.
- ``pick`` (DQN): pick the pending job to place next, one at a time, or wait; placed by the
  shared placement code (:class:`ganglion.policies.placement.FreeMap`), never preempting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Decision, Job, Placement
from ganglion.policies.placement import Fit, FreeMap
from ganglion.policies.priority import Rank, schedule_by_rank
from ganglion.rl.features import FEATURES, ActionForm, Observation, base_key

__all__ = ["FIT", "ActionForm", "Picker", "pick_decision", "rank_decision", "rank_order"]

_RUNNING = FEATURES.index("running")
_FITS = FEATURES.index("fits_free")
_FREE = FEATURES.index("free_fraction")
_LARGEST = FEATURES.index("largest_free_block")

FIT = Fit.BEST
"""Placement of the learned policies: consolidate (keeps whole hosts for large jobs)."""


def rank_order(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
    """Candidate rows by descending score (ties: base order)."""
    return np.argsort(-scores[:n], kind="stable")


def rank_decision(
    state: ClusterState,
    pending: Sequence[Job],
    obs: Observation,
    order: npt.NDArray[np.int64],
    name: str,
    version: str,
) -> Decision:
    """Run the select/place/preempt/backfill steps with candidates in ``order``."""
    position = {obs.jobs[int(i)].id: p for p, i in enumerate(order)}

    def rank(job: Job, running: bool, now: float) -> Rank:
        p = position.get(job.id)
        if p is not None:
            return (-job.priority, 0, p)
        return (-job.priority, 1, *base_key(job, running))  # beyond k: after, in base order

    d = schedule_by_rank(state, pending, rank, FIT, name)
    return Decision(d.placements, name, version, d.preemptions)


class Picker:
    """One ``pick`` decision in progress: the free GPUs and the features as jobs are placed."""

    def __init__(self, state: ClusterState, obs: Observation) -> None:
        self.obs = obs
        self.free = FreeMap.from_state(state)
        self.capacity = max(state.num_gpus, 1)
        self.x = obs.features.copy()
        self.placed = np.zeros(len(obs.jobs), dtype=bool)
        self.placements: list[Placement] = []
        self.busy = len(state.running) > 0
        self._refresh()

    def _refresh(self) -> None:
        gpus = [j.gpus for j in self.obs.jobs]
        total = self.free.total_free
        self.valid = np.array(
            [
                not self.obs.running[i] and not self.placed[i] and self.free.may_fit(g)
                for i, g in enumerate(gpus)
            ],
            dtype=bool,
        )
        self.x[:, _FITS] = np.array(gpus) <= total if gpus else 0.0
        self.x[:, _FREE] = total / self.capacity
        self.x[:, _LARGEST] = self.free.largest / max(self.free.max_host, 1)

    @property
    def done(self) -> bool:
        return not bool(self.valid.any())

    @property
    def may_wait(self) -> bool:
        """Waiting on an idle cluster would wait forever (nothing running means no event
        that asks again), so then at least one job must be placed."""
        return self.busy or bool(self.placements)

    def pick(self, row: int) -> None:
        if not (0 <= row < len(self.valid) and self.valid[row]):
            raise ValueError(f"row {row} is not a valid pick")
        job = self.obs.jobs[row]
        choice = self.free.choose(job.gpus, FIT)
        assert choice is not None  # valid means it fits
        self.free.take(choice.segments)
        hosts = "+".join(s.host for s in choice.segments)
        self.placements.append(
            Placement(
                job_id=job.id,
                segments=choice.segments,
                score=choice.score,
                runner_up_host=choice.runner_up_host,
                runner_up_score=choice.runner_up_score,
                reason=f"picked #{len(self.placements) + 1}; {FIT.value} on {hosts}",
            )
        )
        self.placed[row] = True
        self.x[row, _RUNNING] = 1.0
        self._refresh()

    def decision(self, name: str, version: str) -> Decision:
        return Decision(tuple(self.placements), name, version)


PickScorer = Callable[[npt.NDArray[np.float32], npt.NDArray[np.bool_]], tuple[np.ndarray, float]]
"""(features, valid mask) -> (a score per row, the score of waiting)."""


def pick_decision(
    state: ClusterState, obs: Observation, scorer: PickScorer, name: str, version: str
) -> Decision:
    """Greedy picks until waiting scores higher than every valid pick or nothing fits."""
    picker = Picker(state, obs)
    for _ in range(len(obs.jobs)):
        if picker.done:
            break
        scores, wait = scorer(picker.x, picker.valid)
        masked = np.where(picker.valid, scores, -np.inf)
        row = int(np.argmax(masked))
        if masked[row] <= wait and picker.may_wait:
            break
        picker.pick(row)
    return picker.decision(name, version)
