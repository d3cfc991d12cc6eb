"""Typed domain values shared by services, policies and the simulator.

Services translate protobuf <-> these types at their edge (:mod:`ganglion.convert`); policies
only ever see these. Cluster state is columnar (numpy arrays, one entry per GPU).
"""

from __future__ import annotations

import enum
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar, overload

import numpy as np
import numpy.typing as npt

_T = TypeVar("_T")


class _cached(Generic[_T]):
    """``functools.cached_property`` without its lock: on Python 3.11 one lock per class is
    held while any instance computes, so a big state built on a worker thread (a large
    request offloaded by the decision service) would stall every other state's first read on
    the event loop. Two threads racing both compute; the values are equal, the last stays."""

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _cached[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> _T | _cached[_T]:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)  # found there first from now on
        return value


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
    """A job as policies see it. Non-clairvoyant: no true duration here, except the simulator's
    optional ``duration_hint_s`` that only oracle policies (``srtf``) read."""

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
    duration_hint_s: float | None = None
    """Oracle hint: the job's true run time in seconds. Only the trace simulator sets it (the
    live controller never does), and only oracle policies such as ``srtf`` read it."""
    queued_since_s: float | None = None
    """When the job last entered the queue: its submit time, or the time it was last
    preempted (None: the submit time). Tiresias' starvation promotion counts from here."""


def queue_key(job: Job) -> tuple[int, float, str]:
    """Queue order of pending jobs: higher priority first, then earlier submit, then id."""
    return (-job.priority, job.submit_time_s, job.id)


_ID = operator.attrgetter("id")
_PRIORITY = operator.attrgetter("priority")
_GPUS = operator.attrgetter("gpus")
_SUBMIT = operator.attrgetter("submit_time_s")
_ATTAINED = operator.attrgetter("attained_service_s")


@dataclass(frozen=True, eq=False)
class JobColumns:
    """What ranking reads of a sequence of jobs, one numpy entry per job in its order.

    The LAS family ranks every running and waiting job on every decision; over columns that
    is a few numpy operations instead of Python per job, and a caller that has the columns
    already (the simulator) need not build a ``Job`` per running job per decision at all.
    """

    ids: npt.NDArray[np.str_]
    """``Job.id``."""
    priority: npt.NDArray[np.int64]
    """``Job.priority``."""
    gpus: npt.NDArray[np.int64]
    """``Job.gpus``."""
    submit_time_s: npt.NDArray[np.float64]
    """``Job.submit_time_s``."""
    attained_service_s: npt.NDArray[np.float64]
    """``Job.attained_service_s``."""
    queued_since_s: npt.NDArray[np.float64]
    """``Job.queued_since_s``, its submit time where that is None."""
    duration_hint_s: npt.NDArray[np.float64]
    """``Job.duration_hint_s``, NaN where that is None."""

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, jobs: Sequence[Job]) -> JobColumns:
        n = len(jobs)
        return cls(
            ids=np.array(list(map(_ID, jobs)), dtype=np.str_),
            priority=np.fromiter(map(_PRIORITY, jobs), dtype=np.int64, count=n),
            gpus=np.fromiter(map(_GPUS, jobs), dtype=np.int64, count=n),
            submit_time_s=np.fromiter(map(_SUBMIT, jobs), dtype=np.float64, count=n),
            attained_service_s=np.fromiter(map(_ATTAINED, jobs), dtype=np.float64, count=n),
            queued_since_s=np.fromiter(
                (j.submit_time_s if j.queued_since_s is None else j.queued_since_s for j in jobs),
                dtype=np.float64,
                count=n,
            ),
            duration_hint_s=np.fromiter(
                (math.nan if j.duration_hint_s is None else j.duration_hint_s for j in jobs),
                dtype=np.float64,
                count=n,
            ),
        )

    def requeued(self, now_s: float, which: Sequence[int]) -> JobColumns:
        """These jobs, those at positions ``which`` queued again at ``now_s`` (preempted)."""
        since = self.queued_since_s.copy()
        since[list(which)] = now_s
        return JobColumns(
            self.ids,
            self.priority,
            self.gpus,
            self.submit_time_s,
            self.attained_service_s,
            since,
            self.duration_hint_s,
        )

    @staticmethod
    def concat(first: JobColumns, second: JobColumns) -> JobColumns:
        return JobColumns(
            np.concatenate([first.ids, second.ids]),
            np.concatenate([first.priority, second.priority]),
            np.concatenate([first.gpus, second.gpus]),
            np.concatenate([first.submit_time_s, second.submit_time_s]),
            np.concatenate([first.attained_service_s, second.attained_service_s]),
            np.concatenate([first.queued_since_s, second.queued_since_s]),
            np.concatenate([first.duration_hint_s, second.duration_hint_s]),
        )


class StaleQueueError(RuntimeError):
    """A :meth:`JobQueue.view` read after its owner changed the queue."""


class JobQueue(Sequence[Job]):
    """Pending jobs known to be in queue order (:func:`queue_key`), read only.

    Policies take any ``Sequence[Job]`` and order it themselves; handed a ``JobQueue``, an
    order-sensitive policy (``fifo``) walks it from the head instead of sorting the whole
    queue on every decision (that sort was most of a FIFO simulation of a long trace). ``of``
    sorts any jobs; a caller that keeps its queue sorted hands it over with ``trusted`` (a
    copy) or ``view`` (no copy, readable only until the owner changes the queue).
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        columns: Callable[[JobQueue], JobColumns] | None = None,
        current: Callable[[], bool] | None = None,
    ) -> None:
        """Prefer the constructors below; ``jobs`` must already be in queue order."""
        self._jobs = jobs
        self._build_columns = columns
        self._current = current
        self._columns: JobColumns | None = None

    @classmethod
    def of(cls, jobs: Iterable[Job]) -> JobQueue:
        """``jobs`` sorted into queue order."""
        return cls(tuple(sorted(jobs, key=queue_key)))

    @classmethod
    def trusted(cls, jobs: Iterable[Job]) -> JobQueue:
        """``jobs`` as they are: the caller guarantees they are in queue order (checking would
        cost as much as the sort it saves)."""
        return cls(tuple(jobs))

    @classmethod
    def view(
        cls,
        jobs: Sequence[Job],
        current: Callable[[], bool],
        columns: Callable[[JobQueue], JobColumns] | None = None,
    ) -> JobQueue:
        """``trusted`` without the copy: the owner's own sequence, valid while ``current()``
        is true; read after that, it raises :class:`StaleQueueError`. The simulator hands its
        queue over this way: copying a FIFO queue tens of thousands of jobs long on every
        decision made a decision's cost grow with the queue. A policy reads its input during
        ``schedule`` only, so it never sees the difference."""
        return cls(jobs, columns, current)

    def _items(self) -> Sequence[Job]:
        if self._current is not None and not self._current():
            raise StaleQueueError(
                "this JobQueue is a view of a queue that has changed since it was handed "
                "over; copy it (tuple(queue)) to keep it"
            )
        return self._jobs

    def __len__(self) -> int:
        return len(self._items())

    @overload
    def __getitem__(self, i: int) -> Job: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Job]: ...

    def __getitem__(self, i: int | slice) -> Job | Sequence[Job]:
        return self._items()[i]

    def __iter__(self) -> Iterator[Job]:
        return iter(self._items())

    def __repr__(self) -> str:
        if self._current is not None and not self._current():
            return "JobQueue(<stale view>)"  # a log line or a debugger must not raise
        return f"JobQueue({list(self._jobs)!r})"

    def __eq__(self, other: object) -> bool:
        """As tuples compare: the same jobs in the same order (a JobQueue or a tuple)."""
        if isinstance(other, JobQueue):
            return tuple(self._items()) == tuple(other._items())
        if isinstance(other, tuple):
            return tuple(self._items()) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a view's contents may change

    @property
    def columns(self) -> JobColumns:
        """The jobs as columns, in queue order (built on the first read; a stale view raises
        on every read, as for the jobs)."""
        jobs = self._items()
        columns = self._columns
        if columns is None:
            build = self._build_columns
            columns = self._columns = JobColumns.of(jobs) if build is None else build(self)
        return columns


class Segment(NamedTuple):
    """The GPUs of one job on one host.

    Segment and Placement are named tuples, not frozen dataclasses: a decision builds one of
    each per placed job, and a frozen dataclass stores each field through
    ``object.__setattr__`` (a Placement took 1.1 us to build that way on the development
    machine, 0.4 us as a named tuple). Both stay immutable and compare by value."""

    host: str
    gpu_indices: tuple[int, ...]


class Placement(NamedTuple):
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
    preemptions: tuple[str, ...] = ()
    """Ids of running jobs to stop (their GPUs count as free for ``placements``). The simulator
    applies them at once; the live controller stops them and places onto their GPUs in a later
    round, once they are free (``ganglion_controller.loop``)."""
    next_decision_s: float | None = None
    """When this policy's answer may next change although no job arrives or finishes (a
    running job crossing a priority threshold, a waiting job due for promotion); None: only
    on such events. The simulator asks again exactly then."""


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
        self._check(len(self.running))

    def _check(self, num_running: int) -> None:
        """The constructor's checks, against ``num_running`` running jobs (all they need of
        them, so a state whose jobs come later, :meth:`lazy`, is checked the same way)."""
        n = len(self.gpu_host)
        for name in ("gpu_index", "gpu_job", "gpu_utilization"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, gpu_host has {n}")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError("hosts has duplicate names")
        if not n:
            return
        if int(self.gpu_job.max()) >= num_running:
            raise ValueError("gpu_job refers to a job that is not in running")
        if int(self.gpu_job.min()) < -1:
            raise ValueError("gpu_job must be -1 (free) or an index into running")
        # One int64 key per (host, device). Strictly increasing keys (host-major columns: what
        # build, the simulator and a request made from either hold) have no repeat, bound
        # gpu_host by its two ends and give host_offsets, without a sort or a reduction;
        # otherwise a sort finds a repeat, ~20x cheaper than np.unique over stacked pairs. A
        # decoded request pays these checks on every call.
        key = self._gpu_keys()
        if _ascending(key):
            if int(self.gpu_host[0]) < 0 or int(self.gpu_host[-1]) >= len(self.hosts):
                raise ValueError("gpu_host refers to a host that is not in hosts")
            self.__dict__["host_offsets"] = self._host_bounds()
            return
        if int(self.gpu_host.min()) < 0 or int(self.gpu_host.max()) >= len(self.hosts):
            raise ValueError("gpu_host refers to a host that is not in hosts")
        key.sort()
        if bool((key[1:] == key[:-1]).any()):
            raise ValueError("the same (host, gpu_index) appears twice")
        self.__dict__["host_offsets"] = None

    def _gpu_keys(self) -> npt.NDArray[np.int64]:
        """(host, device) of each GPU as one int64 that orders like the pair."""
        return (self.gpu_host.astype(np.int64) << 32) | (
            self.gpu_index.astype(np.int64) & 0xFFFFFFFF
        )

    def _host_bounds(self) -> tuple[int, ...]:
        return tuple(self.gpu_host.searchsorted(np.arange(len(self.hosts) + 1)).tolist())

    @property
    def num_gpus(self) -> int:
        return len(self.gpu_host)

    @_cached
    def host_offsets(self) -> tuple[int, ...] | None:
        """Where each host's GPUs start in the columns (one more entry: the end) when the
        columns are host-major (hosts in ``hosts`` order, devices ascending: the layout
        ``build`` and the simulator produce), else None. Placement then splits free GPUs by
        host without sorting them. (The constructor's checks find it on their way.)"""
        return self._host_bounds() if _ascending(self._gpu_keys()) else None

    @_cached
    def host_capacity(self) -> tuple[int, ...]:
        """GPUs per host, in ``hosts`` order."""
        return tuple(np.bincount(self.gpu_host, minlength=len(self.hosts)).tolist())

    @_cached
    def running_columns(self) -> JobColumns:
        """``running`` as columns, in the same order (what the LAS family ranks by)."""
        return JobColumns.of(self.running)

    @classmethod
    def unchecked(
        cls,
        now_s: float,
        hosts: tuple[str, ...],
        gpu_host: npt.NDArray[np.int32],
        gpu_index: npt.NDArray[np.int32],
        gpu_job: npt.NDArray[np.int32],
        gpu_utilization: npt.NDArray[np.float32],
        running_columns: JobColumns,
        running: Callable[[], tuple[Job, ...]],
        derived: Mapping[str, object],
    ) -> ClusterState:
        """A state from a caller that already holds it as columns (the simulator), without
        the checks of the constructor: the caller guarantees them, and ``derived`` (the
        cached properties ``host_offsets`` and ``host_capacity``) is what those properties
        would compute. The ``Job`` values of ``running`` are built by ``running()`` when first
        read and must match ``running_columns``: a policy that reads only the columns then
        costs no ``Job`` per running job (building them was most of a decision)."""
        columns = (now_s, hosts, gpu_host, gpu_index, gpu_job, gpu_utilization)
        extra = {"running_columns": running_columns, "_build_running": running, **derived}
        return _lazy_state(*columns, extra)

    @classmethod
    def lazy(
        cls,
        now_s: float,
        hosts: tuple[str, ...],
        gpu_host: npt.NDArray[np.int32],
        gpu_index: npt.NDArray[np.int32],
        gpu_job: npt.NDArray[np.int32],
        gpu_utilization: npt.NDArray[np.float32],
        num_running: int,
        running: Callable[[], tuple[Job, ...]],
        running_columns: Callable[[], JobColumns] | None = None,
    ) -> ClusterState:
        """The constructor's state, checked the same way (ValueError), whose ``num_running``
        running jobs are built when first read: ``running`` by ``running()``, and
        ``running_columns`` by ``running_columns()`` when given (else from ``running``). A
        decoded request builds them from its messages: a policy that reads neither (best-fit,
        FIFO) then costs no ``Job`` per running job, one that ranks by the columns (the LAS
        family) builds no ``Job`` either. Each builder must return ``num_running`` jobs in
        ``gpu_job``'s order; a different count raises ValueError on that first read."""
        columns = (now_s, hosts, gpu_host, gpu_index, gpu_job, gpu_utilization)
        state = _lazy_state(*columns, {"_build_running": running, "_num_running": num_running})
        if running_columns is not None:
            state.__dict__["_build_running_columns"] = running_columns
        state._check(num_running)
        return state

    def capacity_by_host(self) -> dict[str, int]:
        return dict(zip(self.hosts, self.host_capacity, strict=True))

    def free_by_host(self) -> dict[str, list[int]]:
        """Free device indices per host (sorted), every host present, in ``hosts`` order."""
        # Sorted by (host, device), then sliced per host: no per-GPU numpy scalar access,
        # which cost ~2 us a GPU and dominated small decisions.
        free = np.flatnonzero(self.gpu_job < 0)
        free = free[np.lexsort((self.gpu_index[free], self.gpu_host[free]))]
        bounds = np.searchsorted(self.gpu_host[free], np.arange(len(self.hosts) + 1)).tolist()
        devices = self.gpu_index[free].tolist()
        return {h: devices[bounds[i] : bounds[i + 1]] for i, h in enumerate(self.hosts)}

    @classmethod
    def build(
        cls,
        now_s: float,
        host_gpus: Mapping[str, int],
        allocations: Mapping[str, Sequence[Segment]] | None = None,
        running: Sequence[Job] = (),
        utilization: Mapping[tuple[str, int], float] | None = None,
        gpu_utilization: npt.NDArray[np.float32] | None = None,
    ) -> ClusterState:
        """Columns from row-wise facts: GPU counts per host and the running jobs' segments.

        Utilisation comes either per ``(host, GPU index)`` (``utilization``) or, from a caller
        that keeps it by host already (the controller), as the finished column in this
        state's GPU order (``gpu_utilization``, -1 where unknown)."""
        hosts = tuple(host_gpus)
        host_pos = {h: i for i, h in enumerate(hosts)}
        gpu_host = np.repeat(np.arange(len(hosts), dtype=np.int32), [host_gpus[h] for h in hosts])
        gpu_index = np.concatenate(
            [np.arange(host_gpus[h], dtype=np.int32) for h in hosts] or [np.zeros(0, np.int32)]
        )
        # Filled as Python lists (plain int offsets, list stores), converted once: element
        # stores into numpy arrays cost several times more per GPU.
        offsets = [0, *itertools.accumulate(host_gpus[h] for h in hosts)]
        gpu_job = [-1] * len(gpu_host)
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
        if gpu_utilization is None:
            util = [-1.0] * len(gpu_host)
            for (host, idx), value in (utilization or {}).items():
                if host in host_pos and 0 <= idx < host_gpus[host]:
                    util[offsets[host_pos[host]] + idx] = value
            gpu_utilization = np.array(util, dtype=np.float32)
        elif utilization is not None:
            raise ValueError("give utilization or gpu_utilization, not both")
        return cls(
            now_s,
            hosts,
            gpu_host,
            gpu_index,
            np.array(gpu_job, dtype=np.int32),
            gpu_utilization,
            tuple(running),
        )


def _ascending(key: npt.NDArray[np.int64]) -> bool:
    """Whether ``key`` is strictly increasing (GPU columns in host-major order)."""
    return len(key) < 2 or bool((key[1:] > key[:-1]).all())


def _lazy_state(
    now_s: float,
    hosts: tuple[str, ...],
    gpu_host: npt.NDArray[np.int32],
    gpu_index: npt.NDArray[np.int32],
    gpu_job: npt.NDArray[np.int32],
    gpu_utilization: npt.NDArray[np.float32],
    extra: Mapping[str, object],
) -> _LazyRunningState:
    """A ``_LazyRunningState`` of these columns, ``extra`` stored as they are (builders,
    derived values), with no checks: ``unchecked`` and ``lazy`` decide what to check."""
    state = object.__new__(_LazyRunningState)
    state.__dict__.update(
        now_s=now_s,
        hosts=hosts,
        gpu_host=gpu_host,
        gpu_index=gpu_index,
        gpu_job=gpu_job,
        gpu_utilization=gpu_utilization,
    )
    state.__dict__.update(extra)
    return state


class _LazyRunningState(ClusterState):
    """A ``ClusterState`` whose ``running`` (and ``running_columns``) are built on first read
    (``ClusterState.unchecked``, ``ClusterState.lazy``); once built, each is the same value on
    every read, like any field."""

    @_cached
    def running(self) -> tuple[Job, ...]:
        build: Callable[[], tuple[Job, ...]] = self.__dict__["_build_running"]
        jobs = build()
        self._check_count(len(jobs), "Jobs")
        return jobs

    @_cached
    def running_columns(self) -> JobColumns:
        build: Callable[[], JobColumns] | None = self.__dict__.get("_build_running_columns")
        if build is None:
            return JobColumns.of(self.running)
        columns = build()
        self._check_count(len(columns), "columns")
        return columns

    def _check_count(self, built: int, what: str) -> None:
        expected: int | None = self.__dict__.get("_num_running")  # unchecked: not known
        if expected is not None and built != expected:
            raise ValueError(f"the running jobs' {what} came to {built}, not {expected}")
