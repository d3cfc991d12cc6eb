"""Scheduling policies behind one interface, looked up by name in one registry."""

from ganglion.policies import heuristics as _heuristics  # noqa: F401  (registers the built-ins)
from ganglion.policies.base import Policy, PolicyError, UnknownPolicyError, create, names, register
from ganglion.policies.placement import Fit, FreeMap

DEFAULT_POLICY = "best-fit"
FALLBACK_POLICY = "fifo"

__all__ = [
    "DEFAULT_POLICY",
    "FALLBACK_POLICY",
    "Fit",
    "FreeMap",
    "Policy",
    "PolicyError",
    "UnknownPolicyError",
    "create",
    "names",
    "register",
]
