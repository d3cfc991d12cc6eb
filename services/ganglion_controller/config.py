"""Controller configuration: flags, with defaults for a single-machine cluster."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ganglion.policies import FALLBACK_POLICY, names


@dataclass(frozen=True)
class ControllerConfig:
    port: int = 50071
    """gRPC port of JobService; 0 picks a free one (printed on stdout)."""
    bind: str = "127.0.0.1"
    """Address to bind."""
    decision_addr: str = ""
    """host:port of the decision service; empty means always use the fallback heuristic."""
    policy: str = ""
    """Policy to ask the decision service for; empty means its default."""
    deadline_s: float = 0.2
    """Deadline of one Schedule call; past it the controller decides with the fallback."""
    fallback_policy: str = FALLBACK_POLICY
    """Built-in heuristic used when the decision service is slow, down or unset."""
    interval_s: float = 0.5
    """Longest pause between scheduling rounds (submissions and job ends wake it sooner)."""
    host_stale_s: float = 15.0
    """A host whose executor has not refreshed its registration for this long gets no work."""
    apply_timeout_s: float = 5.0
    """Deadline of one Apply call to an executor."""


def _positive(value: str) -> float:
    f = float(value)
    if not f > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return f


def parse_args(argv: list[str] | None = None) -> ControllerConfig:
    d = ControllerConfig()
    p = argparse.ArgumentParser(
        prog="ganglion-controller", description="Job queue and the sense-decide-act loop."
    )
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0: a free one, printed)")
    p.add_argument("--bind", default=d.bind, help="address to bind (default %(default)s)")
    p.add_argument("--decision-addr", default=d.decision_addr, help="decision service host:port")
    p.add_argument("--policy", default=d.policy, help="policy to ask the decision service for")
    p.add_argument("--deadline", type=_positive, default=d.deadline_s, help="Schedule deadline, s")
    p.add_argument(
        "--fallback-policy", default=d.fallback_policy, choices=names(), help="built-in fallback"
    )
    p.add_argument(
        "--interval", type=_positive, default=d.interval_s, help="max seconds between rounds"
    )
    p.add_argument(
        "--host-stale", type=_positive, default=d.host_stale_s, help="host liveness window, s"
    )
    a = p.parse_args(argv)
    if not 0 <= a.port <= 65535:
        p.error(f"--port must be in 0..65535, got {a.port}")
    return ControllerConfig(
        port=a.port,
        bind=a.bind,
        decision_addr=a.decision_addr,
        policy=a.policy,
        deadline_s=a.deadline,
        fallback_policy=a.fallback_policy,
        interval_s=a.interval,
        host_stale_s=a.host_stale,
    )
