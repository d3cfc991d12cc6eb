"""Request checks in process: a good request becomes the policy's inputs, and a bad one is
refused naming the first offending field in a fixed order, however it was found (the domain's
own checks, the few it lacks, or the per-job checks)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from ganglion import policies
from ganglion.convert import job_from_proto, state_from_proto
from ganglion.loadgen import synthetic_request
from ganglion.v1 import decision_pb2
from ganglion_decision.validation import (
    InvalidRequestError,
    Limits,
    RequestTooLargeError,
    parse_schedule_request,
)

Mutate = Callable[[decision_pb2.ScheduleRequest], None]
KNOWN = policies.names()


def request() -> decision_pb2.ScheduleRequest:
    """8 hosts of 8 GPUs, some busy (host-major columns), 4 pending jobs."""
    return synthetic_request(64, 4)


def cluster(field: str, i: int, value: float) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        getattr(r.cluster, field)[i] = value

    return mutate


def job(i: int, **values: object) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        for k, v in values.items():
            setattr(r.pending[i], k, v)

    return mutate


def now(value: float) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        r.cluster.now_s = value

    return mutate


def host(i: int, name: str) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        r.cluster.hosts[i] = name

    return mutate


def drop_last(field: str) -> Mutate:
    def mutate(r: decision_pb2.ScheduleRequest) -> None:
        del getattr(r.cluster, field)[-1]

    return mutate


# name: (mutations, the field the error must name). Several mutations: the first in the
# checks' order wins, whichever check noticed something first.
CASES: dict[str, tuple[list[Mutate], str]] = {
    "now NaN": ([now(math.nan)], "cluster.now_s"),
    "now -inf": ([now(-math.inf)], "cluster.now_s"),
    "empty host": ([host(3, "")], "cluster.hosts[3]"),
    "duplicate host": ([host(5, "node-00001")], "cluster.hosts[5]"),
    "gpu_index shorter": ([drop_last("gpu_index")], "cluster.gpu_index"),
    "gpu_utilization shorter": ([drop_last("gpu_utilization")], "cluster.gpu_utilization"),
    "gpu_host past hosts, last GPU": ([cluster("gpu_host", 63, 8)], "cluster.gpu_host[63]"),
    "gpu_host past hosts": ([cluster("gpu_host", 9, 8)], "cluster.gpu_host[9]"),
    "gpu_host past int32": ([cluster("gpu_host", 9, 2**31)], "cluster.gpu_host[9]"),
    "gpu_host past int32, last GPU": ([cluster("gpu_host", 63, 2**32 - 1)], "cluster.gpu_host[63]"),
    "gpu_index past int32": ([cluster("gpu_index", 12, 2**31)], "cluster.gpu_index[12]"),
    "gpu_index uint32 max": ([cluster("gpu_index", 0, 2**32 - 1)], "cluster.gpu_index[0]"),
    "gpu_job past running": ([cluster("gpu_job", 2, 10_000)], "cluster.gpu_job[2]"),
    "gpu_job below -1": ([cluster("gpu_job", 40, -3)], "cluster.gpu_job[40]"),
    "utilization NaN": ([cluster("gpu_utilization", 17, math.nan)], "cluster.gpu_utilization[17]"),
    "duplicate GPU": ([cluster("gpu_index", 9, 0)], "cluster.gpu_index[9]"),
    "duplicate GPU across hosts": (
        [cluster("gpu_host", 8, 0), cluster("gpu_index", 8, 3)],
        "cluster.gpu_index[8]",
    ),
    "empty id": ([job(1, id="")], "pending[1].id"),
    "duplicate id": ([job(3, id="pending-00000")], "pending[3].id"),
    "zero gpus": ([job(2, gpus=0)], "pending[2].gpus"),
    "submit NaN": ([job(0, submit_time_s=math.nan)], "pending[0].submit_time_s"),
    "submit inf": ([job(2, submit_time_s=math.inf)], "pending[2].submit_time_s"),
    "attained negative": ([job(1, attained_service_s=-1.0)], "pending[1].attained_service_s"),
    "attained NaN": ([job(3, attained_service_s=math.nan)], "pending[3].attained_service_s"),
    # The order: now_s, hosts, lengths, gpu_host, gpu_index, gpu_job, utilization,
    # duplicates, then the pending jobs in order, each field in order.
    "now before gpu_host": ([cluster("gpu_host", 9, 8), now(math.inf)], "cluster.now_s"),
    "hosts before duplicates": ([cluster("gpu_index", 9, 0), host(0, "")], "cluster.hosts[0]"),
    "gpu_host before utilization": (
        [cluster("gpu_utilization", 1, math.nan), cluster("gpu_host", 30, 99)],
        "cluster.gpu_host[30]",
    ),
    "gpu_index before gpu_job": (
        [cluster("gpu_job", 2, -5), cluster("gpu_index", 50, 2**31)],
        "cluster.gpu_index[50]",
    ),
    "utilization before duplicates": (
        [cluster("gpu_index", 9, 0), cluster("gpu_utilization", 20, math.nan)],
        "cluster.gpu_utilization[20]",
    ),
    "cluster before pending": ([job(0, id=""), cluster("gpu_job", 5, -2)], "cluster.gpu_job[5]"),
    "earlier job first": (
        [job(3, gpus=0), job(1, submit_time_s=math.nan)],
        "pending[1].submit_time_s",
    ),
    "id before gpus": ([job(2, gpus=0, id="")], "pending[2].id"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_request_names_the_first_offending_field(case: str) -> None:
    mutations, field = CASES[case]
    req = request()
    for mutate in mutations:
        mutate(req)
    with pytest.raises(InvalidRequestError) as err:
        parse_schedule_request(req, KNOWN)
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(f"{field}: ")


def test_a_good_request_becomes_the_policys_inputs() -> None:
    req = request()
    state, pending = parse_schedule_request(req, KNOWN)
    want = state_from_proto(req.cluster)
    assert (state.now_s, state.hosts) == (want.now_s, want.hosts)
    for name in ("gpu_host", "gpu_index", "gpu_job", "gpu_utilization"):
        assert getattr(state, name).tolist() == getattr(want, name).tolist()
    assert state.running == want.running
    assert pending == [job_from_proto(j) for j in req.pending]


def test_an_unknown_policy_lists_the_known_ones() -> None:
    req = request()
    req.policy = "nope"
    with pytest.raises(InvalidRequestError) as err:
        parse_schedule_request(req, ["b", "a"])
    assert str(err.value) == "policy: unknown policy 'nope'; known: a, b"


def test_sizes_are_checked_before_anything_else() -> None:
    req = request()
    req.cluster.now_s = math.nan
    req.policy = "nope"
    with pytest.raises(RequestTooLargeError) as err:
        parse_schedule_request(req, KNOWN, Limits(max_gpus=63))
    assert err.value.field == "cluster.gpu_host"
    with pytest.raises(RequestTooLargeError) as err:
        parse_schedule_request(req, KNOWN, Limits(max_pending=3))
    assert err.value.field == "pending"


def test_an_empty_cluster_is_valid() -> None:
    req = decision_pb2.ScheduleRequest(cluster=decision_pb2.ScheduleRequest().cluster)
    req.cluster.hosts.append("h")
    state, pending = parse_schedule_request(req, KNOWN)
    assert state.num_gpus == 0 and state.running == () and pending == []
