"""Protobuf <-> domain translation, in one place for every service."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from ganglion.domain import (
    ClusterState,
    Decision,
    Job,
    JobColumns,
    JobState,
    Placement,
    Segment,
)
from ganglion.v1 import cluster_pb2, decision_pb2, telemetry_pb2


def job_to_proto(job: Job) -> cluster_pb2.Job:
    # command/env are set only when non-empty: empty list/dict keyword arguments cost upb ~4 us
    # a message, twice the rest, and most jobs (every running job in a state) have neither.
    msg = cluster_pb2.Job(
        id=job.id,
        tenant=job.tenant,
        gpus=job.gpus,
        priority=job.priority,
        submit_time_s=job.submit_time_s,
        attained_service_s=job.attained_service_s,
        duration_hint_s=job.duration_hint_s,  # None leaves the optional field unset
        queued_since_s=job.queued_since_s,
    )
    if job.command:
        msg.command.extend(job.command)
    if job.env:
        msg.env.update(job.env)
    return msg


def _plain_fields(cls: type) -> tuple[str, ...] | None:
    """The field names of ``cls`` when an instance is nothing but its ``__dict__`` (a
    dataclass without slots, ``__post_init__`` or init-only fields), else None."""
    if "__slots__" in cls.__dict__ or hasattr(cls, "__post_init__"):
        return None
    fields = dataclasses.fields(cls)
    if len(fields) != len(getattr(cls, "__dataclass_fields__", {})):
        return None  # an InitVar or ClassVar pseudo-field: __init__ does more than store
    return tuple(f.name for f in fields)


_JOB_FIELDS = (
    "id",
    "tenant",
    "gpus",
    "submit_time_s",
    "priority",
    "command",
    "env",
    "attained_service_s",
    "duration_hint_s",
    "queued_since_s",
)
# A frozen dataclass stores each field through object.__setattr__ (~0.5 us apiece), so a
# request's 100s of Jobs spent a third of Schedule in Job.__init__. When Job is a plain
# dataclass with exactly these fields, filling a new instance's __dict__ in one store builds
# the same value 4-5x faster; if domain.Job ever changes shape, the constructor is used.
_FAST_JOB = _plain_fields(Job) == _JOB_FIELDS
_new = object.__new__
_set = object.__setattr__


def job_from_proto(msg: cluster_pb2.Job) -> Job:
    # Each read of a repeated or map field builds a wrapper object: one read apiece. A slice
    # copies a repeated field in C (tuple() of the field iterates it at half the speed), and
    # dict() of a map goes through the Python Mapping mixin (twice as slow as this loop).
    args, variables = msg.command, msg.env
    command = tuple(args[:]) if args else ()
    env = {k: variables[k] for k in variables} if variables else {}
    hint = msg.duration_hint_s if msg.HasField("duration_hint_s") else None
    queued = msg.queued_since_s if msg.HasField("queued_since_s") else None
    if not _FAST_JOB:
        return Job(
            id=msg.id,
            tenant=msg.tenant,
            gpus=msg.gpus,
            submit_time_s=msg.submit_time_s,
            priority=msg.priority,
            command=command,
            env=env,
            attained_service_s=msg.attained_service_s,
            duration_hint_s=hint,
            queued_since_s=queued,
        )
    job: Job = _new(Job)
    _set(
        job,
        "__dict__",
        {
            "id": msg.id,
            "tenant": msg.tenant,
            "gpus": msg.gpus,
            "submit_time_s": msg.submit_time_s,
            "priority": msg.priority,
            "command": command,
            "env": env,
            "attained_service_s": msg.attained_service_s,
            "duration_hint_s": hint,
            "queued_since_s": queued,
        },
    )
    return job


def segments_to_proto(segments: Iterable[Segment]) -> list[cluster_pb2.AllocationSegment]:
    return [
        cluster_pb2.AllocationSegment(host=s.host, gpu_indices=list(s.gpu_indices))
        for s in segments
    ]


def segments_from_proto(msgs: Iterable[cluster_pb2.AllocationSegment]) -> tuple[Segment, ...]:
    return tuple(Segment(m.host, tuple(m.gpu_indices)) for m in msgs)


def state_to_proto(state: ClusterState) -> cluster_pb2.ClusterState:
    msg = cluster_pb2.ClusterState(now_s=state.now_s, hosts=list(state.hosts))
    # extend() from numpy arrays goes through tolist(): one C-level conversion per column.
    msg.gpu_host.extend(state.gpu_host.tolist())
    msg.gpu_index.extend(state.gpu_index.tolist())
    msg.gpu_job.extend(state.gpu_job.tolist())
    msg.gpu_utilization.extend(state.gpu_utilization.tolist())
    msg.running.extend(job_to_proto(j) for j in state.running)
    return msg


def state_from_proto(msg: cluster_pb2.ClusterState) -> ClusterState:
    """Columns straight into numpy. Raises ValueError on inconsistent columns.

    The running jobs are converted on first read of ``running`` or ``running_columns``
    (``ClusterState.lazy``), from ``msg``, which must not change until then: a decision by a
    policy that reads neither (best-fit, FIFO) converted one ``Job`` per running job for
    nothing, most of decoding a request."""
    running = msg.running
    return ClusterState.lazy(
        now_s=msg.now_s,
        hosts=tuple(msg.hosts),
        gpu_host=np.array(msg.gpu_host, dtype=np.int32),
        gpu_index=np.array(msg.gpu_index, dtype=np.int32),
        gpu_job=np.array(msg.gpu_job, dtype=np.int32),
        gpu_utilization=np.array(msg.gpu_utilization, dtype=np.float32),
        num_running=len(running),
        running=lambda: tuple([job_from_proto(j) for j in running]),
        running_columns=lambda: job_columns_from_proto(running),
    )


def job_columns_from_proto(msgs: Sequence[cluster_pb2.Job]) -> JobColumns:
    """``JobColumns.of`` the converted jobs, without building a ``Job`` per message."""
    ids: list[str] = []
    priority: list[int] = []
    gpus: list[int] = []
    submit: list[float] = []
    attained: list[float] = []
    queued: list[float] = []
    hint: list[float] = []
    for m in msgs:
        ids.append(m.id)
        priority.append(m.priority)
        gpus.append(m.gpus)
        submit.append(s := m.submit_time_s)
        attained.append(m.attained_service_s)
        queued.append(m.queued_since_s if m.HasField("queued_since_s") else s)
        hint.append(m.duration_hint_s if m.HasField("duration_hint_s") else math.nan)
    return JobColumns(
        ids=np.array(ids, dtype=np.str_),
        priority=np.array(priority, dtype=np.int64),
        gpus=np.array(gpus, dtype=np.int64),
        submit_time_s=np.array(submit, dtype=np.float64),
        attained_service_s=np.array(attained, dtype=np.float64),
        queued_since_s=np.array(queued, dtype=np.float64),
        duration_hint_s=np.array(hint, dtype=np.float64),
    )


def placement_to_proto(p: Placement) -> decision_pb2.Placement:
    return decision_pb2.Placement(
        job_id=p.job_id,
        segments=segments_to_proto(p.segments),
        score=p.score,
        runner_up_host=p.runner_up_host,
        runner_up_score=p.runner_up_score,
        reason=p.reason,
    )


def decision_to_proto(d: Decision) -> decision_pb2.ScheduleResponse:
    # Sub-messages made in place with add(): half the cost of building each one standalone
    # and copying it into the repeated field, which is what keyword lists of messages do.
    # Their fields are then set one by one: upb parses keyword arguments slower than it sets
    # attributes (~15% of the whole conversion).
    msg = decision_pb2.ScheduleResponse(
        policy=d.policy,
        version=d.version,
        preempt_job_ids=d.preemptions,
        next_decision_s=d.next_decision_s,  # None leaves the optional field unset
    )
    add = msg.placements.add
    for p in d.placements:
        placed = add()
        placed.job_id = p.job_id
        placed.score = p.score
        placed.runner_up_host = p.runner_up_host
        placed.runner_up_score = p.runner_up_score
        placed.reason = p.reason
        add_segment = placed.segments.add
        for s in p.segments:
            add_segment(host=s.host).gpu_indices.extend(s.gpu_indices)
    return msg


def decision_from_proto(msg: decision_pb2.ScheduleResponse) -> Decision:
    return Decision(
        placements=tuple(
            Placement(
                job_id=p.job_id,
                segments=segments_from_proto(p.segments),
                score=p.score,
                runner_up_host=p.runner_up_host,
                runner_up_score=p.runner_up_score,
                reason=p.reason,
            )
            for p in msg.placements
        ),
        policy=msg.policy,
        version=msg.version,
        preemptions=tuple(msg.preempt_job_ids),
        next_decision_s=msg.next_decision_s if msg.HasField("next_decision_s") else None,
    )


def job_state_to_proto(state: JobState) -> cluster_pb2.JobState.ValueType:
    return cluster_pb2.JobState.ValueType(int(state))


def job_state_from_proto(value: int) -> JobState:
    return JobState(value)


def utilization_by_index(sample: telemetry_pb2.HostSample, limit: int | None = None) -> list[float]:
    """Utilisation percent of GPU i at position i of the sample's per-GPU messages, -1 where
    a GPU is absent or did not report it; GPUs from index ``limit`` on are left out (a reader
    of untrusted samples sets it: one message naming GPU 4,294,967,295 would ask for 16 GiB)."""
    gpus = sample.gpus
    size = max((g.index for g in gpus), default=-1) + 1
    if limit is not None:
        size = min(size, limit)
    util = [-1.0] * size
    for g in gpus:
        # A non-zero reading is known to be set; only a zero needs HasField (0 % or unknown).
        if g.index < size and (
            (u := g.gpu_utilization_percent) or g.HasField("gpu_utilization_percent")
        ):
            util[g.index] = u
    return util


def pack_utilization(sample: telemetry_pb2.HostSample) -> None:
    """Fill ``sample.gpu_utilization_by_index`` from its per-GPU messages."""
    del sample.gpu_utilization_by_index[:]
    sample.gpu_utilization_by_index.extend(utilization_by_index(sample))
