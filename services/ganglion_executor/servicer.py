"""gRPC ExecutorService: proto <-> executor values, and errors -> status codes (here only)."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from ganglion.convert import job_from_proto, job_state_to_proto
from ganglion.v1 import executor_pb2, executor_pb2_grpc
from ganglion_executor.errors import (
    ExecutorError,
    GpuBusyError,
    InvalidArgumentError,
    JobNotFoundError,
    LedgerCorruptError,
    StaleGenerationError,
)
from ganglion_executor.executor import Executor
from ganglion_executor.model import Assignment, JobView

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name

_STATUS_CODES: tuple[tuple[type[ExecutorError], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (StaleGenerationError, grpc.StatusCode.FAILED_PRECONDITION),
    (GpuBusyError, grpc.StatusCode.FAILED_PRECONDITION),
    (JobNotFoundError, grpc.StatusCode.NOT_FOUND),
    (LedgerCorruptError, grpc.StatusCode.INTERNAL),
)


def status_code(exc: ExecutorError) -> grpc.StatusCode:
    for cls, code in _STATUS_CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: ExecutorError) -> NoReturn:
    await context.abort(status_code(exc), str(exc))
    raise AssertionError("unreachable: abort raises")


def job_status_to_proto(view: JobView) -> executor_pb2.JobStatus:
    return executor_pb2.JobStatus(
        job_id=view.job_id,
        state=job_state_to_proto(view.state),
        gpu_indices=list(view.gpu_indices),
        pid=view.pid,
        exit_code=view.exit_code,
        start_time_s=view.start_time_s,
        end_time_s=view.end_time_s,
        log_path=view.log_path,
        message=view.message,
    )


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    """Thin translation layer over :class:`Executor`."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def Apply(
        self, request: executor_pb2.ApplyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.ApplyResponse:
        assignments = [
            Assignment(job_from_proto(a.job), tuple(a.gpu_indices)) for a in request.assignments
        ]
        try:
            result = await self._executor.apply(request.host, request.generation, assignments)
        except ExecutorError as exc:
            await _abort(context, exc)
        return executor_pb2.ApplyResponse(
            generation=result.generation,
            started_job_ids=list(result.started),
            known_job_ids=list(result.known),
        )

    async def Status(
        self, request: executor_pb2.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.StatusResponse:
        s = self._executor.status()
        return executor_pb2.StatusResponse(
            host=s.host,
            generation=s.generation,
            gpu_count=s.gpu_count,
            jobs=[job_status_to_proto(j) for j in s.jobs],
        )

    async def Preempt(
        self, request: executor_pb2.PreemptRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.PreemptResponse:
        # proto3 cannot tell 0 from unset: 0 means the executor's default grace.
        grace_s = request.grace_s if request.grace_s != 0 else None
        try:
            view = await self._executor.preempt(request.job_id, grace_s)
        except ExecutorError as exc:
            await _abort(context, exc)
        return executor_pb2.PreemptResponse(status=job_status_to_proto(view))
