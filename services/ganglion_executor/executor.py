"""The executor's core: the GPU table, plans, job lifecycles and restart reconciliation.

Invariant: a GPU is held by at most one live job. The table is rebuilt from the ledger (and
from ``/proc``) by :meth:`Executor.recover` before any request is served, and every allocation
is durable in the ledger before its process starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from ganglion.domain import JobState
from ganglion.gpus import GpuInventory
from ganglion_executor import processes
from ganglion_executor.errors import (
    GpuBusyError,
    InvalidArgumentError,
    JobNotFoundError,
    StaleGenerationError,
)
from ganglion_executor.ledger import (
    AllocatedRecord,
    FinishedRecord,
    GenerationRecord,
    JobHistory,
    Ledger,
    Replay,
    StartedRecord,
    fsync_dir,
)
from ganglion_executor.model import ApplyResult, Assignment, EventSink, ExecutorStatus, JobView

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

LOST_MESSAGE = "lost while the executor was down (no exit file)"


class _Job:
    """Mutable runtime state of one job; only :class:`Executor` touches it."""

    def __init__(self, alloc: AllocatedRecord, log_path: Path, exit_path: Path) -> None:
        self.alloc = alloc
        self.log_path = log_path
        self.exit_path = exit_path
        self.state = JobState.SCHEDULED
        self.pid = 0
        self.start_ticks = 0
        self.start_time_s = 0.0
        self.end_time_s = 0.0
        self.exit_code = 0
        self.message = ""
        self.process: processes.JobProcess | None = None
        self.preempting = False
        self.stopping: asyncio.Task[None] | None = None
        """SIGTERM, grace, SIGKILL: a task of its own, so it goes on when the caller that asked
        for it goes away (a controller that dies mid-Preempt cancels its call)."""
        self.watcher: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    @property
    def live(self) -> bool:
        return not self.done.is_set()

    def view(self) -> JobView:
        return JobView(
            job_id=self.alloc.job_id,
            state=self.state,
            gpu_indices=self.alloc.gpu_indices,
            pid=self.pid,
            exit_code=self.exit_code,
            start_time_s=self.start_time_s,
            end_time_s=self.end_time_s,
            log_path=str(self.log_path),
            message=self.message,
        )


def _check_text(field: str, value: str) -> None:
    if "\0" in value:
        raise InvalidArgumentError(field, "must not contain NUL characters")


class Executor:
    """Applies plans on one host; see the module docstring for the invariant it keeps."""

    def __init__(
        self,
        host: str,
        inventory: GpuInventory,
        state_dir: Path,
        ledger: Ledger,
        events: EventSink,
        *,
        grace_s: float = 5.0,
        poll_s: float = 0.2,
        republish_window_s: float = 120.0,
    ) -> None:
        self.host = host
        self.inventory = inventory
        self._ledger = ledger
        self._events = events
        self._grace_s = grace_s
        self._poll_s = poll_s
        self._republish_window_s = republish_window_s
        self.job_env: dict[str, str] = {}
        """Extra environment for every job of this host (e.g. where the data cache is)."""
        self._logs_dir = state_dir / "logs"
        self._exit_dir = state_dir / "exit"
        for d in (self._logs_dir, self._exit_dir):
            if not d.is_dir():
                d.mkdir(parents=True)
                fsync_dir(state_dir)  # the wrapper fsyncs exit files into a durable directory
        self._generation = 0
        self._jobs: dict[str, _Job] = {}
        self._holder: dict[int, str] = {}
        self._lock = asyncio.Lock()

    # --- restart reconciliation ---------------------------------------------------------

    async def recover(self, replay: Replay) -> None:
        """Rebuild jobs and the GPU table from the ledger; re-adopt jobs that still run."""
        self._generation = replay.generation
        now = time.time()
        for job_id, hist in replay.jobs.items():
            job = self._new_job(hist.allocated)
            if hist.started is not None:
                job.pid, job.start_ticks = hist.started.pid, hist.started.start_ticks
                job.start_time_s = hist.started.time_s
            if hist.finished is not None:
                self._restore_finished(job, hist.finished)
                if now - hist.finished.time_s < self._republish_window_s:
                    self._events.publish(job.view())  # its event may have died with the old process
                continue
            self._hold(job)
            proc = await self._find_process(job, hist)
            if proc is not None:
                job.process = proc
                job.state = JobState.RUNNING
                job.pid, job.start_ticks = proc.pid, proc.start_ticks
                job.start_time_s = job.start_time_s or now
                job.watcher = asyncio.create_task(self._watch(job), name=f"watch-{job_id}")
                log.info("re-adopted running job", extra={"job_id": job_id, "pid": proc.pid})
                self._events.publish(job.view())
                continue
            # The wrapper is gone, and with the executor down nothing swept its group: kill
            # what the job left running before its GPUs are freed for the next one.
            leftovers = processes.kill_leftovers(job.alloc.job_id, self.host)
            if leftovers:
                log.warning(
                    "killed processes a lost job left running",
                    extra={"job_id": job_id, "processes": leftovers},
                )
            status = processes.read_exit_file(job.exit_path)
            if status is None:
                await self._finish(job, JobState.FAILED, processes.EXIT_UNKNOWN, LOST_MESSAGE, now)
            else:
                state = JobState.SUCCEEDED if status.exit_code == 0 else JobState.FAILED
                await self._finish(job, state, status.exit_code, status.message, status.time_s)
            log.info(
                "job ended while the executor was down",
                extra={"job_id": job_id, "state": job.state.name},
            )

    def _restore_finished(self, job: _Job, rec: FinishedRecord) -> None:
        job.state, job.exit_code, job.message = rec.state, rec.exit_code, rec.message
        job.end_time_s = rec.time_s
        job.done.set()

    async def _find_process(self, job: _Job, hist: JobHistory) -> processes.JobProcess | None:
        if hist.started is not None:
            return processes.adopt(
                hist.started.pid, hist.started.start_ticks, job.exit_path, self._poll_s
            )
        # Allocated but no pid recorded: the old executor may have died just after the start.
        found = processes.find_wrapper(job.alloc.job_id, self.host)
        if found is None:
            return None
        pid, ticks = found
        await self._ledger.append_async(StartedRecord(job.alloc.job_id, pid, ticks, time.time()))
        return processes.adopt(pid, ticks, job.exit_path, self._poll_s)

    # --- plans --------------------------------------------------------------------------

    async def apply(
        self, host: str, generation: int, assignments: Sequence[Assignment]
    ) -> ApplyResult:
        """Apply a plan: validated as a whole, then each new job allocated, recorded, started."""
        if host != self.host:
            raise InvalidArgumentError("host", f"is {host!r} but this executor runs {self.host!r}")
        if generation < 1:
            raise InvalidArgumentError("generation", f"must be >= 1, got {generation}")
        async with self._lock:
            if generation < self._generation:
                raise StaleGenerationError(generation, self._generation)
            if generation == self._generation:
                known = tuple(a.job.id for a in assignments if a.job.id in self._jobs)
                return ApplyResult(generation, (), known)
            new = self._validate(assignments)
            known = tuple(a.job.id for a in assignments if a.job.id in self._jobs)
            for a in new:
                await self._start(a)
            # Recorded last: after a crash mid-plan the controller's resend of this generation
            # is applied again, finding the jobs already allocated as known.
            await self._ledger.append_async(GenerationRecord(generation, time.time()))
            self._generation = generation
            return ApplyResult(generation, tuple(a.job.id for a in new), known)

    def _validate(self, assignments: Sequence[Assignment]) -> list[Assignment]:
        """The plan's new jobs; raises before anything is acted on if any part is bad."""
        seen: set[str] = set()
        new: list[Assignment] = []
        count = self.inventory.count
        for i, a in enumerate(assignments):
            f = f"assignments[{i}]"
            job_id = a.job.id
            if not job_id:
                raise InvalidArgumentError(f"{f}.job.id", "must not be empty")
            if "/" in job_id or "\0" in job_id or job_id.startswith("."):
                raise InvalidArgumentError(
                    f"{f}.job.id", f"{job_id!r} must not contain '/' or NUL or start with '.'"
                )
            if job_id in seen:
                raise InvalidArgumentError(
                    f"{f}.job.id", f"job {job_id!r} appears twice in the plan"
                )
            seen.add(job_id)
            if job_id in self._jobs:
                continue
            gpus = a.gpu_indices
            if not gpus:
                raise InvalidArgumentError(f"{f}.gpu_indices", "must not be empty")
            if len(set(gpus)) != len(gpus):
                raise InvalidArgumentError(f"{f}.gpu_indices", f"duplicate GPU in {list(gpus)}")
            for g in gpus:
                if not 0 <= g < count:
                    raise InvalidArgumentError(
                        f"{f}.gpu_indices",
                        f"GPU {g} out of range: host {self.host} has {count} GPUs",
                    )
            if not a.job.command or not a.job.command[0]:
                raise InvalidArgumentError(f"{f}.job.command", "must not be empty")
            for arg in a.job.command:
                _check_text(f"{f}.job.command", arg)
            for k, v in a.job.env.items():
                if not k or "=" in k:
                    raise InvalidArgumentError(f"{f}.job.env", f"bad variable name {k!r}")
                _check_text(f"{f}.job.env", k + v)
            new.append(a)
        # Conflicts after the field checks, so a malformed plan is always INVALID_ARGUMENT.
        claimed: dict[int, str] = {}
        for a in new:
            for g in a.gpu_indices:
                holder = self._holder.get(g) or claimed.get(g)
                if holder is not None:
                    raise GpuBusyError(g, holder, a.job.id)
                claimed[g] = a.job.id
        return new

    def _new_job(self, alloc: AllocatedRecord) -> _Job:
        job = _Job(alloc, self._logs_dir / f"{alloc.job_id}.log", self._exit_dir / alloc.job_id)
        self._jobs[alloc.job_id] = job
        return job

    def _hold(self, job: _Job) -> None:
        for g in job.alloc.gpu_indices:
            holder = self._holder.setdefault(g, job.alloc.job_id)
            if holder != job.alloc.job_id:  # only a corrupted ledger gets here
                raise RuntimeError(
                    f"GPU {g} would be held by both {holder!r} and {job.alloc.job_id!r}"
                )

    async def _start(self, a: Assignment) -> None:
        alloc = AllocatedRecord(
            job_id=a.job.id,
            gpu_indices=a.gpu_indices,
            command=a.job.command,
            env=dict(a.job.env),
            tenant=a.job.tenant,
            time_s=time.time(),
        )
        await self._ledger.append_async(alloc)  # durable before the process exists
        job = self._new_job(alloc)
        self._hold(job)
        spec = processes.LaunchSpec(
            job_id=alloc.job_id,
            host=self.host,
            command=alloc.command,
            env={**self.job_env, **alloc.env, "GANGLION_TENANT": alloc.tenant},
            visible_devices=self.inventory.visible_devices(alloc.gpu_indices),
            log_path=job.log_path,
            exit_path=job.exit_path,
        )
        attributes: dict[str, AttributeValue] = {
            "ganglion.job_id": alloc.job_id,
            "ganglion.gpu_indices": list(alloc.gpu_indices),
        }
        with tracer.start_as_current_span("executor.start_process", attributes=attributes) as span:
            try:
                proc = processes.spawn(spec, self._poll_s)
            except processes.SpawnError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.message))
                log.warning("job could not start: %s", exc.message, extra={"job_id": alloc.job_id})
                await self._finish(job, JobState.FAILED, exc.exit_code, exc.message, time.time())
                return
            span.set_attribute("process.pid", proc.pid)
            job.process, job.pid, job.start_ticks = proc, proc.pid, proc.start_ticks
            job.state, job.start_time_s = JobState.RUNNING, time.time()
            log.info(
                "job started",
                extra={"job_id": alloc.job_id, "pid": proc.pid, "gpus": list(alloc.gpu_indices)},
            )
            try:
                await self._ledger.append_async(
                    StartedRecord(alloc.job_id, proc.pid, proc.start_ticks, job.start_time_s)
                )
                # Inside the span, so the RUNNING event carries its traceparent.
                self._events.publish(job.view())
            finally:
                job.watcher = asyncio.create_task(self._watch(job), name=f"watch-{alloc.job_id}")

    async def _watch(self, job: _Job) -> None:
        assert job.process is not None
        status = await job.process.watch()
        if job.preempting:
            state = JobState.PREEMPTED
        elif status.exit_code == 0:
            state = JobState.SUCCEEDED
        else:
            state = JobState.FAILED
        await self._finish(job, state, status.exit_code, status.message, status.time_s)

    async def _finish(
        self, job: _Job, state: JobState, exit_code: int, message: str, time_s: float
    ) -> None:
        job.state, job.exit_code, job.message, job.end_time_s = state, exit_code, message, time_s
        rec = FinishedRecord(job.alloc.job_id, state, exit_code, time_s, message)
        try:
            await self._ledger.append_async(rec)
        except OSError:
            # The GPUs are free whatever the ledger says; a restart re-derives the end from /proc
            # and the exit file.
            log.exception("could not record the end of job %s", job.alloc.job_id)
        for g in job.alloc.gpu_indices:
            if self._holder.get(g) == job.alloc.job_id:
                del self._holder[g]
        job.done.set()
        log.info(
            "job ended",
            extra={"job_id": job.alloc.job_id, "state": state.name, "exit_code": exit_code},
        )
        self._events.publish(job.view())

    # --- queries and preemption ---------------------------------------------------------

    def status(self) -> ExecutorStatus:
        return ExecutorStatus(
            host=self.host,
            generation=self._generation,
            gpu_count=self.inventory.count,
            jobs=tuple(j.view() for j in self._jobs.values()),
        )

    async def preempt(self, job_id: str, grace_s: float | None = None) -> JobView:
        """Stop a job (SIGTERM, SIGKILL after the grace); a finished job is returned unchanged."""
        if not job_id:
            raise InvalidArgumentError("job_id", "must not be empty")
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        if grace_s is not None and not grace_s >= 0:
            raise InvalidArgumentError("grace_s", f"must be >= 0, got {grace_s}")
        if not job.live or job.process is None:
            return job.view()
        job.preempting = True
        if job.stopping is None:  # a repeated Preempt waits for the stop under way
            log.info("preempting job", extra={"job_id": job_id, "pid": job.pid})
            job.stopping = asyncio.create_task(
                job.process.terminate(self._grace_s if grace_s is None else grace_s),
                name=f"stop-{job_id}",
            )
        await asyncio.shield(job.stopping)
        await job.done.wait()
        return job.view()

    async def close(self, *, stop_jobs: bool) -> None:
        """Stop watching; with ``stop_jobs`` preempt every live job first, else leave them running."""
        live = [j for j in self._jobs.values() if j.live and j.process is not None]
        if stop_jobs and live:
            await asyncio.gather(*(self.preempt(j.alloc.job_id) for j in live))
        elif live:
            log.info(
                "leaving jobs running for the next executor to adopt", extra={"count": len(live)}
            )
        for job in self._jobs.values():
            for task in (job.stopping, job.watcher):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
