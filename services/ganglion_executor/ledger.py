"""The durable, append-only ledger of what this executor allocated, started and saw finish.

One JSON object per line in ``<state_dir>/ledger.jsonl``. Every append is fsync'd before the
caller acts on it (an ``allocated`` record before its process is started), so after a crash the
ledger names every job that may hold a GPU. Replay tolerates a torn last line (a crash in the
middle of a write): it is logged and cut off. An unreadable line anywhere else is corruption
and stops the executor, because guessing would risk giving one GPU to two jobs.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ganglion.domain import JobState
from ganglion_executor.errors import LedgerCorruptError

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"


@dataclass(frozen=True)
class GenerationRecord:
    """A plan generation was applied."""

    generation: int
    """The plan's generation."""
    time_s: float
    """Unix seconds when it was applied."""


@dataclass(frozen=True)
class AllocatedRecord:
    """GPUs were given to a job; written before its process starts."""

    job_id: str
    """The job."""
    gpu_indices: tuple[int, ...]
    """Device indices on this host."""
    command: tuple[str, ...]
    """argv of the job."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of the job."""
    tenant: str = ""
    """Who the job belongs to."""
    time_s: float = 0.0
    """Unix seconds of the allocation."""


@dataclass(frozen=True)
class StartedRecord:
    """The job's process exists."""

    job_id: str
    """The job."""
    pid: int
    """Pid of the job's wrapper, which leads the job's process group."""
    start_ticks: int
    """Field 22 of ``/proc/<pid>/stat``: tells this process from a later one with its pid."""
    time_s: float
    """Unix seconds of the start."""


@dataclass(frozen=True)
class FinishedRecord:
    """The job reached its final state on this host."""

    job_id: str
    """The job."""
    state: JobState
    """SUCCEEDED, FAILED or PREEMPTED."""
    exit_code: int
    """Exit status (negative: killed by that signal; -1: unknown)."""
    time_s: float
    """Unix seconds of the end."""
    message: str = ""
    """Why, when the exit code alone does not say."""


Record = GenerationRecord | AllocatedRecord | StartedRecord | FinishedRecord


@dataclass
class JobHistory:
    """What the ledger says about one job."""

    allocated: AllocatedRecord
    started: StartedRecord | None = None
    finished: FinishedRecord | None = None


@dataclass(frozen=True)
class Replay:
    """The ledger's content after replay."""

    generation: int
    """Last applied generation (0: none yet)."""
    jobs: dict[str, JobHistory]
    """Every job ever allocated, in allocation order."""
    repaired: bool
    """True when the end of the file was repaired (torn last line cut off, or newline added)."""


def encode(record: Record) -> bytes:
    body: dict[str, Any]
    match record:
        case GenerationRecord():
            body = {"type": "generation", "generation": record.generation, "time_s": record.time_s}
        case AllocatedRecord():
            body = {
                "type": "allocated",
                "job_id": record.job_id,
                "gpu_indices": list(record.gpu_indices),
                "command": list(record.command),
                "env": dict(record.env),
                "tenant": record.tenant,
                "time_s": record.time_s,
            }
        case StartedRecord():
            body = {
                "type": "started",
                "job_id": record.job_id,
                "pid": record.pid,
                "start_ticks": record.start_ticks,
                "time_s": record.time_s,
            }
        case FinishedRecord():
            body = {
                "type": "finished",
                "job_id": record.job_id,
                "state": record.state.name,
                "exit_code": record.exit_code,
                "time_s": record.time_s,
                "message": record.message,
            }
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> Record:
    """One record; raises ValueError (or KeyError/TypeError) on anything malformed."""
    d = json.loads(line)
    kind = d["type"]
    if kind == "generation":
        return GenerationRecord(int(d["generation"]), float(d["time_s"]))
    if kind == "allocated":
        env = d["env"]
        if not isinstance(env, dict):
            raise TypeError("env is not an object")
        return AllocatedRecord(
            job_id=str(d["job_id"]),
            gpu_indices=tuple(int(i) for i in d["gpu_indices"]),
            command=tuple(str(c) for c in d["command"]),
            env={str(k): str(v) for k, v in env.items()},
            tenant=str(d["tenant"]),
            time_s=float(d["time_s"]),
        )
    if kind == "started":
        return StartedRecord(
            str(d["job_id"]), int(d["pid"]), int(d["start_ticks"]), float(d["time_s"])
        )
    if kind == "finished":
        return FinishedRecord(
            job_id=str(d["job_id"]),
            state=JobState[d["state"]],
            exit_code=int(d["exit_code"]),
            time_s=float(d["time_s"]),
            message=str(d["message"]),
        )
    raise ValueError(f"unknown record type {kind!r}")


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a created or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> tuple[list[Record], int, bool]:
    """Records, the byte length to keep, and whether the last line was torn.

    A kept length beyond the last newline means the final record is whole but lacks its
    newline (the crash fell between the two): the caller adds it.
    """
    data = path.read_bytes()
    *terminated, tail = data.split(b"\n")
    records: list[Record] = []
    offset = 0
    for no, raw in enumerate(terminated, start=1):
        try:
            records.append(decode(raw))
        except (ValueError, KeyError, TypeError) as exc:
            if no == len(terminated) and not tail:
                log.warning(
                    "ledger: ignoring torn last line %d (%s)", no, exc, extra={"path": str(path)}
                )
                return records, offset, True
            raise LedgerCorruptError(str(path), no, str(exc)) from exc
        offset += len(raw) + 1
    if tail:
        try:
            records.append(decode(tail))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "ledger: ignoring torn last line %d (%s)",
                len(terminated) + 1,
                exc,
                extra={"path": str(path)},
            )
            return records, offset, True
        return records, offset + len(tail), True
    return records, offset, False


def replay(records: list[Record], torn: bool) -> Replay:
    generation = 0
    jobs: dict[str, JobHistory] = {}
    for r in records:
        match r:
            case GenerationRecord():
                generation = max(generation, r.generation)
            case AllocatedRecord():
                if r.job_id in jobs:
                    log.warning("ledger: job %s allocated twice; keeping the first", r.job_id)
                    continue
                jobs[r.job_id] = JobHistory(r)
            case StartedRecord() | FinishedRecord():
                hist = jobs.get(r.job_id)
                if hist is None:
                    log.warning(
                        "ledger: %s record for unallocated job %s ignored",
                        type(r).__name__,
                        r.job_id,
                    )
                elif isinstance(r, StartedRecord):
                    hist.started = r
                else:
                    hist.finished = r
    return Replay(generation, jobs, torn)


class StateDirInUseError(OSError):
    """Another process holds this state directory's ledger."""


def _lock(fd: int, state_dir: Path) -> None:
    """Hold the ledger for the life of this executor: a second executor on the same state
    directory would replay, truncate and append to the same ledger and evict the first one's
    cache files. The lock goes with the process, even on SIGKILL."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirInUseError(
            f"{state_dir} is in use by another executor (its ledger is locked): give each "
            "executor its own --state-dir"
        ) from None


class Ledger:
    """Appends records durably; thread-safe so appends can run off the event loop."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> tuple[Ledger, Replay]:
        """Open (creating if needed) the ledger in ``state_dir`` and replay it."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LEDGER_FILE
        records: list[Record] = []
        torn = False
        if path.exists():
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            _lock(fd, state_dir)
            records, good, torn = _read(path)
            size = os.fstat(fd).st_size
            if good < size:
                os.ftruncate(fd, good)
            elif torn:  # the last record lacked only its newline
                os.write(fd, b"\n")
            if torn:
                os.fsync(fd)
        else:
            fd = os.open(
                path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
            _lock(fd, state_dir)
            os.fsync(fd)
            fsync_dir(state_dir)
        state = replay(records, torn)
        log.info(
            "ledger replayed",
            extra={
                "path": str(path),
                "records": len(records),
                "jobs": len(state.jobs),
                "generation": state.generation,
            },
        )
        return cls(path, fd), state

    def append(self, record: Record) -> None:
        """Write one record and fsync it; returns only once it is on disk."""
        line = encode(record)
        with self._lock:
            if self._fd < 0:
                raise RuntimeError("ledger is closed")
            written = os.write(self._fd, line)
            if written != len(line):  # O_APPEND regular files write fully or raise; be sure
                raise OSError(f"short ledger write: {written} of {len(line)} bytes")
            os.fsync(self._fd)

    async def append_async(self, record: Record) -> None:
        """:meth:`append` in a worker thread, so an fsync never stalls the event loop."""
        await asyncio.to_thread(self.append, record)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
