"""Preemptive priority scheduling, shared by ``srtf``, ``las``, ``tiresias`` and ``gittins``.

A policy here is a rank (a sort key over running and pending jobs; lower runs first) plus a
placement rule. Each decision, as in the Tiresias simulator:

1. **Select**: walk all jobs in rank order and keep each one whose GPUs still fit in the
   cluster's total (counting GPUs, not hosts); a job that does not fit is skipped, so smaller
   jobs behind it may still run.
2. **Place** the selected pending jobs in rank order, first on free GPUs and only if that
   fails on free GPUs plus those of running jobs that were not selected (the candidates for
   preemption). A job that fits nowhere (fragmentation) stays pending.
3. **Preempt** only the candidates whose GPUs a placement actually took; the others keep
   running (no preemption without a beneficiary).
4. **Backfill** the pending jobs left over, in rank order, onto GPUs still free.

Policies stay pure: everything a rank needs is in ``ClusterState``/``Job`` (attained service,
submit time, ``now``), so the decision service and the simulator get the same answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ganglion import __version__
from ganglion.domain import ClusterState, Decision, Job, Placement, Segment
from ganglion.policies.placement import Choice, Fit, FreeMap

PRIORITY_VERSION = f"builtin-{__version__}"

Rank = tuple[float | int | str, ...]
RankFn = Callable[[Job, bool, float], Rank]
"""(job, is it running, now) -> sort key; lower ranks run first."""
BatchRankFn = Callable[[Sequence[Job], bool, float], list[Rank]]
"""(jobs, are they running, now) -> one sort key per job. The batch form of ``RankFn``: a
list comprehension costs a fraction of a function call per job, and this runs for every job
on every decision."""
NextChangeFn = Callable[[float, Sequence[Job], Sequence[Job]], "float | None"]
"""(now, running after the decision, pending after it) -> ``Decision.next_decision_s``."""


@runtime_checkable
class PreemptivePolicy(Protocol):
    """A policy that may stop running jobs (``Decision.preemptions``).

    ``quantum_s`` is how often it wants to be asked again while jobs wait even if nothing
    else happens (its priorities change as running jobs attain service). None means it says
    itself when (``Decision.next_decision_s``), or that only arrivals and completions change
    its answer. The simulator reads both; the live controller asks every round anyway.
    """

    name: str
    version: str
    quantum_s: float | None

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision: ...


def running_first(running: bool) -> int:
    """Tie-break inside one priority level: a running job keeps its GPUs (no thrashing)."""
    return 0 if running else 1


def schedule_by_rank(
    state: ClusterState,
    pending: Sequence[Job],
    rank: RankFn,
    fit: Fit,
    name: str,
    next_change: NextChangeFn | None = None,
) -> Decision:
    """:func:`schedule_by_ranks` with a rank computed one job at a time."""

    def ranks(jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
        return [rank(j, running, now) for j in jobs]

    return schedule_by_ranks(state, pending, ranks, fit, name, next_change)


def schedule_by_ranks(
    state: ClusterState,
    pending: Sequence[Job],
    ranks: BatchRankFn,
    fit: Fit,
    name: str,
    next_change: NextChangeFn | None = None,
) -> Decision:
    """The four steps of the module docstring; ``next_change`` (given the jobs as they are
    after this decision) fills ``Decision.next_decision_s``."""
    now = state.now_s
    running = state.running
    jobs: list[Job] = [*running, *pending]
    n_run = len(running)
    keys = ranks(running, True, now) + ranks(pending, False, now)
    order = sorted(range(len(jobs)), key=keys.__getitem__)

    # 1. Select by GPU count.
    budget = state.num_gpus
    selected = [False] * len(jobs)
    chosen: list[int] = []  # the selected pending jobs, in rank order
    for k in order:
        g = jobs[k].gpus
        if g <= budget:
            selected[k] = True
            if k >= n_run:
                chosen.append(k)
            budget -= g
            if budget == 0:
                break
    placements: list[Placement] = []
    placed = [False] * len(jobs)
    stopped: list[int] = []
    capacity = np.bincount(state.gpu_host, minlength=len(state.hosts))

    # 2. Place the selected pending jobs: free GPUs first, then those of the victims (the
    # running jobs not selected).
    victims = [k for k in range(n_run) if not selected[k]]
    free_now = _Room(state, capacity, None)
    free_any = _Room(state, capacity, _holding(state, victims)) if victims and chosen else None
    for k in chosen:
        job = jobs[k]
        choice = free_now.choose(job.gpus, fit)
        preempting = False
        if choice is None and free_any is not None:
            choice = free_any.choose(job.gpus, fit)
            preempting = True
        if choice is None:
            continue
        free_now.take(choice.segments)
        if free_any is not None:
            free_any.take(choice.segments)
        placements.append(_placement(job, choice, fit, keys[k], preempting))
        placed[k] = True

    # 3. Preempt only the victims whose GPUs were taken.
    stopped = _victims_hit(state, victims, placements) if free_any is not None else []

    # 4. Backfill onto what is really free now: free GPUs and those of the stopped jobs.
    final = free_now
    if stopped:
        final = _Room(state, capacity, _holding(state, stopped))
        for p in placements:
            final.take(p.segments)
    for k in order:
        if k < n_run or placed[k]:
            continue
        # final.may_fit inlined: in an overloaded cluster most of the queue fails it, and
        # this loop visits the whole queue on every decision.
        g = jobs[k].gpus
        if g > final.total:
            if final.total == 0:
                break
            continue
        if g > (final.largest if g <= final.max_host else final.idle):
            continue
        choice = final.choose(g, fit)
        if choice is None:
            continue
        final.take(choice.segments)
        placements.append(_placement(jobs[k], choice, fit, keys[k], False))
        placed[k] = True
    stopped_set = set(stopped)
    preemptions = tuple(running[k].id for k in sorted(stopped, key=keys.__getitem__))
    due = None
    if next_change is not None:
        if placements or stopped:
            after_running = [j for k, j in enumerate(running) if k not in stopped_set]
            after_running += [jobs[k] for k in range(n_run, len(jobs)) if placed[k]]
            after_pending = [jobs[k] for k in range(n_run, len(jobs)) if not placed[k]]
            after_pending += [replace(running[k], queued_since_s=now) for k in stopped]
            due = next_change(now, after_running, after_pending)
        else:
            due = next_change(now, running, pending)
    return Decision(tuple(placements), name, PRIORITY_VERSION, preemptions, due)


class _Room:
    """The GPUs one placement step may use: per-host free counts (numpy, cheap) and the
    shared ``FreeMap``, built only once a job passes the count check. A long queue of jobs
    that cannot fit, the common case in an overloaded cluster, then costs O(1) per job and
    no FreeMap at all."""

    def __init__(
        self,
        state: ClusterState,
        capacity: npt.NDArray[np.int64],
        also_free: npt.NDArray[np.bool_] | None,
    ) -> None:
        self.state = state
        self.also_free = also_free
        mask = state.gpu_job < 0 if also_free is None else (state.gpu_job < 0) | also_free
        self.counts = np.bincount(state.gpu_host[mask], minlength=len(state.hosts))
        self.capacity = capacity
        self.max_host = int(capacity.max()) if len(capacity) else 0
        self.total = int(self.counts.sum())
        self.map: FreeMap | None = None
        self._refresh()

    def _refresh(self) -> None:
        self.largest = int(self.counts.max()) if len(self.counts) else 0
        self.idle = int(self.capacity[self.counts == self.capacity].sum())

    def may_fit(self, gpus: int) -> bool:
        """Necessary for ``FreeMap.choose``: room on one host, or enough idle hosts."""
        if gpus > self.total:
            return False
        return gpus <= self.largest if gpus <= self.max_host else gpus <= self.idle

    def choose(self, gpus: int, fit: Fit) -> Choice | None:
        if not self.may_fit(gpus):
            return None
        return self._free_map().choose(gpus, fit)

    def take(self, segments: tuple[Segment, ...]) -> None:
        # Through the FreeMap: it knows which of these GPUs are in this room (a choice made
        # in another room may include GPUs this one does not offer).
        free = self._free_map()
        free.take(segments)
        hosts = self.state.hosts
        for seg in segments:
            self.counts[hosts.index(seg.host)] = len(free.free[seg.host])
        self.total = free.total_free
        self._refresh()

    def _free_map(self) -> FreeMap:
        if self.map is None:
            self.map = FreeMap.from_state(self.state, self.also_free)
        return self.map


def _holding(state: ClusterState, jobs: Sequence[int]) -> npt.NDArray[np.bool_]:
    """Mask of the GPUs held by the running jobs at positions ``jobs``."""
    flag = np.zeros(len(state.running) + 1, dtype=bool)  # the extra last entry: free GPUs
    flag[list(jobs)] = True
    return flag[state.gpu_job]


def _victims_hit(state: ClusterState, victims: list[int], placements: list[Placement]) -> list[int]:
    """The victims (positions in ``state.running``) holding a GPU that some placement took."""
    if not victims or not placements:
        return []
    host_pos = {h: i for i, h in enumerate(state.hosts)}
    # One int64 key per GPU (host, device) to find the taken GPUs' positions in the columns.
    keys = state.gpu_host.astype(np.int64) * 65536 + state.gpu_index
    order = np.argsort(keys, kind="stable")
    wanted = [
        host_pos[s.host] * 65536 + d for p in placements for s in p.segments for d in s.gpu_indices
    ]
    at = order[np.searchsorted(keys[order], np.array(wanted, dtype=np.int64))]
    holders = set(state.gpu_job[at].tolist())
    return [k for k in victims if k in holders]


def _placement(job: Job, choice: Choice, fit: Fit, key: Rank, preempting: bool) -> Placement:
    hosts = "+".join(s.host for s in choice.segments)
    how = "preempting lower ranks" if preempting else "on free GPUs"
    return Placement(
        job_id=job.id,
        segments=tuple(Segment(s.host, s.gpu_indices) for s in choice.segments),
        score=choice.score,
        runner_up_host=choice.runner_up_host,
        runner_up_score=choice.runner_up_score,
        reason=f"rank {_show(key)}; {fit.value} on {hosts} {how}",
    )


def _show(key: Rank) -> str:
    return "(" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in key) + ")"
