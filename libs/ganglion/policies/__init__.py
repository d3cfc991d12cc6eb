"""Scheduling policies behind one interface, looked up by name in one registry."""

from ganglion.policies import gittins as _gittins  # noqa: F401  (registers gittins*)
from ganglion.policies import heuristics as _heuristics  # noqa: F401  (registers the built-ins)
from ganglion.policies import las as _las  # noqa: F401  (registers las*, tiresias*)
from ganglion.policies import rl as _rl  # noqa: F401  (registers rl, rl:N)
from ganglion.policies import srtf as _srtf  # noqa: F401  (registers srtf*, srgt*)
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
