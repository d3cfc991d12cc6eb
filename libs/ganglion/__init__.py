"""Ganglion: sense -> decide -> act for GPU clusters.

``from ganglion import Scheduler`` (the job SDK, :mod:`ganglion.sdk`) is loaded on first use
(PEP 562), so ``import ganglion`` stays cheap: every job process imports ``ganglion.workload``
and must not pay for grpc or numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ganglion.sdk import AllocationError, Lease, Scheduler

__version__ = "0.1.0"

_SDK_EXPORTS = frozenset({"AllocationError", "Lease", "Scheduler"})

__all__ = ["AllocationError", "Lease", "Scheduler", "__version__"]


def __getattr__(name: str) -> object:
    if name in _SDK_EXPORTS:
        from ganglion import sdk

        value = getattr(sdk, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ganglion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SDK_EXPORTS})
