"""The durable job table.

Every change the controller makes to a job is first appended to the ``GANGLION_JOBS``
JetStream stream (``submitted``, ``placed``, ``cancelled``, ``requeued``, ``preempting``); job
progress comes from the executors' events on ``GANGLION_EVENTS``. After a restart the table is
rebuilt by replaying both streams, so an acknowledged submission survives a controller or NATS
restart.

A job a policy preempts goes back to the queue and later runs again from the start. Each
placement is a separate *run* on the executors, named by :func:`run_id` (``<id>`` for attempt
0, ``<id>~<attempt>`` after), because an executor treats a job id it knows as already applied;
events of an earlier run are recognised by their name and ignored. The requeue is recorded in
``GANGLION_JOBS`` like any other, so replaying that stream alone gives every job's attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ganglion import bus
from ganglion.convert import job_from_proto, job_to_proto, segments_from_proto, segments_to_proto
from ganglion.domain import Job, JobState, Segment, queue_key
from ganglion.observability import inject_headers
from ganglion.v1 import cluster_pb2, controller_pb2, executor_pb2

log = logging.getLogger(__name__)

SUBMITTED = f"{bus.JOBS_SUBJECT}.submitted"
PLACED = f"{bus.JOBS_SUBJECT}.placed"
CANCELLED = f"{bus.JOBS_SUBJECT}.cancelled"
REQUEUED = f"{bus.JOBS_SUBJECT}.requeued"
PREEMPTING = f"{bus.JOBS_SUBJECT}.preempting"
RUN_SEPARATOR = "~"
"""Separates a job id from its attempt in run ids; submitted job ids may not contain it."""

_Handler = Callable[[Msg], None]
_SEGMENT_DONE = (JobState.SUCCEEDED, JobState.FAILED, JobState.PREEMPTED, JobState.CANCELLED)


def run_id(job_id: str, attempt: int) -> str:
    """The executors' name for attempt ``attempt`` of job ``job_id``."""
    return job_id if attempt == 0 else f"{job_id}{RUN_SEPARATOR}{attempt}"


def parse_run_id(rid: str) -> tuple[str, int]:
    """``(job_id, attempt)`` of a run id (the inverse of :func:`run_id`)."""
    base, sep, n = rid.rpartition(RUN_SEPARATOR)
    if sep and n.isdigit() and not n.startswith("0"):
        return base, int(n)
    return rid, 0


UNFIT = "waiting, does not fit:"
"""Start of the message of a queued job larger than every live host together."""


class JobError(Exception):
    pass


class JobNotFound(JobError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


@dataclass
class JobRecord:
    """The controller's mutable view of one job (never leaves this module as-is)."""

    job: Job
    state: JobState = JobState.QUEUED
    segments: tuple[Segment, ...] = ()
    segment_states: dict[str, JobState] = field(default_factory=dict)
    start_time_s: float = 0.0
    end_time_s: float = 0.0
    exit_code: int = 0
    message: str = ""
    decided_by: str = ""
    cancel_requested: bool = False
    attempt: int = 0
    """Placements since the last preemption requeue; see :func:`run_id`."""
    preempt_requested: bool = False
    """A policy asked to stop the current run (recorded in ``preempting``)."""
    restart_due: bool = False
    """The preempted run has stopped on every host: requeue it (:meth:`JobTable.requeue_preempted`)."""
    trace_headers: dict[str, str] = field(default_factory=dict)
    """W3C trace context of the Submit call, so the job's later spans join its trace."""

    def to_proto(self) -> controller_pb2.JobInfo:
        return controller_pb2.JobInfo(
            job=job_to_proto(self.job),
            state=cluster_pb2.JobState.ValueType(int(self.state)),
            segments=segments_to_proto(self.segments),
            start_time_s=self.start_time_s,
            end_time_s=self.end_time_s,
            exit_code=self.exit_code,
            message=self.message,
            decided_by=self.decided_by,
            attempt=self.attempt,
        )

    @property
    def run_id(self) -> str:
        """This placement's name on the executors."""
        return run_id(self.job.id, self.attempt)

    @property
    def holds_gpus(self) -> bool:
        return self.state in (JobState.SCHEDULED, JobState.RUNNING) and not self.restart_due

    def attained_service_s(self, now: float) -> float:
        """GPU-seconds received: earlier attempts' (in ``job``) plus the current run's."""
        current = 0.0
        if self.state is JobState.RUNNING and self.start_time_s:
            end = self.end_time_s if self.restart_due else now
            current = self.job.gpus * max(0.0, end - self.start_time_s)
        return self.job.attained_service_s + current


class JobTable:
    """In-memory jobs, persisted through JetStream, with change notifications for Watch."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._jobs: dict[str, JobRecord] = {}
        # The jobs not yet ended, kept by _notify (every change goes through it): the loop's
        # reads each round scan these, not every job the controller has ever seen.
        self._open: dict[str, JobRecord] = {}
        self._watchers: list[tuple[str, asyncio.Queue[controller_pb2.JobInfo]]] = []
        self.changed = asyncio.Event()
        """Set when a job is queued or ends: wakes the scheduling loop."""
        self._subs: list[JetStreamContext.PushSubscription] = []

    # --- reads ------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFound(job_id) from None

    def all(self) -> list[JobRecord]:
        return list(self._jobs.values())

    def queued(self) -> list[JobRecord]:
        """Waiting jobs in queue order (:func:`ganglion.domain.queue_key`: priority first)."""
        return sorted(
            (r for r in self._open.values() if r.state is JobState.QUEUED),
            key=lambda r: queue_key(r.job),
        )

    def active(self) -> list[JobRecord]:
        """Jobs holding GPUs: scheduled or running (a stopped preempted run holds none)."""
        return [r for r in self._open.values() if r.holds_gpus]

    def preempting(self) -> list[JobRecord]:
        """Jobs whose run a policy asked to stop and that have not stopped yet."""
        return [r for r in self._open.values() if r.preempt_requested and r.holds_gpus]

    def note_unfit(self, queued: list[JobRecord], capacity: int) -> None:
        """Tell each queued job larger than the live hosts' ``capacity`` GPUs why it waits
        (its message, in memory: it changes with the hosts), and clear that note once it fits."""
        for r in queued:
            note = (
                f"{UNFIT} needs {r.job.gpus} GPUs, the live hosts have {capacity}"
                if r.job.gpus > capacity
                else ""
            )
            if note != r.message and (note or r.message.startswith(UNFIT)):
                r.message = note
                self._notify(r)

    def stopping(self) -> list[JobRecord]:
        """Jobs whose run must stop, for a policy or a Cancel, and that still hold GPUs."""
        return [
            r
            for r in self._open.values()
            if (r.preempt_requested or r.cancel_requested) and r.holds_gpus
        ]

    # --- durable writes -----------------------------------------------------------------

    async def _append(
        self, subject: str, info: controller_pb2.JobInfo, msg_id: str, headers: dict[str, str]
    ) -> None:
        await self._js.publish(
            subject,
            info.SerializeToString(),
            headers={**headers, "Nats-Msg-Id": msg_id},
            timeout=5.0,
        )

    async def submit(self, job: Job) -> JobRecord:
        """Persist, then queue. Returns the existing record for a known id (idempotent)."""
        if job.id in self._jobs:
            return self._jobs[job.id]
        headers = inject_headers()
        record = JobRecord(job=job, trace_headers=headers)
        await self._append(SUBMITTED, record.to_proto(), f"submit:{job.id}", headers)
        self._apply_submitted(record.to_proto(), headers)
        return self._jobs[job.id]

    async def mark_placed(
        self, job_id: str, segments: tuple[Segment, ...], decided_by: str
    ) -> None:
        record = self.get(job_id)
        info = controller_pb2.JobInfo(
            job=job_to_proto(record.job),
            segments=segments_to_proto(segments),
            decided_by=decided_by,
        )
        await self._append(PLACED, info, f"placed:{job_id}:{time.time_ns()}", record.trace_headers)
        self._apply_placed(info)

    async def requeue(self, job_id: str, reason: str) -> None:
        """Put a placed job that did not start back in the queue, as its next attempt: a new
        run id, so an executor that did receive the old run (an Apply that timed out after
        it was carried out) never takes the next placement for that one, and the old run's
        events are told apart."""
        record = self.get(job_id)
        info = controller_pb2.JobInfo(
            job=job_to_proto(record.job), message=reason, attempt=record.attempt + 1
        )
        await self._append(REQUEUED, info, f"requeued:{record.run_id}:undone", record.trace_headers)
        self._apply_requeued(info)

    async def request_preemption(self, job_id: str, reason: str) -> bool:
        """Record that a policy wants the job's current run stopped. False (and nothing
        recorded) when the job holds no GPUs, is being cancelled, or is already stopping."""
        record = self.get(job_id)
        if not record.holds_gpus or record.cancel_requested or record.preempt_requested:
            return False
        info = controller_pb2.JobInfo(
            job=job_to_proto(record.job), message=reason, attempt=record.attempt
        )
        msg_id = f"preempt:{record.run_id}"
        await self._append(PREEMPTING, info, msg_id, record.trace_headers)
        self._apply_preempting(info)
        return True

    async def requeue_preempted(self) -> int:
        """Put every preempted job whose run has stopped back in the queue, as its next
        attempt, with the service it received so far. Returns how many."""
        due = [r for r in self._open.values() if r.restart_due]
        done = 0
        for record in due:
            if not record.restart_due:
                continue  # cancelled while an earlier requeue was being written
            job = replace(
                record.job,
                attained_service_s=record.attained_service_s(record.end_time_s),
                queued_since_s=record.end_time_s,
            )
            info = controller_pb2.JobInfo(
                job=job_to_proto(job),
                message=f"preempted (attempt {record.attempt}); queued again",
                attempt=record.attempt + 1,
            )
            msg_id = f"requeued:{record.run_id}:preempted"
            await self._append(REQUEUED, info, msg_id, record.trace_headers)
            self._apply_requeued(info)
            done += 1
        return done

    async def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.state.terminal or record.cancel_requested:
            return record
        info = controller_pb2.JobInfo(job=job_to_proto(record.job))
        await self._append(CANCELLED, info, f"cancel:{job_id}", record.trace_headers)
        self._apply_cancelled(info)
        return record

    # --- state transitions (shared by live writes and replay) ----------------------------

    def _apply_submitted(self, info: controller_pb2.JobInfo, headers: dict[str, str]) -> None:
        if info.job.id in self._jobs:
            return
        self._jobs[info.job.id] = JobRecord(job=job_from_proto(info.job), trace_headers=headers)
        self._notify(self._jobs[info.job.id])

    def _apply_placed(self, info: controller_pb2.JobInfo) -> None:
        record = self._jobs.get(info.job.id)
        if record is None or record.state is not JobState.QUEUED:
            return
        record.state = JobState.SCHEDULED
        record.segments = segments_from_proto(info.segments)
        record.segment_states = {s.host: JobState.SCHEDULED for s in record.segments}
        record.decided_by = info.decided_by
        self._notify(record)

    def _apply_requeued(self, info: controller_pb2.JobInfo) -> None:
        record = self._jobs.get(info.job.id)
        if record is None or info.attempt < record.attempt:
            return
        if info.attempt > record.attempt and not record.cancel_requested:
            # The next run, from the start.
            record.attempt = info.attempt
            record.job = job_from_proto(info.job)
            record.preempt_requested = record.restart_due = False
            record.start_time_s = record.end_time_s = 0.0
            record.exit_code = 0
        elif record.state.terminal:
            return
        record.segments = ()
        record.segment_states = {}
        if record.cancel_requested:  # nothing runs any more: the Cancel is done
            record.restart_due = False
            record.state = JobState.CANCELLED
            record.end_time_s = record.end_time_s or time.time()
        else:
            record.state = JobState.QUEUED
            record.message = info.message
        self._notify(record)

    def _apply_preempting(self, info: controller_pb2.JobInfo) -> None:
        record = self._jobs.get(info.job.id)
        if record is None or info.attempt != record.attempt or not record.holds_gpus:
            return
        record.preempt_requested = True
        record.message = info.message
        self._notify(record)

    def _apply_cancelled(self, info: controller_pb2.JobInfo) -> None:
        record = self._jobs.get(info.job.id)
        if record is None or record.state.terminal:
            return
        record.cancel_requested = True
        if record.state is JobState.QUEUED or record.restart_due:
            # Queued, or preempted and stopped but not yet queued again: nothing runs.
            record.state = JobState.CANCELLED
            record.restart_due = False
            record.end_time_s = record.end_time_s or time.time()
        self._notify(record)

    def apply_event(self, event: executor_pb2.JobEvent) -> None:
        """An executor reported a job's segment changing state on its host."""
        job_id, attempt = parse_run_id(event.job_id)
        record = self._jobs.get(job_id)
        if record is None or attempt != record.attempt or event.host not in record.segment_states:
            return  # a stale event from an earlier placement or run, or a job we never placed
        if record.restart_due:
            return
        state = JobState(event.state)
        record.segment_states[event.host] = state
        if state is JobState.RUNNING:
            if record.state is JobState.SCHEDULED:
                record.state = JobState.RUNNING
                record.start_time_s = event.time_s
        elif state in _SEGMENT_DONE:
            if state is JobState.FAILED and record.exit_code == 0:
                record.exit_code = event.exit_code
                record.message = event.message
            if all(s in _SEGMENT_DONE for s in record.segment_states.values()):
                record.end_time_s = event.time_s
                final = self._final_state(record)
                self.changed.set()
                if final is JobState.PREEMPTED and record.preempt_requested:
                    record.restart_due = True  # queued again by requeue_preempted, durably
                    return
                record.state = final
        self._notify(record)

    @staticmethod
    def _final_state(record: JobRecord) -> JobState:
        states = set(record.segment_states.values())
        if record.cancel_requested:
            return JobState.CANCELLED
        if record.preempt_requested:
            # However the run ended once asked to stop: as the executor reports a job that
            # exits on its SIGTERM, unless the executor was down then and read only the exit
            # code (0: SUCCEEDED, 143: FAILED), which would lose the job instead of requeueing it.
            return JobState.PREEMPTED
        if JobState.FAILED in states:
            return JobState.FAILED
        if JobState.PREEMPTED in states:
            return JobState.PREEMPTED
        return JobState.SUCCEEDED

    # --- replay and live feeds ------------------------------------------------------------

    async def start(self) -> None:
        """Replay both streams to the end, then keep following them."""
        await self._follow(bus.JOBS_STREAM, f"{bus.JOBS_SUBJECT}.>", self._on_job_msg)
        await self._follow(bus.EVENTS_STREAM, f"{bus.EVENTS_SUBJECT}.>", self._on_event_msg)
        self.changed.set()

    async def _follow(self, stream: str, subject: str, handler: _Handler) -> None:
        last = (await self._js.stream_info(stream)).state.last_seq
        caught_up = asyncio.Event()
        if last == 0:
            caught_up.set()

        async def cb(msg: Msg) -> None:
            try:
                handler(msg)
            except Exception:
                log.exception("bad message on %s", msg.subject)
            if msg.metadata.sequence.stream >= last:
                caught_up.set()

        sub = await self._js.subscribe(subject, stream=stream, ordered_consumer=True, cb=cb)
        self._subs.append(sub)
        await asyncio.wait_for(caught_up.wait(), timeout=60.0)
        log.info("replayed %s up to seq %d", stream, last)

    def _on_job_msg(self, msg: Msg) -> None:
        info = controller_pb2.JobInfo.FromString(msg.data)
        headers = {k: v for k, v in (msg.headers or {}).items() if k != "Nats-Msg-Id"}
        if msg.subject == SUBMITTED:
            self._apply_submitted(info, headers)
        elif msg.subject == PLACED:
            self._apply_placed(info)
        elif msg.subject == REQUEUED:
            self._apply_requeued(info)
        elif msg.subject == CANCELLED:
            self._apply_cancelled(info)
        elif msg.subject == PREEMPTING:
            self._apply_preempting(info)
        else:
            log.warning("unknown job record subject %s", msg.subject)

    def _on_event_msg(self, msg: Msg) -> None:
        self.apply_event(executor_pb2.JobEvent.FromString(msg.data))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    # --- Watch -----------------------------------------------------------------------------

    def watch(self, job_id: str) -> asyncio.Queue[controller_pb2.JobInfo]:
        queue: asyncio.Queue[controller_pb2.JobInfo] = asyncio.Queue(maxsize=10_000)
        self._watchers.append((job_id, queue))
        return queue

    def unwatch(self, queue: asyncio.Queue[controller_pb2.JobInfo]) -> None:
        self._watchers = [(j, q) for j, q in self._watchers if q is not queue]

    def _notify(self, record: JobRecord) -> None:
        if record.state.terminal:
            self._open.pop(record.job.id, None)
        else:
            self._open[record.job.id] = record
        if record.state is JobState.QUEUED:
            self.changed.set()
        if not self._watchers:
            return
        info = record.to_proto()
        for job_id, queue in self._watchers:
            if job_id in ("", record.job.id):
                if queue.full():
                    log.warning("watcher too slow: dropping an update for %s", record.job.id)
                    continue
                queue.put_nowait(info)


def records_to_proto(records: Iterable[JobRecord]) -> list[controller_pb2.JobInfo]:
    return [r.to_proto() for r in records]
