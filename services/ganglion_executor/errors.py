"""Errors the executor raises; the servicer maps each class to one gRPC status code."""

from __future__ import annotations


class ExecutorError(Exception):
    """Base of every error the executor reports to a caller."""


class InvalidArgumentError(ExecutorError):
    """A request value is malformed (``INVALID_ARGUMENT``); ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class StaleGenerationError(ExecutorError):
    """A plan older than the last applied one (``FAILED_PRECONDITION``)."""

    def __init__(self, requested: int, applied: int) -> None:
        super().__init__(f"generation {requested} is older than the applied generation {applied}")
        self.requested = requested
        self.applied = applied


class GpuBusyError(ExecutorError):
    """A plan gives a GPU that another live job holds (``FAILED_PRECONDITION``)."""

    def __init__(self, gpu: int, holder: str, job_id: str) -> None:
        super().__init__(f"GPU {gpu} asked for job {job_id!r} is held by job {holder!r}")
        self.gpu = gpu
        self.holder = holder
        self.job_id = job_id


class JobNotFoundError(ExecutorError):
    """No job with this id was ever applied on this host (``NOT_FOUND``)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} is not known on this host")
        self.job_id = job_id


class LedgerCorruptError(ExecutorError):
    """A ledger line other than the last cannot be read: refuse to guess the GPU table."""

    def __init__(self, path: str, line_no: int, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: unreadable ledger record ({reason})")
        self.path = path
        self.line_no = line_no
