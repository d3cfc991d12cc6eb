"""The Python SDK for jobs: ``Scheduler(gpus=[...]).allocate()`` / ``.update()``.

Names are loaded on first use (PEP 562): ``python -m ganglion.sdk.holder`` imports this package
and must not pay for grpc, numpy or the policies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ganglion.sdk.errors import (
        AllocationError,
        AllocationTimeout,
        SchedulerClosedError,
        SdkError,
        StateFileError,
    )
    from ganglion.sdk.lease import Lease
    from ganglion.sdk.metrics import (
        JobMetricsRecord,
        MetricsBook,
        follow_job_metrics,
        latest_metrics,
        read_metrics_file,
    )
    from ganglion.sdk.scheduler import Mode, Scheduler, SchedulerConfig

_EXPORTS = {
    "AllocationError": "ganglion.sdk.errors",
    "AllocationTimeout": "ganglion.sdk.errors",
    "SchedulerClosedError": "ganglion.sdk.errors",
    "SdkError": "ganglion.sdk.errors",
    "StateFileError": "ganglion.sdk.errors",
    "Lease": "ganglion.sdk.lease",
    "JobMetricsRecord": "ganglion.sdk.metrics",
    "MetricsBook": "ganglion.sdk.metrics",
    "follow_job_metrics": "ganglion.sdk.metrics",
    "latest_metrics": "ganglion.sdk.metrics",
    "read_metrics_file": "ganglion.sdk.metrics",
    "Mode": "ganglion.sdk.scheduler",
    "Scheduler": "ganglion.sdk.scheduler",
    "SchedulerConfig": "ganglion.sdk.scheduler",
}

__all__ = [
    "AllocationError",
    "AllocationTimeout",
    "JobMetricsRecord",
    "Lease",
    "MetricsBook",
    "Mode",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerConfig",
    "SdkError",
    "StateFileError",
    "follow_job_metrics",
    "latest_metrics",
    "read_metrics_file",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ganglion.sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
