"""The embedded scheduler's shared state: one JSON file per host, guarded by ``flock``.

Why a lock-protected file rather than a local daemon: every process that allocates reads and
rewrites the whole state inside one exclusive ``flock`` on ``state.lock``, so there is nothing to
start, supervise or restart, no socket or port, and no second copy of the truth that could
disagree. The kernel drops a ``flock`` when its holder dies, so a process killed in the middle
of an update can never wedge the others, and the state is replaced by ``rename`` so it is never
half-written. The cost is that a waiting process polls instead of being woken; see
:mod:`ganglion.sdk.embedded` for the backoff.

Leases name their holder by pid *and* the process start time (``/proc/<pid>/stat`` field 22),
so a dead holder, or a recycled pid that now belongs to another process, frees its GPUs on the
next allocation by anyone. There is no fsync: the file lives in ``$XDG_RUNTIME_DIR`` (tmpfs,
cleared at boot) and only describes processes that a power loss would kill anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ganglion.procfs import proc_info
from ganglion.sdk.errors import StateFileError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENV_STATE_DIR = "GANGLION_SDK_STATE_DIR"
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
METRICS_FILE = "metrics.jsonl"


def default_state_dir() -> Path:
    """``$GANGLION_SDK_STATE_DIR``, else ``$XDG_RUNTIME_DIR/ganglion``, else a per-user /tmp dir."""
    if explicit := os.environ.get(ENV_STATE_DIR):
        return Path(explicit)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "ganglion"
    return Path(tempfile.gettempdir()) / f"ganglion-{os.getuid()}"


def proc_start_ticks(pid: int) -> int | None:
    """Start time (clock ticks after boot) of a live process; None if gone or a zombie."""
    info = proc_info(pid)
    return info.start_ticks if info is not None and info.running else None


def pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]``); empty when unreadable."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    """The process a lease or a wait belongs to."""

    pid: int
    """Process id."""
    start_ticks: int
    """Its start time; tells a recycled pid from the original process."""
    pid_ns: str = ""
    """Its pid namespace: pids of another namespace (a container sharing the state dir)
    cannot be checked from here."""

    @classmethod
    def current(cls) -> Holder:
        pid = os.getpid()
        ticks = proc_start_ticks(pid)
        if ticks is None:
            raise StateFileError(f"/proc/{pid}/stat", "cannot read this process's start time")
        return cls(pid, ticks, pid_namespace())

    def alive(self) -> bool:
        if self.pid_ns and self.pid_ns != pid_namespace():
            # Not ours to judge: freeing a live holder's GPUs would double-book them, so a
            # lease from another namespace ends only by release.
            return True
        return proc_start_ticks(self.pid) == self.start_ticks


@dataclass(frozen=True)
class LeaseRecord:
    """GPUs granted to one process."""

    id: str
    """Lease id."""
    job_id: str
    """The job (Scheduler) the lease belongs to."""
    tenant: str
    """Who asked."""
    gpus: tuple[int, ...]
    """Granted GPU ids."""
    holder: Holder
    """The process holding them."""
    submit_s: float
    """When the request was first queued (unix seconds)."""
    granted_s: float
    """When it was granted."""
    priority: int = 0
    """The request's priority."""


@dataclass(frozen=True)
class WaitRecord:
    """A request that is waiting for GPUs; policies see all of them to order the queue."""

    id: str
    """The lease id it will get."""
    job_id: str
    """The job (Scheduler) asking."""
    tenant: str
    """Who asks."""
    gpus: int
    """How many GPUs."""
    pool: tuple[int, ...]
    """The GPU ids the asking Scheduler was given; requests queue per pool."""
    holder: Holder
    """The waiting process."""
    submit_s: float
    """First time it asked (unix seconds): its place in the queue."""
    seen_s: float
    """Last time it asked; a wait not renewed for a while was abandoned."""
    priority: int = 0
    """Higher first, where the policy honours priority."""


@dataclass
class HostState:
    """The state as read inside the lock; mutated in place, written back on exit."""

    leases: list[LeaseRecord] = field(default_factory=list)
    waiting: list[WaitRecord] = field(default_factory=list)

    def held_gpus(self) -> set[int]:
        return {g for lease in self.leases for g in lease.gpus}

    def prune(self, now_s: float, wait_stale_s: float) -> None:
        """Drop leases of dead processes and waits that are dead or abandoned."""
        live = []
        for lease in self.leases:
            if lease.holder.alive():
                live.append(lease)
            else:
                log.info(
                    "freed GPUs %s of lease %s: holder pid %d is gone",
                    list(lease.gpus),
                    lease.id,
                    lease.holder.pid,
                    extra={"lease": lease.id, "job": lease.job_id},
                )
        self.leases = live
        self.waiting = [
            w for w in self.waiting if now_s - w.seen_s <= wait_stale_s and w.holder.alive()
        ]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "leases": [_lease_to_dict(lease) for lease in self.leases],
                "waiting": [_wait_to_dict(w) for w in self.waiting],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, path: str) -> HostState:
        if not text.strip():
            return cls()
        try:
            raw = json.loads(text)
            version = int(raw.get("version", 0))
            if version > FORMAT_VERSION:
                raise StateFileError(
                    path, f"format {version} is newer than this SDK ({FORMAT_VERSION})"
                )
            return cls(
                leases=[_lease_from_dict(d) for d in raw.get("leases", [])],
                waiting=[_wait_from_dict(d) for d in raw.get("waiting", [])],
            )
        except StateFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateFileError(
                path, f"unreadable state ({exc}); delete it if no job holds GPUs"
            ) from exc


def _holder_to_dict(h: Holder) -> dict[str, Any]:
    return {"pid": h.pid, "start_ticks": h.start_ticks, "pid_ns": h.pid_ns}


def _holder_from_dict(d: dict[str, Any]) -> Holder:
    return Holder(int(d["pid"]), int(d["start_ticks"]), str(d.get("pid_ns", "")))


def _lease_to_dict(r: LeaseRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "job_id": r.job_id,
        "tenant": r.tenant,
        "gpus": list(r.gpus),
        "holder": _holder_to_dict(r.holder),
        "submit_s": r.submit_s,
        "granted_s": r.granted_s,
        "priority": r.priority,
    }


def _lease_from_dict(d: dict[str, Any]) -> LeaseRecord:
    return LeaseRecord(
        id=str(d["id"]),
        job_id=str(d["job_id"]),
        tenant=str(d["tenant"]),
        gpus=tuple(int(g) for g in d["gpus"]),
        holder=_holder_from_dict(d["holder"]),
        submit_s=float(d["submit_s"]),
        granted_s=float(d["granted_s"]),
        priority=int(d.get("priority", 0)),
    )


def _wait_to_dict(w: WaitRecord) -> dict[str, Any]:
    return {
        "id": w.id,
        "job_id": w.job_id,
        "tenant": w.tenant,
        "gpus": w.gpus,
        "pool": list(w.pool),
        "holder": _holder_to_dict(w.holder),
        "submit_s": w.submit_s,
        "seen_s": w.seen_s,
        "priority": w.priority,
    }


def _wait_from_dict(d: dict[str, Any]) -> WaitRecord:
    return WaitRecord(
        id=str(d["id"]),
        job_id=str(d["job_id"]),
        tenant=str(d["tenant"]),
        gpus=int(d["gpus"]),
        pool=tuple(int(g) for g in d["pool"]),
        holder=_holder_from_dict(d["holder"]),
        submit_s=float(d["submit_s"]),
        seen_s=float(d["seen_s"]),
        priority=int(d.get("priority", 0)),
    )


class StateStore:
    """The state file and its lock in one directory (created 0700 if missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.lock_path = directory / LOCK_FILE
        self.metrics_path = directory / METRICS_FILE
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive ``flock`` on the lock file (a stable inode: the state file is renamed)."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[HostState]:
        """Read the state under the lock; write it back (atomically) if the block changed it."""
        with self.lock():
            try:
                before = self.path.read_text()
            except FileNotFoundError:
                before = ""
            state = HostState.from_json(before, str(self.path))
            yield state
            after = state.to_json()
            if after != before:
                self._write(after)

    def read(self) -> HostState:
        """A consistent snapshot (for inspection and tests); writes nothing."""
        with self.lock():
            try:
                return HostState.from_json(self.path.read_text(), str(self.path))
            except FileNotFoundError:
                return HostState()

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
