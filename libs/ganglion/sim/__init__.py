"""Trace-driven cluster simulator: the same ``Policy`` objects the decision service serves,
on a simulated cluster and clock."""

from ganglion.sim.cluster import ClusterSpec, ClusterSpecError
from ganglion.sim.engine import Request, SimConfig, Simulation, SimulationError
from ganglion.sim.result import Metrics, SimResult, TenantMetrics
from ganglion.sim.runner import RemotePolicy, resolve, simulate, simulate_remote

__all__ = [
    "ClusterSpec",
    "ClusterSpecError",
    "Metrics",
    "RemotePolicy",
    "Request",
    "SimConfig",
    "SimResult",
    "Simulation",
    "SimulationError",
    "TenantMetrics",
    "resolve",
    "simulate",
    "simulate_remote",
]
