"""JobService: proto <-> job table, with every error mapped to a status code here."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from ganglion.domain import Job, JobState
from ganglion.v1 import controller_pb2, controller_pb2_grpc
from ganglion_controller.jobs import RUN_SEPARATOR, JobNotFound, JobTable, records_to_proto
from ganglion_controller.loop import SchedulingLoop

MAX_GPUS_PER_JOB = 4096
MAX_COMMAND_BYTES = 64 * 1024


class InvalidArgument(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


MAX_NAME_BYTES = 128
"""Longest job id or tenant. Executors name files after a job's runs (``<id>~<attempt>``),
and a file name is at most 255 bytes: an id is held to ASCII, so its characters are bytes."""


def validate_submit(request: controller_pb2.SubmitRequest) -> None:
    job_id = request.job_id
    if job_id and (
        len(job_id) > MAX_NAME_BYTES
        or not job_id.isascii()
        or not job_id.isprintable()
        or " " in job_id
    ):
        raise InvalidArgument(
            "job_id", f"must be at most {MAX_NAME_BYTES} printable ASCII characters without spaces"
        )
    if "/" in request.job_id or RUN_SEPARATOR in request.job_id or request.job_id.startswith("."):
        # Executors name files after runs; "~" separates a job id from its attempt (jobs.py).
        raise InvalidArgument(
            "job_id", f"must not contain '/' or {RUN_SEPARATOR!r} nor start with '.'"
        )
    if request.gpus == 0:
        raise InvalidArgument("gpus", "must be at least 1")
    if request.gpus > MAX_GPUS_PER_JOB:
        raise InvalidArgument("gpus", f"must be at most {MAX_GPUS_PER_JOB}, got {request.gpus}")
    if len(request.tenant.encode()) > MAX_NAME_BYTES or not request.tenant.isprintable():
        raise InvalidArgument("tenant", f"must be at most {MAX_NAME_BYTES} bytes, printable")
    if not request.command or not request.command[0]:
        raise InvalidArgument("command", "must name a program")
    # As the kernel counts them: encoded bytes, one terminator per string ("K=V\0" per
    # variable). Counted in characters, 600,000 empty arguments were "0 bytes" and the job's
    # record then overflowed the NATS message limit (answered UNAVAILABLE, so retried).
    command_bytes = sum(len(c.encode()) + 1 for c in request.command)
    env_bytes = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in request.env.items())
    if command_bytes + env_bytes > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            "env" if env_bytes > command_bytes else "command",
            f"command and env take {command_bytes + env_bytes} bytes, more than "
            f"{MAX_COMMAND_BYTES}",
        )
    for i, arg in enumerate(request.command):
        if "\0" in arg:  # the executor refuses the whole host's plan over one (it cannot exec)
            raise InvalidArgument(f"command[{i}]", "must not contain NUL")
    for key, value in request.env.items():
        if not key or "=" in key or "\0" in key:
            raise InvalidArgument(f"env[{key!r}]", "not a valid environment variable name")
        if "\0" in value:
            raise InvalidArgument(f"env[{key!r}]", "value must not contain NUL")


class JobServicer(controller_pb2_grpc.JobServiceServicer):
    def __init__(
        self, jobs: JobTable, loop: SchedulingLoop, hosts_gpus: Callable[[], tuple[int, int]]
    ) -> None:
        self._jobs = jobs
        self._loop = loop
        self._hosts_gpus = hosts_gpus

    async def Submit(
        self,
        request: controller_pb2.SubmitRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> controller_pb2.SubmitResponse:
        try:
            validate_submit(request)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        job = Job(
            id=request.job_id or uuid.uuid4().hex[:16],
            tenant=request.tenant or "default",
            gpus=request.gpus,
            priority=request.priority,
            submit_time_s=time.time(),
            command=tuple(request.command),
            env=dict(request.env),
        )
        try:
            record = await self._jobs.submit(job)
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"job queue unavailable: {exc}")
        return controller_pb2.SubmitResponse(job_id=record.job.id)

    async def Cancel(
        self,
        request: controller_pb2.CancelRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> controller_pb2.CancelResponse:
        try:
            record = await self._jobs.cancel(request.job_id)
        except JobNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        # Read after the write: the job may have been placed while the cancel was written.
        if record.state in (JobState.SCHEDULED, JobState.RUNNING):
            await self._loop.preempt(record)
        return controller_pb2.CancelResponse(job=record.to_proto())

    async def Get(
        self, request: controller_pb2.GetRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> controller_pb2.GetResponse:
        try:
            return controller_pb2.GetResponse(job=self._jobs.get(request.job_id).to_proto())
        except JobNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def List(
        self, request: controller_pb2.ListRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> controller_pb2.ListResponse:
        for i, s in enumerate(request.states):
            if int(s) not in {int(x) for x in JobState}:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"states[{i}]: unknown state {s}"
                )
        wanted = {JobState(s) for s in request.states}
        records = [r for r in self._jobs.all() if not wanted or r.state in wanted]
        return controller_pb2.ListResponse(jobs=records_to_proto(records))

    async def Watch(
        self,
        request: controller_pb2.WatchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[controller_pb2.WatchResponse]:
        queue = self._jobs.watch(request.job_id)
        try:
            if request.job_id:
                try:
                    record = self._jobs.get(request.job_id)
                except JobNotFound as exc:
                    await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
                yield controller_pb2.WatchResponse(job=record.to_proto())
                if record.state.terminal:
                    return
            while True:
                info = await queue.get()
                yield controller_pb2.WatchResponse(job=info)
                if request.job_id and JobState(info.state).terminal:
                    return
        finally:
            self._jobs.unwatch(queue)

    async def Stats(
        self,
        request: controller_pb2.StatsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> controller_pb2.StatsResponse:
        stats = self._loop.stats
        hosts, gpus = self._hosts_gpus()
        return controller_pb2.StatsResponse(
            decisions=stats.decisions,
            fallbacks=stats.fallbacks,
            decision_latency_p50_ms=stats.percentile_ms(50),
            decision_latency_p99_ms=stats.percentile_ms(99),
            hosts=hosts,
            gpus=gpus,
            jobs_placed=stats.jobs_placed,
            preemptions=stats.preemptions,
        )
