"""Checks a ``ScheduleRequest`` before any policy sees it, and hands the policy its inputs.

Policies assume a consistent cluster (every GPU on a known host, listed once, held by a known
job or free) and sane jobs; a bad request must fail here with the offending field named
(``cluster.gpu_job[7]``, ``pending[3].id``), not deep inside a policy or as a wrong placement.
Column checks are vectorised: a request may describe 100,000 GPUs.

Every request pays for its checks, so the common case is checked once, on the domain values
the policy gets: the cluster by ``ClusterState``'s own checks plus the few it does not make,
the pending jobs on the converted ``Job`` values (plain attributes, several times cheaper to
read than protobuf fields). Only a request found bad goes through the field-by-field checks
that name the first offender, in a fixed order, whatever found it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ganglion.convert import job_from_proto, state_from_proto
from ganglion.domain import ClusterState, Job
from ganglion.v1 import cluster_pb2, decision_pb2

_INT32_MAX = 2**31 - 1  # the domain keeps GPU columns as int32


class RequestError(Exception):
    """A request the service refuses. ``field`` is the offending proto field path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidRequestError(RequestError):
    """A bad value (gRPC ``INVALID_ARGUMENT``)."""


class RequestTooLargeError(RequestError):
    """Beyond the service's size limits (gRPC ``RESOURCE_EXHAUSTED``)."""


@dataclass(frozen=True)
class Limits:
    """How much one request may ask of the service."""

    max_gpus: int = 100_000
    """Most GPUs (entries per ``cluster.gpu_*`` column), hosts or running jobs in one request."""
    max_pending: int = 100_000
    """Most pending jobs in one request."""


DEFAULT_LIMITS = Limits()


class ScheduleInput(NamedTuple):
    """What a policy decides on, from a checked request."""

    state: ClusterState
    """The cluster; its running jobs are converted when a policy first reads them."""
    pending: list[Job]
    """The pending jobs, in request order."""


def parse_schedule_request(
    request: decision_pb2.ScheduleRequest,
    known_policies: Collection[str],
    limits: Limits = DEFAULT_LIMITS,
) -> ScheduleInput:
    """The request's cluster and pending jobs as domain values; raises
    :class:`RequestError` for the first problem found, sizes first.

    An empty ``policy`` is valid (the server's default); any other name must be registered.
    """
    _check_sizes(request, limits)
    if request.policy and request.policy not in known_policies:
        raise InvalidRequestError(
            "policy",
            f"unknown policy {request.policy!r}; known: {', '.join(sorted(known_policies))}",
        )
    state = _cluster_state(request.cluster)
    pending = [job_from_proto(j) for j in request.pending]
    _check_pending(pending)
    return ScheduleInput(state, pending)


def _check_sizes(request: decision_pb2.ScheduleRequest, limits: Limits) -> None:
    c = request.cluster
    counted = (
        ("cluster.gpu_host", len(c.gpu_host)),
        ("cluster.gpu_index", len(c.gpu_index)),
        ("cluster.gpu_job", len(c.gpu_job)),
        ("cluster.gpu_utilization", len(c.gpu_utilization)),
        ("cluster.hosts", len(c.hosts)),
        ("cluster.running", len(c.running)),
    )
    for field, n in counted:
        if n > limits.max_gpus:
            raise RequestTooLargeError(
                field, f"{n} entries, more than the limit of {limits.max_gpus}"
            )
    if len(request.pending) > limits.max_pending:
        raise RequestTooLargeError(
            "pending", f"{len(request.pending)} jobs, more than the limit of {limits.max_pending}"
        )


def _first(mask: npt.NDArray[np.bool_]) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _cluster_state(c: cluster_pb2.ClusterState) -> ClusterState:
    try:
        state = state_from_proto(c)
    except (ValueError, OverflowError) as exc:
        _check_cluster(c)
        raise InvalidRequestError("cluster", str(exc)) from exc  # a check missing from both
    if not _passes_the_rest(state):
        _check_cluster(c)
        raise AssertionError("a cluster check found a problem that _check_cluster does not")
    return state


def _passes_the_rest(state: ClusterState) -> bool:
    """The checks of :func:`_check_cluster` that ``ClusterState`` does not make."""
    if not math.isfinite(state.now_s) or not all(state.hosts):
        return False
    if not state.num_gpus:
        return True
    # A device index past int32 wraps negative in the state's int32 column (numpy casts
    # protobuf's uint32 without a check); min propagates NaN.
    return int(state.gpu_index.min()) >= 0 and not math.isnan(state.gpu_utilization.min())


def _check_cluster(c: cluster_pb2.ClusterState) -> None:
    """Every check of a cluster, on the message itself, in a fixed order: raises for the
    first offender. Run on a request already found bad, to name what is wrong."""
    if not math.isfinite(c.now_s):
        raise InvalidRequestError("cluster.now_s", f"must be finite, got {c.now_s}")
    _check_names(c.hosts, "cluster.hosts")

    n = len(c.gpu_host)
    for field, got in (
        ("cluster.gpu_index", len(c.gpu_index)),
        ("cluster.gpu_job", len(c.gpu_job)),
        ("cluster.gpu_utilization", len(c.gpu_utilization)),
    ):
        if got != n:
            raise InvalidRequestError(
                field,
                f"has {got} entries but cluster.gpu_host has {n} (one entry per GPU in every column)",
            )
    if n == 0:
        return

    # One reduction per column; the element-wise search for the first offender runs only
    # once a reduction has found one (a request of 100,000 GPUs may be bad in one place).
    gpu_host = np.array(c.gpu_host, dtype=np.int64)
    if int(gpu_host.max()) >= len(c.hosts):
        i = _first(gpu_host >= len(c.hosts))
        raise InvalidRequestError(
            f"cluster.gpu_host[{i}]",
            f"{gpu_host[i]} is not an index into cluster.hosts ({len(c.hosts)} hosts)",
        )
    gpu_index = np.array(c.gpu_index, dtype=np.int64)
    if int(gpu_index.max()) > _INT32_MAX:
        i = _first(gpu_index > _INT32_MAX)
        raise InvalidRequestError(
            f"cluster.gpu_index[{i}]", f"{gpu_index[i]} is not a device index"
        )
    gpu_job = np.array(c.gpu_job, dtype=np.int64)
    if int(gpu_job.min()) < -1 or int(gpu_job.max()) >= len(c.running):
        i = _first((gpu_job < -1) | (gpu_job >= len(c.running)))
        raise InvalidRequestError(
            f"cluster.gpu_job[{i}]",
            f"{gpu_job[i]} is neither -1 (free) nor an index into cluster.running ({len(c.running)} jobs)",
        )
    utilization = np.array(c.gpu_utilization, dtype=np.float32)
    if math.isnan(utilization.min()):  # min propagates NaN
        i = _first(np.isnan(utilization))
        raise InvalidRequestError(
            f"cluster.gpu_utilization[{i}]", "is NaN (use a negative value for unknown)"
        )
    # Duplicate (host, device) pairs would let a policy hand the same GPU out twice. Both fit
    # in 32 bits, so one sorted int64 key per GPU finds a repeat, ~20x cheaper than lexsort.
    key = (gpu_host << 32) | gpu_index
    key.sort()
    if bool((key[1:] == key[:-1]).any()):
        _raise_duplicate(c, gpu_host, gpu_index)


def _raise_duplicate(
    c: cluster_pb2.ClusterState, gpu_host: npt.NDArray[np.int64], gpu_index: npt.NDArray[np.int64]
) -> None:
    # A stable sort keeps equal pairs in request order, so the later one of a pair is reported.
    order = np.lexsort((gpu_index, gpu_host))
    h, d = gpu_host[order], gpu_index[order]
    dup = np.flatnonzero((h[1:] == h[:-1]) & (d[1:] == d[:-1]))
    later = order[dup + 1]
    k = int(np.argmin(later))
    i, first = int(later[k]), int(order[dup[k]])
    raise InvalidRequestError(
        f"cluster.gpu_index[{i}]",
        f"GPU {gpu_index[i]} of host {c.hosts[int(gpu_host[i])]!r} is listed twice "
        f"(also at cluster.gpu_index[{first}])",
    )


def _check_names(names: Sequence[str], field: str) -> None:
    """Host names key the free-GPU map: an empty or repeated one would merge two hosts."""
    if all(names) and len(set(names)) == len(names):
        return  # the common case, in C; the loop below only names the offender
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            raise InvalidRequestError(f"{field}[{i}]", "must not be empty")
        if (j := seen.setdefault(name, i)) != i:
            raise InvalidRequestError(f"{field}[{i}]", f"{name!r} duplicates {field}[{j}]")


def _check_pending(pending: Sequence[Job]) -> None:
    seen: dict[str, int] = {}
    for i, job in enumerate(pending):
        if not job.id:
            raise InvalidRequestError(f"pending[{i}].id", "must not be empty")
        if (j := seen.setdefault(job.id, i)) != i:
            raise InvalidRequestError(f"pending[{i}].id", f"{job.id!r} duplicates pending[{j}].id")
        if job.gpus == 0:
            raise InvalidRequestError(f"pending[{i}].gpus", "must be at least 1")
        if not math.isfinite(job.submit_time_s):
            raise InvalidRequestError(
                f"pending[{i}].submit_time_s", f"must be finite, got {job.submit_time_s}"
            )
        attained = job.attained_service_s
        if not (math.isfinite(attained) and attained >= 0):
            raise InvalidRequestError(
                f"pending[{i}].attained_service_s",
                f"must be finite and >= 0, got {attained}",
            )
