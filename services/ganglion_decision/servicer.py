"""``DecisionService``: proto -> domain, the policy, domain -> proto. Nothing else.

Errors become gRPC status codes in one place, :func:`status_for`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import grpc

from ganglion import policies
from ganglion.convert import decision_to_proto
from ganglion.policies import Policy, UnknownPolicyError
from ganglion.v1 import decision_pb2, decision_pb2_grpc
from ganglion_decision.admin import ModelAdminServicer, model_status_for
from ganglion_decision.dataplane import DataplaneServicer
from ganglion_decision.models import ModelManager
from ganglion_decision.validation import (
    DEFAULT_LIMITS,
    InvalidRequestError,
    Limits,
    RequestTooLargeError,
    parse_schedule_request,
)

log = logging.getLogger(__name__)

SERVICE_NAME: str = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
"""``ganglion.v1.DecisionService``, as health and reflection name it."""

OFFLOAD_WORK = 50_000
"""Pending jobs x hosts above which a request is decided on a worker thread (see Schedule)."""

_UNKNOWN = "(unknown)"  # stats key for unregistered names: clients must not grow the table


@dataclass
class PolicyStats:
    """Requests one policy answered (or failed), and how long they took."""

    requests: int = 0
    errors: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    @property
    def mean_s(self) -> float:
        return self.total_s / self.requests if self.requests else 0.0


class DecisionStats:
    """Per-policy request counts and latency, in memory (a metrics exporter reads snapshots)."""

    def __init__(self) -> None:
        self._by_policy: dict[str, PolicyStats] = {}

    def record(self, policy: str, seconds: float, ok: bool) -> None:
        s = self._by_policy.setdefault(policy, PolicyStats())
        s.requests += 1
        s.errors += 0 if ok else 1
        s.total_s += seconds
        s.max_s = max(s.max_s, seconds)

    def snapshot(self) -> dict[str, PolicyStats]:
        return {name: replace(s) for name, s in self._by_policy.items()}


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and details a failed Schedule answers with."""
    if isinstance(exc, RequestTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, UnknownPolicyError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"policy: {exc}"
    mapped = model_status_for(exc)  # learned models: unknown version, refused artefact
    if mapped is not None:
        return mapped
    # Anything else is a bug in a policy or here, not the caller's fault; keep internals out.
    return grpc.StatusCode.INTERNAL, f"decision failed: {type(exc).__name__}"


class DecisionServicer(
    ModelAdminServicer, DataplaneServicer, decision_pb2_grpc.DecisionServiceServicer
):
    """Stateless apart from a cache of policy instances (policies are pure) and stats.

    SizeCaches and TuneTransport come from :class:`DataplaneServicer`; learned policies
    (``rl``, ``rl:N``) and the model admin RPCs from :class:`ModelAdminServicer`."""

    def __init__(
        self,
        default_policy: str = policies.DEFAULT_POLICY,
        limits: Limits = DEFAULT_LIMITS,
        offload_work: int = OFFLOAD_WORK,
        models: ModelManager | None = None,
        shared_port: bool = False,
    ) -> None:
        self.models = models
        self.shared_port = shared_port
        self._policies: dict[str, Policy] = {}
        self._limits = limits
        self._offload_work = offload_work
        self.default_policy = default_policy
        self._policy(default_policy)  # an unknown default fails at startup, not per request
        self.stats = DecisionStats()

    def _policy(self, name: str) -> Policy:
        # A benign race when two worker threads miss at once: both create, one is kept.
        policy = self._policies.get(name)
        if policy is None:
            policy = self._policies[name] = policies.create(name)
        return policy

    def decide(self, request: decision_pb2.ScheduleRequest) -> decision_pb2.ScheduleResponse:
        """Validate, translate, run the policy, translate back. Raises; see :func:`status_for`."""
        # A name this servicer made a policy for is registered: the registry's sorted list
        # (for the error that names them all) is needed only for another name.
        name = request.policy
        known = policies.names() if name and name not in self._policies else self._policies
        state, pending = parse_schedule_request(request, known, self._limits)
        policy = self._policy(name or self.default_policy)
        return decision_to_proto(policy.schedule(state, pending))

    async def Schedule(
        self,
        request: decision_pb2.ScheduleRequest,
        context: grpc.aio.ServicerContext[
            decision_pb2.ScheduleRequest, decision_pb2.ScheduleResponse
        ],
    ) -> decision_pb2.ScheduleResponse:
        # Inline on the event loop: the heuristics take well under a millisecond on clusters of
        # tens of hosts, and a thread hop (plus the GIL) would only add latency. Their cost grows
        # with pending jobs x hosts (~0.3 s for 1,000 x 1,000), so past OFFLOAD_WORK a worker
        # thread decides, and the loop keeps answering health checks and small requests.
        name = request.policy or self.default_policy
        started = time.perf_counter()
        try:
            if self.routes_to_models(name):
                response = await self.schedule_learned(request, name)
            elif len(request.pending) * max(len(request.cluster.hosts), 1) > self._offload_work:
                response = await asyncio.to_thread(self.decide, request)
            else:
                response = self.decide(request)
        except Exception as exc:
            self.stats.record(self._stats_key(name), time.perf_counter() - started, ok=False)
            code, details = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("schedule failed", extra={"policy": name})
            else:
                log.debug(
                    "schedule rejected",
                    extra={"policy": name, "code": code.name, "details": details},
                )
            await context.abort(code, details)
        self.stats.record(name, time.perf_counter() - started, ok=True)
        return response

    def _stats_key(self, name: str) -> str:
        known = name in self._policies or name in self.known_policy_names()
        return name if known else _UNKNOWN
