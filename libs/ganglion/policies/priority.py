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

The built-in policies rank by **levels** (:func:`schedule_by_levels`): a job's rank is
``(-priority, *levels, running first, submit time, id)`` where only the levels are the
policy's own, computed over columns (``ClusterState.running_columns``, ``JobQueue.columns``).
All four steps then run on numpy arrays and a few Python steps per job that may move, not
per job in the cluster: a long simulation asks hundreds of thousands of times, with
hundreds of jobs running and waiting each time. :func:`schedule_by_ranks` takes any sort
key per ``Job`` instead (the RL policy's order) and shares everything after the sort.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ganglion import __version__
from ganglion.domain import (
    ClusterState,
    Decision,
    Job,
    JobColumns,
    JobQueue,
    Placement,
    Segment,
)
from ganglion.policies.placement import Choice, Fit, FreeMap

_GPUS = operator.attrgetter("gpus")

PRIORITY_VERSION = f"builtin-{__version__}"

Rank = tuple[float | int | str, ...]
RankFn = Callable[[Job, bool, float], Rank]
"""(job, is it running, now) -> sort key; lower ranks run first."""
BatchRankFn = Callable[[Sequence[Job], bool, float], list[Rank]]
"""(jobs, are they running, now) -> one sort key per job. The batch form of ``RankFn``."""
Levels = tuple[npt.NDArray[np.int64] | npt.NDArray[np.float64], ...]
LevelFn = Callable[[JobColumns, bool, float], Levels]
"""(jobs, are they running, now) -> the policy's level columns, one entry per job: a job's
rank is ``(-priority, *levels, running first, submit time, id)``, lower first."""
Mask = npt.NDArray[np.bool_]
NextChangeFn = Callable[[float, JobColumns, Mask], "float | None"]
"""(now, the jobs as they are after the decision, which of them run then) ->
``Decision.next_decision_s``."""


@runtime_checkable
class PreemptivePolicy(Protocol):
    """A policy that may stop running jobs (``Decision.preemptions``).

    ``quantum_s`` is how often it wants to be asked again while jobs wait even if nothing
    else happens (its priorities change as running jobs attain service). None means it says
    itself when (``Decision.next_decision_s``), or that only arrivals and completions change
    its answer. The simulator reads both; the live controller (which sees only the decision)
    honours ``next_decision_s`` and otherwise asks when a job arrives or ends, and every round
    while a GPU is free.
    """

    name: str
    version: str
    quantum_s: float | None

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision: ...


def running_first(running: bool) -> int:
    """Tie-break inside one priority level: a running job keeps its GPUs (no thrashing)."""
    return 0 if running else 1


def level_ranks(levels: LevelFn, jobs: Sequence[Job], running: bool, now: float) -> list[Rank]:
    """The rank tuples of ``jobs`` under ``levels`` (what :func:`schedule_by_levels` sorts
    by and shows in ``Placement.reason``)."""
    columns = JobColumns.of(jobs)
    keys = _LevelKeys(columns, levels(columns, running, now), running_first(running))
    return [keys.rank(k) for k in range(len(jobs))]


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
    """The four steps of the module docstring with any sort key per job; ``next_change``
    (given the jobs as they are after this decision) fills ``Decision.next_decision_s``."""
    now = state.now_s
    everyone = [*state.running, *pending]
    keys = ranks(state.running, True, now) + ranks(pending, False, now)
    order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.intp)
    gpus = np.fromiter(map(_GPUS, everyone), dtype=np.int64, count=len(everyone))

    # Columns only for next_change (the RL policy passes none): for a plain list of jobs
    # they cost Python per waiting job, more than the rest of its decision.
    def columns() -> JobColumns:
        waiting = pending.columns if isinstance(pending, JobQueue) else JobColumns.of(pending)
        return JobColumns.concat(state.running_columns, waiting)

    def id_of(k: int) -> str:
        return everyone[k].id

    return _decide(
        state,
        len(state.running),
        gpus,
        id_of,
        order,
        keys.__getitem__,
        fit,
        name,
        next_change,
        columns,
    )


def schedule_by_levels(
    state: ClusterState,
    pending: Sequence[Job],
    levels: LevelFn,
    fit: Fit,
    name: str,
    next_change: NextChangeFn | None = None,
) -> Decision:
    """The four steps of the module docstring, ranking by ``levels``; ``next_change`` (given
    the jobs as they are after this decision) fills ``Decision.next_decision_s``."""
    queue = pending if isinstance(pending, JobQueue) else JobQueue.of(pending)
    now = state.now_s
    running, waiting = state.running_columns, queue.columns
    jobs = JobColumns.concat(running, waiting)
    n_run = len(running)
    ran = _LevelKeys(running, levels(running, True, now), running_first(True))
    wait = _LevelKeys(waiting, levels(waiting, False, now), running_first(False))
    # Among jobs of equal priority and levels, running ones come first, and each side is in
    # queue order (priority, submit time, id): the queue is in it already, the running jobs
    # are sorted into it. One tie-break column says both: the running jobs' places in queue
    # order, then the waiting jobs' (so a running and a waiting job never compare by id).
    tie = np.arange(len(jobs))
    tie[_queue_order(running)] = np.arange(n_run)
    levels_of_all = [np.concatenate([a, b]) for a, b in zip(ran.levels, wait.levels, strict=True)]
    order = np.lexsort((tie, *reversed(levels_of_all), -jobs.priority))

    def rank(k: int) -> Rank:
        return ran.rank(k) if k < n_run else wait.rank(k - n_run)

    def columns() -> JobColumns:
        return jobs

    return _decide(
        state, n_run, jobs.gpus, jobs.ids.item, order, rank, fit, name, next_change, columns
    )


def _queue_order(jobs: JobColumns) -> npt.NDArray[np.intp]:
    """Positions of ``jobs`` in queue order (``domain.queue_key``)."""
    order = np.lexsort((jobs.submit_time_s, -jobs.priority))
    # Ids only break ties of priority and submit time. Sorting by them costs ~10x the rest
    # (string keys), so it is done only when tied jobs are not in id order already (the
    # simulator's running jobs mostly are: it starts tied jobs in queue order).
    priority, submit = jobs.priority[order], jobs.submit_time_s[order]
    tied = np.flatnonzero((priority[1:] == priority[:-1]) & (submit[1:] == submit[:-1]))
    if len(tied):
        ids = jobs.ids[order]
        if not bool((ids[tied] < ids[tied + 1]).all()):
            order = np.lexsort((jobs.ids, jobs.submit_time_s, -jobs.priority))
    return order


class _LevelKeys:
    """The rank tuples of some jobs under a ``LevelFn``, built one at a time when needed
    (a placement's reason shows its rank)."""

    def __init__(self, columns: JobColumns, levels: Levels, running: int) -> None:
        self.columns = columns
        self.levels = levels
        self.running = running

    def rank(self, k: int) -> Rank:
        c = self.columns
        return (
            -c.priority.item(k),
            *(level.item(k) for level in self.levels),
            self.running,
            c.submit_time_s.item(k),
            c.ids.item(k),
        )


def _decide(
    state: ClusterState,
    n_run: int,
    gpus: npt.NDArray[np.int64],
    id_of: Callable[[int], str],
    order: npt.NDArray[np.intp],
    rank: Callable[[int], Rank],
    fit: Fit,
    name: str,
    next_change: NextChangeFn | None,
    columns: Callable[[], JobColumns],
) -> Decision:
    """The four steps. Jobs are numbered: the ``n_run`` running ones (``state.running``),
    then the waiting ones; ``gpus``, ``id_of`` and ``columns()`` (read for ``next_change``
    only) describe them by number, and ``order`` lists the numbers in rank order."""
    now = state.now_s

    # 1. Select by GPU count.
    kept = _select(gpus[order], state.num_gpus)
    picked = order[kept]
    chosen = picked[picked >= n_run].tolist()  # the selected pending jobs, in rank order
    selected = np.zeros(len(order), dtype=bool)
    selected[picked] = True
    placements: list[Placement] = []
    placed = np.zeros(len(order), dtype=bool)

    # 2. Place the selected pending jobs: free GPUs first, then those of the victims (the
    # running jobs not selected).
    victims = np.flatnonzero(~selected[:n_run]).tolist()
    free_now = FreeMap.from_state(state)
    free_any = (
        FreeMap.from_state(state, _holding(state, n_run, victims)) if victims and chosen else None
    )
    for k in chosen:
        need = int(gpus[k])
        choice = free_now.choose(need, fit)
        preempting = False
        if choice is None and free_any is not None:
            choice = free_any.choose(need, fit)
            preempting = True
        if choice is None:
            continue
        free_now.take(choice.segments)
        if free_any is not None:
            free_any.take(choice.segments)
        placements.append(_placement(id_of(k), choice, fit, rank(k), preempting))
        placed[k] = True

    # 3. Preempt only the victims whose GPUs were taken.
    stopped = _victims_hit(state, victims, placements) if free_any is not None else []

    # 4. Backfill onto what is really free now: free GPUs and those of the stopped jobs.
    final = free_now
    if stopped:
        final = FreeMap.from_state(state, _holding(state, n_run, stopped))
        for p in placements:
            final.take(p.segments)
    if final.total_free > 0:
        # Room only shrinks as jobs are placed, so a job that does not fit now does not fit
        # at its turn either: the loop visits only the jobs that may fit, not the queue.
        rest = order[order >= n_run]
        g = gpus[rest]
        room = np.where(g <= final.max_host, final.largest, final.idle)
        for k in rest[(g <= final.total_free) & (g <= room) & ~placed[rest]].tolist():
            need = int(gpus[k])
            choice = final.choose(need, fit)
            if choice is None:
                continue
            final.take(choice.segments)
            placements.append(_placement(id_of(k), choice, fit, rank(k), False))
            placed[k] = True
    preemptions: tuple[str, ...] = ()
    if stopped:
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        preemptions = tuple(id_of(k) for k in sorted(stopped, key=position.__getitem__))
    due = None
    if next_change is not None:
        jobs = columns()
        runs = np.arange(len(jobs)) < n_run
        if stopped:
            runs[stopped] = False
            jobs = jobs.requeued(now, stopped)
        due = next_change(now, jobs, runs | placed)
    return Decision(tuple(placements), name, PRIORITY_VERSION, preemptions, due)


def _select(gpus: npt.NDArray[np.int64], budget: int) -> npt.NDArray[np.intp]:
    """Positions (into ``gpus``, jobs in rank order) of the jobs kept by step 1: each job
    whose GPUs still fit in what is left of ``budget``, until nothing is left.

    Runs of jobs that all fit are taken with one cumulative sum; the Python loop turns
    only where a job is skipped, and each turn takes at least one job."""
    kept: list[npt.NDArray[np.intp]] = []
    start = 0
    n = len(gpus)
    while start < n and budget > 0:
        fits = np.flatnonzero(gpus[start:] <= budget)
        if len(fits) == 0:
            break
        start += int(fits[0])
        run = np.cumsum(gpus[start:])
        take = int(np.searchsorted(run, budget, side="right"))
        kept.append(np.arange(start, start + take))
        budget -= int(run[take - 1])
        start += take
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.intp)


def _holding(state: ClusterState, n_run: int, jobs: Sequence[int]) -> npt.NDArray[np.bool_]:
    """Mask of the GPUs held by the running jobs at positions ``jobs`` (of ``n_run``)."""
    flag = np.zeros(n_run + 1, dtype=bool)  # the extra last entry: free GPUs
    flag[list(jobs)] = True
    return flag[state.gpu_job]


def _victims_hit(state: ClusterState, victims: list[int], placements: list[Placement]) -> list[int]:
    """The victims (positions in ``state.running``) holding a GPU that some placement took."""
    if not victims or not placements:
        return []
    host_pos = state.hosts.index
    # One int64 key per GPU (host, device) to find the taken GPUs' positions in the columns
    # (host-major columns are sorted by it already).
    keys = state.gpu_host.astype(np.int64) * 65536 + state.gpu_index
    order = None if state.host_offsets is not None else np.argsort(keys, kind="stable")
    wanted = np.array(
        [
            host_pos(s.host) * 65536 + d
            for p in placements
            for s in p.segments
            for d in s.gpu_indices
        ],
        dtype=np.int64,
    )
    if order is None:
        at = np.searchsorted(keys, wanted)
    else:
        at = order[np.searchsorted(keys[order], wanted)]
    holders = set(state.gpu_job[at].tolist())
    return [k for k in victims if k in holders]


def _placement(job_id: str, choice: Choice, fit: Fit, key: Rank, preempting: bool) -> Placement:
    hosts = "+".join(s.host for s in choice.segments)
    how = "preempting lower ranks" if preempting else "on free GPUs"
    return Placement(
        job_id=job_id,
        segments=tuple(Segment(s.host, s.gpu_indices) for s in choice.segments),
        score=choice.score,
        runner_up_host=choice.runner_up_host,
        runner_up_score=choice.runner_up_score,
        reason=f"rank {_show(key)}; {fit.value} on {hosts} {how}",
    )


def _show(key: Rank) -> str:
    return "(" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in key) + ")"
