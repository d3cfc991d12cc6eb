"""The SDK's errors: a small hierarchy with typed fields.

Bad arguments are plain ``ValueError`` (or ``TypeError`` for a wrong type), raised before
anything is requested. Everything that goes wrong while asking for GPUs is an
:class:`AllocationError`; running out of time is :class:`AllocationTimeout`, which is also a
builtin ``TimeoutError`` so ``except TimeoutError`` works as users expect.
"""

from __future__ import annotations


class SdkError(Exception):
    """Base of the SDK's errors."""


class AllocationError(SdkError):
    """GPUs could not be granted (the request failed, the cluster refused it, the lease died)."""

    def __init__(self, message: str, lease_id: str = "") -> None:
        super().__init__(message)
        self.lease_id = lease_id
        """The lease (controller job id in cluster mode) the error is about; empty if none."""


class AllocationTimeout(AllocationError, TimeoutError):
    """No GPUs were granted within the timeout; nothing is held and the request is withdrawn."""

    def __init__(self, gpus: int, timeout_s: float, lease_id: str = "", detail: str = "") -> None:
        message = f"no {gpus} GPU(s) granted within {timeout_s:g}s"
        super().__init__(f"{message}: {detail}" if detail else message, lease_id)
        self.gpus = gpus
        """How many GPUs were asked."""
        self.timeout_s = timeout_s
        """How long the call waited."""


class SchedulerClosedError(SdkError, RuntimeError):
    """The scheduler was closed: it allocates, updates and releases nothing more (a
    ``RuntimeError`` too, as before it had a type of its own)."""

    def __init__(self) -> None:
        super().__init__("the scheduler is closed")


class StateFileError(SdkError):
    """The embedded scheduler's state file cannot be used (unreadable, newer format)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        """The state file."""
