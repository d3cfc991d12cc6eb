"""Typed values the executor core takes and returns (the servicer translates them to proto)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ganglion.domain import Job, JobState


@dataclass(frozen=True)
class Assignment:
    """One job of a plan and the GPUs it gets on this host."""

    job: Job
    """The job (id, command, env, tenant)."""
    gpu_indices: tuple[int, ...]
    """Device indices on this host."""


@dataclass(frozen=True)
class ApplyResult:
    """What an Apply did."""

    generation: int
    """The generation now applied."""
    started: tuple[str, ...]
    """Jobs started by this call (a job whose command could not start is here too; its FAILED
    event says why)."""
    known: tuple[str, ...]
    """Jobs of the plan already known (running or finished): not started again."""


@dataclass(frozen=True)
class JobView:
    """A job as this executor last saw it."""

    job_id: str
    """The job."""
    state: JobState
    """SCHEDULED (allocated, not yet started), RUNNING, SUCCEEDED, FAILED or PREEMPTED."""
    gpu_indices: tuple[int, ...]
    """Device indices it holds (or held)."""
    pid: int
    """Pid of its process group leader (the wrapper); 0 when it never started."""
    exit_code: int
    """Exit status once finished (negative: killed by that signal; -1: unknown)."""
    start_time_s: float
    """Unix seconds of the start; 0 when it never started."""
    end_time_s: float
    """Unix seconds of the end; 0 while it runs."""
    log_path: str
    """Its stdout and stderr."""
    message: str = ""
    """Why it ended, when the exit code alone does not say."""

    @property
    def change_time_s(self) -> float:
        """When the job entered its current state."""
        return self.end_time_s or self.start_time_s


@dataclass(frozen=True)
class ExecutorStatus:
    """Everything Status reports."""

    host: str
    """This executor's host."""
    generation: int
    """Last applied plan generation."""
    gpu_count: int
    """GPUs on this host."""
    jobs: tuple[JobView, ...]
    """Every job this executor knows, in allocation order."""


class EventSink(Protocol):
    """Where job state changes go (the NATS outbox in production)."""

    def publish(self, view: JobView) -> None:
        """Queue an event for ``view``; must not block. Called inside the span that caused it."""
