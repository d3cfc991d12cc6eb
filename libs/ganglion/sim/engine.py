"""The discrete-event simulator: a trace, a cluster and any ``Policy``.

The simulator replaces executors and the clock, nothing else. It hands a policy the same
``ClusterState``/``Job`` values the live controller builds and applies its ``Decision``
(preemptions first, then placements), so a policy cannot tell whether it is simulated.

Driving it is a two-call protocol, so the same loop works with an in-process policy and a
remote decision service (see :mod:`ganglion.sim.runner`)::

    sim = Simulation(trace, cluster, config)
    while (request := sim.next_request()) is not None:
        sim.apply(policy.schedule(request.state, request.pending))
    result = sim.result()

Cost model: a policy is only asked when something changed (arrivals, completions, a quantum
tick of a preemptive policy; events at the same instant are coalesced) and when it could do
something (a pending job and, unless it may preempt, a free GPU). The GPU columns are kept
as numpy arrays and updated in place, and so are the jobs' fields: a request hands the
running and waiting jobs over as columns too (``ClusterState.running_columns``,
``JobQueue.columns``), and builds the running ``Job`` values (with their attained service
now) only if the policy reads them. Waiting jobs are kept in queue order
(``domain.queue_key``) as they arrive and leave, and handed over as a ``JobQueue`` view of
that list (no copy per decision), so an order-sensitive policy need not sort them and a
decision's cost does not grow with the length of the queue unless the policy reads it all.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Decision, Job, JobColumns, JobQueue
from ganglion.sim.cluster import ClusterSpec
from ganglion.sim.result import PlacementRecord, SimResult
from ganglion.traces import Trace

_INF = math.inf


class SimulationError(Exception):
    """A decision the simulator cannot apply (a policy bug), or misuse of the protocol."""


@dataclass(frozen=True)
class SimConfig:
    """How one simulation runs (the policy and trace are given separately)."""

    restart_penalty_s: float = 30.0
    """Seconds a preempted job needs after each restart before it makes progress again
    (checkpoint restore, warm-up); the GPUs are held meanwhile."""
    quantum_s: float | None = None
    """Seconds between re-decisions of a preemptive policy while jobs wait; None uses the
    policy's own ``quantum_s``."""
    preemptive: bool = False
    """Whether the policy may stop jobs (then it is asked even when no GPU is free)."""
    seed: int = 0
    """Seeds Python's and numpy's global generators before the run (for policies that draw
    random numbers); the simulator itself draws none."""
    record_placements: bool = False
    """Keep every placement and preemption (time, job, GPUs) in the result (parity checks)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.restart_penalty_s) and self.restart_penalty_s >= 0):
            raise ValueError(f"restart penalty must be >= 0, got {self.restart_penalty_s}")
        if self.quantum_s is not None and not (
            math.isfinite(self.quantum_s) and self.quantum_s > 0
        ):
            raise ValueError(f"quantum must be > 0 seconds, got {self.quantum_s}")


@dataclass(frozen=True)
class Request:
    """What the policy is asked: the cluster now and the jobs waiting, in queue order."""

    state: ClusterState
    pending: JobQueue
    """A view of the simulator's queue (``JobQueue.view``): read it before ``apply``, or
    copy it; read after the queue changed, it raises ``domain.StaleQueueError``."""


ProgressFn = Callable[[int], None]
"""Called now and then with the number of jobs finished so far."""


class Simulation:
    """One run; not reusable. See the module docstring for the protocol."""

    def __init__(
        self,
        trace: Trace,
        cluster: ClusterSpec,
        config: SimConfig | None = None,
        *,
        policy_name: str = "",
        progress: ProgressFn | None = None,
    ) -> None:
        self.trace = trace
        self.cluster = cluster
        self.config = config = config or SimConfig()
        self.policy_name = policy_name
        self._progress = progress
        n = len(trace)
        capacity = cluster.num_gpus
        self._hosts = cluster.hosts
        self._host_pos = {h: i for i, h in enumerate(cluster.hosts)}
        self._host_base = np.concatenate([[0], np.cumsum(cluster.gpus)]).astype(int).tolist()
        self._host_size = list(cluster.gpus)
        self._gpu_host = np.repeat(np.arange(len(cluster.hosts), dtype=np.int32), cluster.gpus)
        self._gpu_index = np.concatenate(
            [np.arange(g, dtype=np.int32) for g in cluster.gpus]
        ).astype(np.int32)
        self._gpu_util = np.full(capacity, -1.0, dtype=np.float32)  # sensing: unknown
        self._gpu_slot = np.full(capacity, -1, dtype=np.int64)  # trace index holding each GPU
        self._remap = np.full(n + 1, -1, dtype=np.int32)  # [-1] stays -1 for free GPUs
        self._free = capacity

        self._submit = trace.submit_s.tolist()
        self._duration = trace.duration_s.tolist()
        self._gpus = trace.num_gpus.tolist()
        self._ids = trace.job_id
        self._tenants = trace.tenant
        self._index = {jid: i for i, jid in enumerate(trace.job_id)}
        self._fits = [g <= capacity for g in self._gpus]

        self._progress_s = [0.0] * n  # useful work done
        # Per trace index, as columns: a request gathers the running and waiting jobs' rows.
        self._id_col = np.array(trace.job_id, dtype=np.str_)
        self._priority_col = trace.priority.astype(np.int64)
        self._gpus_col = trace.num_gpus.astype(np.int64)
        self._submit_col = trace.submit_s.astype(np.float64)
        self._hint_col = trace.duration_s.astype(np.float64)
        self._attained = np.zeros(n)  # GPU-seconds held, restarts included
        self._start = np.zeros(n)  # start of the current run
        self._since = self._submit_col.copy()  # when the job last entered the queue
        self._penalty = [0.0] * n  # restart penalty of the current run
        self._first_start = [_INF] * n
        self._finish = [_INF] * n
        self._preempted = [0] * n
        self._epoch = [0] * n  # invalidates a preempted run's completion event
        self._alloc: list[list[int]] = [[] for _ in range(n)]
        # Themis' n for each job: the mean number of tenants with jobs in the system over
        # the job's life, from the running integral of that count.
        self._sharing = [1.0] * n
        self._area_at_submit = [0.0] * n
        self._tenant_area = 0.0
        self._in_system: dict[str, int] = {}
        self._tenants_active = 0
        self._priority = trace.priority.tolist()

        # trace index -> the Job's fields as of its start: with the columns, all _state()
        # needs to build it with its attained service now.
        self._running: dict[int, dict[str, object]] = {}
        self._pending: dict[int, Job] = {}  # trace index -> the job as it waits
        # The same jobs in queue order (domain.queue_key, then trace index), with their keys
        # for bisect and trace indices: handed to the policy as a JobQueue, so that FIFO
        # need not sort them, with columns gathered by those indices.
        self._queue: list[Job] = []
        self._queue_keys: list[tuple[int, float, str, int]] = []
        self._queue_index: list[int] = []
        self._waiting_now: JobQueue | None = None  # the queue handed over, until it changes
        self._queue_version = 0  # counts changes of the queue: a handed-over view checks it
        self._running_now: _RunningSet | None = None  # likewise the running jobs
        self._completions: list[tuple[float, int, int]] = []  # (time, index, epoch)
        self._next_arrival = 0
        self._next_tick = _INF
        self._now = float(trace.submit_s[0]) if n else 0.0
        self._dirty = False
        self._awaiting = False
        self._done = 0
        self._dropped = 0

        self.events = 0
        self.calls = 0
        self.preemptions = 0
        self._busy_gpu_s = 0.0
        self._t_sample: list[float] = []
        self._busy_sample: list[int] = []
        self._queue_sample: list[int] = []
        self.placements: list[PlacementRecord] = []
        self.preempted: list[tuple[float, str]] = []
        self._wall_started = time.perf_counter()
        self._quantum = config.quantum_s
        self._layout: dict[str, object] | None = None

    # -- the protocol ------------------------------------------------------------------------

    def next_request(self) -> Request | None:
        """Advance to the next moment the policy should be asked; None when the run is over."""
        if self._awaiting:
            raise SimulationError("apply() the previous decision before asking again")
        while True:
            if self._dirty and self._pending and (self._free > 0 or self.config.preemptive):
                self._awaiting = True
                self.calls += 1
                return Request(self._state(), self._waiting())
            self._dirty = False
            t = self._next_event_time()
            if t == _INF:
                return None
            self._advance(t)

    def apply(self, decision: Decision) -> None:
        """Stop the jobs the policy preempts, then start the ones it places."""
        if not self._awaiting:
            raise SimulationError("apply() without a pending request")
        self._awaiting = False
        self._dirty = False
        now = self._now
        for job_id in decision.preemptions:
            i = self._index.get(job_id, -1)
            if i not in self._running:
                raise SimulationError(
                    f"{decision.policy} preempts {job_id!r}, which is not running at t={now:g}"
                )
            self._stop(i)
        for p in decision.placements:
            i = self._index.get(p.job_id, -1)
            if i not in self._pending:
                raise SimulationError(
                    f"{decision.policy} places {p.job_id!r}, which is not pending at t={now:g}"
                )
            gpus: list[int] = []
            for seg in p.segments:
                h = self._host_pos.get(seg.host)
                if h is None:
                    raise SimulationError(
                        f"{decision.policy} places {p.job_id!r} on unknown host {seg.host!r}"
                    )
                base, size = self._host_base[h], self._host_size[h]
                for d in seg.gpu_indices:
                    if not 0 <= d < size:
                        raise SimulationError(f"{decision.policy}: {seg.host} has no GPU {d}")
                    gpus.append(base + d)
            if len(gpus) != self._gpus[i] or len(set(gpus)) != len(gpus):
                raise SimulationError(
                    f"{decision.policy} gives {p.job_id!r} {len(set(gpus))} distinct GPUs, "
                    f"it asked for {self._gpus[i]}"
                )
            if any(self._gpu_slot[g] >= 0 for g in gpus):
                raise SimulationError(f"{decision.policy} places {p.job_id!r} on a busy GPU")
            self._begin(i, gpus)
            if self.config.record_placements:
                self.placements.append(
                    (now, p.job_id, tuple((s.host, tuple(s.gpu_indices)) for s in p.segments))
                )
        # Ask again when the policy says its answer changes by itself, or every quantum;
        # only while someone waits and someone runs (else nothing can change by itself).
        self._next_tick = _INF
        if self._pending and self._running:
            if self._quantum is not None:
                self._next_tick = now + self._quantum
            elif decision.next_decision_s is not None and decision.next_decision_s > now:
                self._next_tick = decision.next_decision_s
        self._sample()

    def result(self) -> SimResult:
        """Per-job outcomes and the run's counters (call after ``next_request`` gave None)."""
        return SimResult(
            trace=self.trace,
            cluster=self.cluster,
            policy=self.policy_name,
            config=self.config,
            first_start=np.array(self._first_start),
            finish=np.array(self._finish),
            preemptions=np.array(self._preempted, dtype=np.int32),
            tenants_sharing=np.array(self._sharing),
            fits=np.array(self._fits, dtype=bool),
            busy_gpu_s=self._busy_gpu_s,
            timeline=(
                np.array(self._t_sample),
                np.array(self._busy_sample, dtype=np.int32),
                np.array(self._queue_sample, dtype=np.int32),
            ),
            events=self.events,
            calls=self.calls,
            wall_s=time.perf_counter() - self._wall_started,
            placements=tuple(self.placements),
            preempted=tuple(self.preempted),
        )

    # -- events ------------------------------------------------------------------------------

    def _next_event_time(self) -> float:
        t = self._next_tick
        if self._next_arrival < len(self._submit):
            t = min(t, self._submit[self._next_arrival])
        if self._completions:
            t = min(t, self._completions[0][0])
        return t

    def _advance(self, t: float) -> None:
        """Move the clock to ``t`` and handle everything that happens then."""
        self._busy_gpu_s += (self.cluster.num_gpus - self._free) * (t - self._now)
        self._tenant_area += self._tenants_active * (t - self._now)
        self._now = t
        heap = self._completions
        while heap and heap[0][0] <= t:
            _, i, epoch = heapq.heappop(heap)
            if epoch == self._epoch[i]:  # else: a run that was preempted
                self._complete(i)
        submit = self._submit
        while self._next_arrival < len(submit) and submit[self._next_arrival] <= t:
            self._arrive(self._next_arrival)
            self._next_arrival += 1
        if self._next_tick <= t:
            self._next_tick = _INF
            self.events += 1
            self._dirty = True
        self._sample()

    def _arrive(self, i: int) -> None:
        self.events += 1
        if not self._fits[i]:
            self._dropped += 1  # larger than the whole cluster: reported, never queued
            return
        tenant = self._tenants[i]
        count = self._in_system.get(tenant, 0)
        self._in_system[tenant] = count + 1
        if count == 0:
            self._tenants_active += 1
        self._area_at_submit[i] = self._tenant_area
        self._enqueue(
            i,
            Job(
                id=self._ids[i],
                tenant=tenant,
                gpus=self._gpus[i],
                submit_time_s=self._submit[i],
                priority=self._priority[i],
                duration_hint_s=self._duration[i],
            ),
        )
        self._dirty = True

    def _complete(self, i: int) -> None:
        self.events += 1
        self._release(i)
        del self._running[i]
        self._running_now = None
        self._finish[i] = self._now
        self._progress_s[i] = self._duration[i]
        tenant = self._tenants[i]
        life = self._now - self._submit[i]
        if life > 0:
            self._sharing[i] = (self._tenant_area - self._area_at_submit[i]) / life
        else:
            self._sharing[i] = float(self._tenants_active)
        self._in_system[tenant] -= 1
        if self._in_system[tenant] == 0:
            self._tenants_active -= 1
        self._done += 1
        self._dirty = True
        if self._progress is not None and self._done % 512 == 0:
            self._progress(self._done)

    def _begin(self, i: int, gpus: list[int]) -> None:
        now = self._now
        job = self._dequeue(i)
        slot = self._gpu_slot
        for g in gpus:
            slot[g] = i
        self._alloc[i] = gpus
        self._free -= len(gpus)
        penalty = self.config.restart_penalty_s if self._preempted[i] else 0.0
        self._penalty[i] = penalty
        self._start[i] = now
        if self._first_start[i] == _INF:
            self._first_start[i] = now
        self._running[i] = job.__dict__
        self._running_now = None
        finish = now + penalty + (self._duration[i] - self._progress_s[i])
        heapq.heappush(self._completions, (finish, i, self._epoch[i]))

    def _stop(self, i: int) -> None:
        now = self._now
        ran = now - self._start.item(i)
        self._progress_s[i] = min(
            self._duration[i], self._progress_s[i] + max(0.0, ran - self._penalty[i])
        )
        attained = self._attained.item(i) + ran * self._gpus[i]
        self._attained[i] = attained
        self._since[i] = now
        self._epoch[i] += 1
        self._preempted[i] += 1
        self.preemptions += 1
        self._release(i)
        job = _new(Job)
        job.__dict__.update(self._running.pop(i))
        self._running_now = None
        self._enqueue(i, _with_attained(job, attained, queued_since=now))
        if self.config.record_placements:
            self.preempted.append((now, self._ids[i]))

    def _key(self, i: int) -> tuple[int, float, str, int]:
        return (-self._priority[i], self._submit[i], self._ids[i], i)

    def _enqueue(self, i: int, job: Job) -> None:
        self._waiting_now = None
        self._queue_version += 1
        self._pending[i] = job
        key, keys = self._key(i), self._queue_keys
        if not keys or keys[-1] < key:  # arrivals in submit order: the common case
            keys.append(key)
            self._queue.append(job)
            self._queue_index.append(i)
        else:
            at = bisect.bisect_left(keys, key)
            keys.insert(at, key)
            self._queue.insert(at, job)
            self._queue_index.insert(at, i)

    def _dequeue(self, i: int) -> Job:
        self._waiting_now = None
        self._queue_version += 1
        at = bisect.bisect_left(self._queue_keys, self._key(i))
        del self._queue_keys[at]
        del self._queue[at]
        del self._queue_index[at]
        return self._pending.pop(i)

    def _release(self, i: int) -> None:
        slot = self._gpu_slot
        for g in self._alloc[i]:
            slot[g] = -1
        self._free += len(self._alloc[i])
        self._alloc[i] = []

    def _sample(self) -> None:
        self._t_sample.append(self._now)
        self._busy_sample.append(self.cluster.num_gpus - self._free)
        self._queue_sample.append(len(self._pending))

    # -- the state a policy sees -------------------------------------------------------------

    def _columns(
        self, rows: npt.NDArray[np.int64], attained: npt.NDArray[np.float64]
    ) -> JobColumns:
        return JobColumns(
            self._id_col[rows],
            self._priority_col[rows],
            self._gpus_col[rows],
            self._submit_col[rows],
            attained,
            self._since[rows],
            self._hint_col[rows],
        )

    def _waiting(self) -> JobQueue:
        # Many requests follow a completion only: the same queue as last time, reused. It is
        # handed over as a view of self._queue (no copy per decision), valid until it changes.
        if self._waiting_now is None:
            version = self._queue_version

            def current() -> bool:
                return self._queue_version == version

            def columns(queue: JobQueue) -> JobColumns:
                # Gathered from the simulator's columns (read while the view is current, so
                # every waiting job's attained service is what it had when it stopped).
                rows = self._queue_index
                at = np.fromiter(rows, dtype=np.int64, count=len(rows))
                return self._columns(at, self._attained[at])

            self._waiting_now = JobQueue.view(self._queue, current, columns)
        return self._waiting_now

    def _running_set(self) -> _RunningSet:
        # Rebuilt only after a job started or stopped (arrivals do not change it).
        if self._running_now is None:
            rows = np.fromiter(self._running, dtype=np.int64, count=len(self._running))
            remap = self._remap
            remap[rows] = np.arange(len(rows), dtype=np.int32)
            gpu_job = remap[self._gpu_slot]
            remap[rows] = -1
            self._running_now = _RunningSet(
                self._columns(rows, self._attained[rows]),
                self._start[rows],
                list(self._running.values()),
                gpu_job,
            )
        return self._running_now

    def _state(self) -> ClusterState:
        now = self._now
        jobs = self._running_set()
        before = jobs.columns
        # The same float operations, per job, as attained + (now - start) * gpus.
        attained = before.attained_service_s + (now - jobs.start) * before.gpus
        columns = dataclasses.replace(before, attained_service_s=attained)
        fields = jobs.fields

        def running() -> tuple[Job, ...]:
            # Only when the policy reads the Job values: a snapshot, so a state read after
            # the simulation moved on still shows the jobs as they were at ``now``.
            out = []
            new = _new
            for own, served in zip(fields, attained.tolist(), strict=True):
                job = new(Job)
                values = job.__dict__
                values.update(own)
                values["attained_service_s"] = served
                out.append(job)
            return tuple(out)

        gpu_job = jobs.gpu_job
        if self._layout is None:
            # The first state goes through ClusterState's checks (hosts, unique GPUs, job
            # indices). Later ones share the same host/index columns and take gpu_job from
            # remap, which only holds -1 or positions in ``running``: skipping the checks
            # (a unique() over every GPU, ~0.3 ms) keeps a request at a few microseconds.
            first = ClusterState(
                now,
                self._hosts,
                self._gpu_host,
                self._gpu_index,
                gpu_job,
                self._gpu_util,
                running(),
            )
            # The derived layout of the shared columns, computed once and seeded into
            # every later state instead of once per request.
            self._layout = {
                "host_offsets": first.host_offsets,
                "host_capacity": first.host_capacity,
            }
            first.__dict__["running_columns"] = columns
            return first
        return ClusterState.unchecked(
            now,
            self._hosts,
            self._gpu_host,
            self._gpu_index,
            gpu_job,
            self._gpu_util,
            columns,
            running,
            self._layout,
        )


@dataclass(frozen=True, eq=False)
class _RunningSet:
    """What the requests' states share while no job starts or stops."""

    columns: JobColumns
    """The running jobs (in ``Simulation._running`` order), attained service as of their
    start."""
    start: npt.NDArray[np.float64]
    """When each started."""
    fields: list[dict[str, object]]
    """Each one's ``Job`` fields as of its start."""
    gpu_job: npt.NDArray[np.int32]
    """``ClusterState.gpu_job``."""


def _with_attained(job: Job, attained: float, queued_since: float | None = None) -> Job:
    """``dataclasses.replace(job, attained_service_s=...)`` without its per-field overhead
    (~5x faster)."""
    new = _new(Job)
    fields = new.__dict__
    fields.update(job.__dict__)
    fields["attained_service_s"] = attained
    if queued_since is not None:
        fields["queued_since_s"] = queued_since
    return new


_new = object.__new__
