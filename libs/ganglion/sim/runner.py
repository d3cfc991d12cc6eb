"""Drive a :class:`Simulation` with an in-process policy or a live decision service.

Both paths send the same ``ClusterState``/``Job`` values; the remote one goes through the
protobuf conversion and gRPC exactly as the controller does (``DecisionService.Schedule``,
the policy named in the request), so a parity test can compare the two placement logs.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ganglion import policies, rpc
from ganglion.convert import decision_from_proto, job_to_proto, state_to_proto
from ganglion.domain import ClusterState, Decision, Job
from ganglion.policies import Policy
from ganglion.policies.priority import PreemptivePolicy
from ganglion.sim.cluster import ClusterSpec
from ganglion.sim.engine import ProgressFn, SimConfig, Simulation
from ganglion.sim.result import SimResult
from ganglion.traces import Trace
from ganglion.v1 import decision_pb2, decision_pb2_grpc

REMOTE_DEADLINE_S = 30.0
"""Per-Schedule deadline on the parity path (large queues take a while to serialise)."""


def resolve(config: SimConfig, policy: Policy | None) -> SimConfig:
    """Fill in what the policy says about itself: whether it preempts, and its quantum
    (an explicit ``config.quantum_s`` wins)."""
    if not isinstance(policy, PreemptivePolicy):
        return config
    quantum = config.quantum_s if config.quantum_s is not None else policy.quantum_s
    return replace(config, preemptive=True, quantum_s=quantum)


def seed_everything(seed: int) -> None:
    """Seed the global generators a policy might draw from (Python, numpy, torch if loaded)."""
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def simulate(
    trace: Trace,
    cluster: ClusterSpec,
    policy: Policy,
    config: SimConfig | None = None,
    progress: ProgressFn | None = None,
) -> SimResult:
    """Run ``trace`` on ``cluster`` with an in-process ``policy``."""
    config = config or SimConfig()
    seed_everything(config.seed)
    sim = Simulation(
        trace, cluster, resolve(config, policy), policy_name=policy.name, progress=progress
    )
    while (request := sim.next_request()) is not None:
        sim.apply(policy.schedule(request.state, request.pending))
    return sim.result()


class RemotePolicy:
    """``DecisionService.Schedule`` behind an async ``schedule`` (the parity path)."""

    def __init__(
        self,
        stub: decision_pb2_grpc.DecisionServiceAsyncStub,
        name: str,
        deadline_s: float = REMOTE_DEADLINE_S,
    ) -> None:
        self.stub = stub
        self.name = name
        self.deadline_s = deadline_s

    async def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        request = decision_pb2.ScheduleRequest(
            cluster=state_to_proto(state),
            pending=[job_to_proto(j) for j in pending],
            policy=self.name,
        )
        response = await self.stub.Schedule(request, timeout=self.deadline_s)
        return decision_from_proto(response)


async def simulate_remote(
    trace: Trace,
    cluster: ClusterSpec,
    address: str,
    policy_name: str,
    config: SimConfig | None = None,
    progress: ProgressFn | None = None,
) -> SimResult:
    """Run ``trace`` with every decision made by the decision service at ``address``.

    Preemption and quantum come from the locally registered policy of the same name (the
    client and the service share this library); an unknown name runs event-driven.
    """
    config = config or SimConfig()
    local = policies.create(policy_name) if policy_name in policies.names() else None
    seed_everything(config.seed)
    sim = Simulation(
        trace, cluster, resolve(config, local), policy_name=policy_name, progress=progress
    )
    async with rpc.channel(address) as channel:
        remote = RemotePolicy(decision_pb2_grpc.DecisionServiceStub(channel), policy_name)
        while (request := sim.next_request()) is not None:
            sim.apply(await remote.schedule(request.state, request.pending))
    return sim.result()
