"""The sense -> decide -> act loop: cluster state from hosts and jobs, a decision with a
deadline (falling back to a built-in heuristic), plans to the executors.

Preemptive policies (the LAS family, ``rl``) also name running jobs to stop and a time to be
asked again (``Decision.preemptions`` / ``next_decision_s``). The loop records each preemption
before acting, stops the run on its executors in the background, and queues the job again once
every host reports it stopped (:mod:`ganglion_controller.jobs`); placements onto GPUs still
being freed wait for the next round. When the cluster is full it asks again only at the
policy's ``next_decision_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Link

from ganglion import rpc
from ganglion.convert import decision_from_proto, job_to_proto, state_to_proto
from ganglion.domain import (
    ClusterState,
    Decision,
    Job,
    JobQueue,
    JobState,
    Placement,
    Segment,
)
from ganglion.observability import extract_context
from ganglion.policies import FreeMap, Policy, create
from ganglion.v1 import (
    cluster_pb2,
    decision_pb2,
    decision_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
)
from ganglion_controller.config import ControllerConfig
from ganglion_controller.hosts import HostDirectory, HostView
from ganglion_controller.jobs import JobNotFound, JobRecord, JobTable, parse_run_id

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ganglion.controller")

APPLY_RETRY_S = 0.5
"""How long a host whose Apply failed is left out of placement (doubling per failure)."""
APPLY_RETRY_MAX_S = 10.0
"""The longest such wait."""


@dataclass
class LoopStats:
    decisions: int = 0
    fallbacks: int = 0
    jobs_placed: int = 0
    rounds: int = 0
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.latencies_ms: deque[float] = deque(maxlen=100_000)

    def percentile_ms(self, q: float) -> float:
        return (
            float(np.percentile(np.fromiter(self.latencies_ms, float), q))
            if self.latencies_ms
            else 0.0
        )


class _Executor:
    def __init__(self, view: HostView) -> None:
        self.address = view.address
        self.channel = rpc.channel(view.address)
        self.stub = executor_pb2_grpc.ExecutorServiceStub(self.channel)
        self.generation = 0
        self.synced = False


class SchedulingLoop:
    def __init__(self, config: ControllerConfig, jobs: JobTable, hosts: HostDirectory) -> None:
        self._config = config
        self._jobs = jobs
        self._hosts = hosts
        self._fallback: Policy = create(config.fallback_policy)
        self._executors: dict[str, _Executor] = {}
        self._decision_channel = rpc.channel(config.decision_addr) if config.decision_addr else None
        self._decision = (
            decision_pb2_grpc.DecisionServiceStub(self._decision_channel)
            if self._decision_channel
            else None
        )
        self.stats = LoopStats()
        self._next_decision_at: float | None = None
        """Wall time at which the last decision asked to be asked again (None: never)."""
        self._stopping: dict[str, asyncio.Task[None]] = {}
        """Background Preempt calls by run id."""
        self._held_off: dict[str, tuple[float, float]] = {}
        """Hosts whose last Apply failed: (monotonic time they may be tried again, the wait).
        Rounds leave them out until then: a failed Apply requeues its job, which wakes the
        loop at once, and without a wait it placed the job on the same host again, writing
        a placed and a requeued record each time, hundreds a second."""

    def _wait_s(self) -> float:
        if self._next_decision_at is None:
            return self._config.interval_s
        return min(self._config.interval_s, max(0.0, self._next_decision_at - time.time()))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waits = [
                asyncio.ensure_future(e.wait())
                for e in (self._jobs.changed, self._hosts.changed, stop)
            ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), self._wait_s()
                )
            for w in waits:
                w.cancel()
            jobs_changed = self._jobs.changed.is_set()
            self._jobs.changed.clear()
            self._hosts.changed.clear()
            if stop.is_set():
                break
            try:
                await self.round(jobs_changed)
            except Exception:
                log.exception("scheduling round failed; retrying next round")

    async def close(self) -> None:
        for task in self._stopping.values():
            task.cancel()
        await asyncio.gather(*self._stopping.values(), return_exceptions=True)
        for ex in self._executors.values():
            await ex.channel.close()
        if self._decision_channel is not None:
            await self._decision_channel.close()

    # --- one round --------------------------------------------------------------------------

    def cluster_state(self, live: dict[str, HostView]) -> ClusterState:
        now = time.time()
        active = [r for r in self._jobs.active() if all(s.host in live for s in r.segments)]
        running = [
            Job(
                id=r.job.id,
                tenant=r.job.tenant,
                gpus=r.job.gpus,
                submit_time_s=r.job.submit_time_s,
                priority=r.job.priority,
                attained_service_s=r.attained_service_s(now),
            )
            for r in active
        ]
        host_gpus = {h: v.gpu_count for h, v in live.items()}
        return ClusterState.build(
            now_s=now,
            host_gpus=host_gpus,
            allocations={r.job.id: r.segments for r in active},
            running=running,
            # One concatenation of the directory's per-host arrays, not a loop per GPU.
            gpu_utilization=self._hosts.utilization_column(host_gpus),
        )

    async def round(self, jobs_changed: bool = True) -> None:
        """One sense -> decide -> act pass. ``jobs_changed``: a job arrived or ended since the
        last round (a preemptive policy may then act even on a full cluster)."""
        # A deadline the last decision asked for counts once: past it, this round decides
        # (if anything waits) and the next decision sets a new one; never a spinning wait.
        due = self._next_decision_at is not None and time.time() >= self._next_decision_at
        if due:
            self._next_decision_at = None
        await self._jobs.requeue_preempted()
        live = self._hosts.live()
        await self._sync_executors(live)
        self._stop_preempted(live)
        pending = self._jobs.queued()
        self._jobs.note_unfit(pending, sum(v.gpu_count for v in live.values()))
        held = self._held_off_until(time.monotonic())
        placeable = {h: v for h, v in live.items() if h not in held}
        if not pending or not placeable:
            return
        self.stats.rounds += 1
        state = self.cluster_state(placeable)
        if not (state.gpu_job < 0).any() and not (jobs_changed or due):
            # Full, and nothing new: only a policy that asked to be asked again could act.
            return
        parent = extract_context(pending[0].trace_headers)
        contexts = (
            trace.get_current_span(extract_context(r.trace_headers)).get_span_context()
            for r in pending[1:16]
        )
        links = [Link(c) for c in contexts if c.is_valid]
        with tracer.start_as_current_span(
            "controller.schedule", context=parent, links=links
        ) as span:
            span.set_attribute("ganglion.pending", len(pending))
            queue = JobQueue.trusted(r.job for r in pending)  # queued() sorts by queue_key
            decision, decided_by = await self._decide(state, queue)
            span.set_attribute("ganglion.decided_by", decided_by)
        self._next_decision_at = decision.next_decision_s
        if decision.preemptions:
            await self._preempt_for_policy(decision.preemptions, decided_by)
            self._stop_preempted(live)
        accepted = self._check(state, decision.placements, {r.job.id: r.job.gpus for r in pending})
        if accepted:
            await self._act(accepted, decided_by)

    async def _decide(self, state: ClusterState, pending: Sequence[Job]) -> tuple[Decision, str]:
        if self._decision is not None:
            request = decision_pb2.ScheduleRequest(
                cluster=state_to_proto(state),
                pending=[job_to_proto(j) for j in pending],
                policy=self._config.policy,
            )
            t0 = time.perf_counter()
            try:
                response = await self._decision.Schedule(request, timeout=self._config.deadline_s)
            except grpc.aio.AioRpcError as exc:
                self.stats.fallbacks += 1
                log.warning(
                    "decision service failed (%s): deciding with fallback %s",
                    exc.code().name,
                    self._fallback.name,
                    extra={"fallbacks": self.stats.fallbacks},
                )
            else:
                self.stats.latencies_ms.append((time.perf_counter() - t0) * 1000)
                self.stats.decisions += 1
                decision = decision_from_proto(response)
                return decision, f"{decision.policy}:{decision.version}"
        else:
            self.stats.fallbacks += 1
        decision = self._fallback.schedule(state, pending)
        return decision, f"fallback:{decision.policy}:{decision.version}"

    def _check(
        self, state: ClusterState, placements: Sequence[Placement], pending_gpus: dict[str, int]
    ) -> list[Placement]:
        freeing = {
            (seg.host, g)
            for r in self._jobs.preempting()
            for seg in r.segments
            for g in seg.gpu_indices
        }
        return check_placements(state, placements, pending_gpus, freeing)

    async def _act(self, placements: list[Placement], decided_by: str) -> None:
        by_host: dict[str, list[tuple[JobRecord, Segment]]] = {}
        for p in placements:
            await self._jobs.mark_placed(p.job_id, p.segments, decided_by)
            record = self._jobs.get(p.job_id)
            if record.state is not JobState.SCHEDULED or record.segments != p.segments:
                # Cancelled while the round decided: the placement was not taken, so nothing
                # may start (a cancel that lands during the write is caught by _apply).
                log.info("placement dropped: the job changed meanwhile", extra={"job": p.job_id})
                continue
            self.stats.jobs_placed += 1
            for seg in p.segments:
                by_host.setdefault(seg.host, []).append((record, seg))
        results = await asyncio.gather(*(self._apply(h, items) for h, items in by_host.items()))
        failed_jobs = {
            r.job.id
            for ok, items in zip(results, by_host.values(), strict=True)
            if not ok
            for r, _ in items
        }
        for job_id in failed_jobs:
            await self._undo(job_id, "apply failed; requeued")

    async def _apply(self, host: str, items: list[tuple[JobRecord, Segment]]) -> bool:
        # A job cancelled since it was placed (during the placement's write, or before a
        # restarted controller re-sends it) is not started: it ends CANCELLED here.
        for record in {id(r): r for r, _ in items if r.cancel_requested}.values():
            if not record.state.terminal:
                await self._jobs.requeue(record.job.id, "cancelled before it started")
        items = [(r, seg) for r, seg in items if not r.cancel_requested]
        if not items:
            return True
        ex = self._executors.get(host)
        if ex is None:
            return False
        first = items[0][0]
        parent = extract_context(first.trace_headers)
        with tracer.start_as_current_span("controller.apply", context=parent) as span:
            span.set_attribute("ganglion.host", host)
            span.set_attribute("ganglion.jobs", [r.job.id for r, _ in items])
            assignments = [
                executor_pb2.Assignment(job=self._run_proto(r), gpu_indices=list(seg.gpu_indices))
                for r, seg in items
            ]
            for attempt in range(2):
                ex.generation += 1
                request = executor_pb2.ApplyRequest(
                    host=host, generation=ex.generation, assignments=assignments
                )
                try:
                    await ex.stub.Apply(request, timeout=self._config.apply_timeout_s)
                    self._held_off.pop(host, None)
                    return True
                except grpc.aio.AioRpcError as exc:
                    if (
                        exc.code() is grpc.StatusCode.FAILED_PRECONDITION
                        and attempt == 0
                        and "generation" in (exc.details() or "")
                    ):
                        await self._sync_generation(ex)
                        continue
                    wait = self._hold_off(host)
                    log.warning(
                        "apply to %s failed: %s %s; not placing there for %.1f s",
                        host,
                        exc.code().name,
                        exc.details(),
                        wait,
                    )
                    return False
        return False

    def _held_off_until(self, now: float) -> set[str]:
        """Hosts still left out of placement at monotonic time ``now``."""
        return {h for h, (until, _) in self._held_off.items() if until > now}

    def _hold_off(self, host: str) -> float:
        """Leave ``host`` out of the next rounds: APPLY_RETRY_S, doubling per failure in a
        row up to APPLY_RETRY_MAX_S. Returns the wait."""
        _, last = self._held_off.get(host, (0.0, 0.0))
        wait = min(max(2.0 * last, APPLY_RETRY_S), APPLY_RETRY_MAX_S)
        self._held_off[host] = (time.monotonic() + wait, wait)
        return wait

    @staticmethod
    def _run_proto(record: JobRecord) -> cluster_pb2.Job:
        """The job as its executors see it: named by its run id (see ``jobs.run_id``)."""
        msg = job_to_proto(record.job)
        msg.id = record.run_id
        return msg

    async def _undo(self, job_id: str, reason: str) -> None:
        record = self._jobs.get(job_id)
        for seg in record.segments:
            ex = self._executors.get(seg.host)
            if ex is not None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await ex.stub.Preempt(
                        executor_pb2.PreemptRequest(job_id=record.run_id),
                        timeout=self._config.apply_timeout_s,
                    )
        if record.state is JobState.SCHEDULED:
            await self._jobs.requeue(job_id, reason)
        elif record.state is JobState.RUNNING:
            # It started after all: stop it as a preemption, durably, so it is queued again
            # (as its next attempt) once it has stopped, and asked to stop every round until
            # then. As a plain stop it ended PREEMPTED for good.
            await self._jobs.request_preemption(job_id, reason)

    async def preempt(self, record: JobRecord) -> None:
        """Stop a scheduled or running job on every host it holds (Cancel)."""
        for seg in record.segments:
            ex = self._executors.get(seg.host)
            if ex is None:
                continue
            try:
                await ex.stub.Preempt(
                    executor_pb2.PreemptRequest(job_id=record.run_id),
                    timeout=self._config.apply_timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "preempt of %s on %s failed: %s", record.run_id, seg.host, exc.code().name
                )

    # --- preemption asked by a policy -----------------------------------------------------------

    async def _preempt_for_policy(self, job_ids: Sequence[str], decided_by: str) -> None:
        """Record each valid preemption (durably, before acting); unknown ids, jobs that hold
        no GPUs and jobs already stopping are skipped: a policy's view may be a round old."""
        for job_id in job_ids:
            try:
                recorded = await self._jobs.request_preemption(job_id, f"preempted by {decided_by}")
            except JobNotFound:
                recorded = False
            if recorded:
                self.stats.preemptions += 1
                log.info("preempting for the policy", extra={"job": job_id, "by": decided_by})
            else:
                log.debug("ignored a preemption of %s", job_id)

    def _stop_preempted(self, live: dict[str, HostView]) -> None:
        """Start a Preempt call for every run that must stop (a policy's preemption or a
        Cancel) and has none in flight: again each round until it has stopped, so an executor
        that was down when the job was cancelled, or a controller restart, loses no stop
        (the intent is durable and Preempt idempotent)."""
        for record in self._jobs.stopping():
            rid = record.run_id
            if rid in self._stopping or not all(s.host in live for s in record.segments):
                continue
            task = asyncio.create_task(self._stop_run(rid, record.segments), name=f"stop-{rid}")
            self._stopping[rid] = task
            task.add_done_callback(functools.partial(self._stopped, rid))

    def _stopped(self, rid: str, _task: asyncio.Task[None]) -> None:
        self._stopping.pop(rid, None)

    async def _stop_run(self, rid: str, segments: tuple[Segment, ...]) -> None:
        unknown = 0
        for seg in segments:
            ex = self._executors.get(seg.host)
            if ex is None:
                continue
            try:
                # The executor answers once the run has stopped (its grace period, then
                # SIGKILL); the ended run's event then requeues the job.
                await ex.stub.Preempt(executor_pb2.PreemptRequest(job_id=rid), timeout=120.0)
            except grpc.aio.AioRpcError as exc:
                unknown += exc.code() is grpc.StatusCode.NOT_FOUND
                log.warning("preempt of %s on %s failed: %s", rid, seg.host, exc.code().name)
        job_id, attempt = parse_run_id(rid)
        record = self._jobs.get(job_id)
        if unknown == len(segments) and record.attempt == attempt and record.holds_gpus:
            # No host has this run (never sent, or an executor that lost its state): nothing
            # is left to stop, so instead of asking again every round, a cancelled job ends
            # CANCELLED and a preempted one is queued again as its next attempt.
            await self._jobs.requeue(job_id, "stopped; no executor has the run")

    # --- executors ----------------------------------------------------------------------------

    async def _sync_executors(self, live: dict[str, HostView]) -> None:
        for host, view in live.items():
            ex = self._executors.get(host)
            if ex is None or ex.address != view.address:
                if ex is not None:
                    await ex.channel.close()
                ex = self._executors[host] = _Executor(view)
            if not ex.synced:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self._reapply_unknown(host, ex)
                    ex.synced = True

    async def _sync_generation(self, ex: _Executor) -> executor_pb2.StatusResponse:
        status = await ex.stub.Status(
            executor_pb2.StatusRequest(), timeout=self._config.apply_timeout_s
        )
        ex.generation = max(ex.generation, status.generation)
        return status

    async def _reapply_unknown(self, host: str, ex: _Executor) -> None:
        """After a controller restart: jobs placed on this host that its executor never
        received (the controller died between recording and sending) are sent again."""
        status = await self._sync_generation(ex)
        known = {j.job_id for j in status.jobs}
        missing = [
            (r, seg)
            for r in self._jobs.active()
            if r.state is JobState.SCHEDULED and r.run_id not in known
            for seg in r.segments
            if seg.host == host
        ]
        if missing and not await self._apply(host, missing):
            for r, _ in missing:
                await self._undo(r.job.id, "re-apply after restart failed; requeued")


def check_placements(
    state: ClusterState,
    placements: Sequence[Placement],
    pending_gpus: Mapping[str, int],
    freeing: AbstractSet[tuple[str, int]] = frozenset(),
) -> list[Placement]:
    """The placements consistent with our own view, in order; a bad decision service must
    never make two jobs share a GPU. Each must be for a pending job (``pending_gpus``: its
    GPU count), give it exactly that many distinct GPUs, on distinct hosts, all free in
    ``state`` and not taken by an earlier placement of the same decision. One onto GPUs of a
    job being preempted (``freeing``: (host, device)) waits for the next round."""
    free = FreeMap.from_state(state)
    accepted: list[Placement] = []
    for p in placements:
        if any((s.host, g) in freeing for s in p.segments for g in s.gpu_indices):
            log.debug("placement waits for preempted GPUs", extra={"job": p.job_id})
            continue
        gpus = sum(len(s.gpu_indices) for s in p.segments)
        ok = (
            gpus == pending_gpus.get(p.job_id)
            and len({s.host for s in p.segments}) == len(p.segments)
            and all(
                free.holds(s) and len(set(s.gpu_indices)) == len(s.gpu_indices) for s in p.segments
            )
        )
        if not ok:
            log.warning(
                "rejected an inconsistent placement",
                extra={"job": p.job_id, "placement": str(p.segments)},
            )
            continue
        free.take(p.segments)
        accepted.append(p)
    return accepted
