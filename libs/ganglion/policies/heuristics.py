"""Heuristic policies: FIFO with first-fit, and best-fit packing with backfill."""

from __future__ import annotations

from collections.abc import Sequence

from ganglion import __version__
from ganglion.domain import ClusterState, Decision, Job, JobQueue, Placement
from ganglion.policies.base import register
from ganglion.policies.placement import Fit, FreeMap

HEURISTIC_VERSION = f"builtin-{__version__}"


def _submit_order(pending: Sequence[Job]) -> Sequence[Job]:
    """Queue order (:func:`~ganglion.domain.queue_key`). A ``JobQueue`` is in it already: FIFO
    then walks from the head and stops at the first job that does not fit, so a decision
    costs the jobs it looks at, not a sort of the whole queue."""
    return pending if isinstance(pending, JobQueue) else JobQueue.of(pending)


def _place_in_order(
    state: ClusterState, ordered: Sequence[Job], fit: Fit, backfill: bool, name: str
) -> Decision:
    free = FreeMap.from_state(state)
    placements: list[Placement] = []
    capacity = sum(free.capacity.values())
    how = fit.value
    for job in ordered:
        if free.total_free == 0:
            break
        gpus = job.gpus
        if gpus > capacity:
            continue  # can never fit this cluster; the caller reports it, the queue moves on
        choice = free.choose(gpus, fit)
        if choice is None:
            if backfill:
                continue
            break  # strict FIFO: the head of the queue blocks the rest
        segments, score, runner_up_host, runner_up_score = choice
        free.take(segments)
        if len(segments) == 1:
            reason = f"{how} on {segments[0].host} ({int(-score)} GPUs left free there)"
        else:
            reason = f"whole hosts {'+'.join(s.host for s in segments)} for {gpus} GPUs"
        placements.append(
            Placement(job.id, segments, score, runner_up_host, runner_up_score, reason)
        )
    return Decision(tuple(placements), name, HEURISTIC_VERSION)


@register("fifo")
class FifoFirstFit:
    """Jobs in submit order (priority first); the first job that does not fit blocks the rest,
    so no job is starved by later, smaller ones."""

    name = "fifo"
    version = HEURISTIC_VERSION

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return _place_in_order(
            state, _submit_order(pending), Fit.FIRST, backfill=False, name=self.name
        )


@register("best-fit")
class BestFitPacking:
    """Jobs in submit order onto the host they fill most tightly; a job that does not fit is
    skipped (backfill), trading strict order for utilisation."""

    name = "best-fit"
    version = HEURISTIC_VERSION

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return _place_in_order(
            state, _submit_order(pending), Fit.BEST, backfill=True, name=self.name
        )
