"""Proto <-> domain conversion: the fast Job construction builds exactly what the constructor
builds, a decoded state's running jobs (converted on first read) are the eager conversion's,
and decisions survive a round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ganglion import convert
from ganglion.convert import (
    decision_from_proto,
    decision_to_proto,
    job_from_proto,
    job_to_proto,
    state_from_proto,
    state_to_proto,
)
from ganglion.domain import ClusterState, Decision, Job, JobColumns, Placement, Segment

JOBS = [
    Job(id="a", tenant="t", gpus=1, submit_time_s=1.5),
    Job(
        id="b",
        tenant="u",
        gpus=8,
        submit_time_s=2.0,
        priority=3,
        command=("python", "train.py"),
        env={"A": "1", "B": ""},
        attained_service_s=40.0,
        duration_hint_s=0.0,  # set to zero: still set, not None
        queued_since_s=7.0,
    ),
    Job(id="c", tenant="", gpus=2, submit_time_s=0.0, duration_hint_s=3600.0),
]


def constructed(job: Job) -> Job:
    """``job`` rebuilt through the dataclass constructor, field by field."""
    return Job(**{f.name: getattr(job, f.name) for f in dataclasses.fields(Job)})


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "constructor"])
def test_job_from_proto_equals_the_constructed_job(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fast and not convert._FAST_JOB:
        pytest.skip("domain.Job changed shape: convert uses its constructor (correct, slower)")
    monkeypatch.setattr(convert, "_FAST_JOB", fast)
    for job in JOBS:
        got = job_from_proto(job_to_proto(job))
        assert got == job == constructed(got)
        assert type(got) is Job and vars(got) == vars(job)
        assert hash(got.command) == hash(job.command)
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.gpus = 3  # type: ignore[misc]
    env_a, env_b = (
        job_from_proto(job_to_proto(JOBS[0])).env,
        job_from_proto(job_to_proto(JOBS[0])).env,
    )
    assert env_a == {} and env_a is not env_b  # no shared mutable default


def test_state_and_decision_round_trip() -> None:
    state = ClusterState.build(
        5.0, {"h1": 2, "h2": 4}, {"b": (Segment("h2", (0, 3)),)}, [JOBS[1]], {("h2", 0): 50.0}
    )
    back = state_from_proto(state_to_proto(state))
    assert back.running == state.running and back.hosts == state.hosts
    assert back.gpu_job.tolist() == state.gpu_job.tolist()
    assert back.gpu_utilization.tolist() == state.gpu_utilization.tolist()

    decision = Decision(
        placements=(
            Placement("a", (Segment("h1", (0,)), Segment("h2", (1, 2))), -1.0, "h2", -3.0, "why"),
            Placement("c", (), 0.0),
        ),
        policy="best-fit",
        version="v1",
        preemptions=("b",),
        next_decision_s=9.5,
    )
    assert decision_from_proto(decision_to_proto(decision)) == decision
    plain = dataclasses.replace(decision, preemptions=(), next_decision_s=None)
    msg = decision_to_proto(plain)
    assert not msg.HasField("next_decision_s")
    assert decision_from_proto(msg) == plain


def test_decoded_running_jobs_and_columns_equal_the_eager_conversion() -> None:
    running = [*JOBS, dataclasses.replace(JOBS[0], id="d", queued_since_s=0.0, priority=-2)]
    allocations = {
        "a": (Segment("h1", (0,)),),
        "b": (Segment("h1", (1, 2)), Segment("h2", (0, 1))),
        "c": (Segment("h2", (3,)),),
        "d": (Segment("h1", (3,)),),
    }
    state = ClusterState.build(5.0, {"h1": 4, "h2": 4}, allocations, running)
    msg = state_to_proto(state)
    eager = tuple(job_from_proto(j) for j in msg.running)
    assert eager == tuple(running)

    decoded = state_from_proto(msg)
    assert decoded.running == eager
    got, want = state_from_proto(msg).running_columns, JobColumns.of(eager)  # columns first
    assert len(got) == len(want) == len(running)
    for name in ("ids", "priority", "gpus", "submit_time_s", "attained_service_s"):
        assert getattr(got, name).dtype == getattr(want, name).dtype
        assert getattr(got, name).tolist() == getattr(want, name).tolist()
    for name in ("queued_since_s", "duration_hint_s"):  # unset: submit time, NaN
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert decoded.host_offsets == state.host_offsets
    assert decoded.host_capacity == state.host_capacity
