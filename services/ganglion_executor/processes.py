"""Job processes: start through the wrapper, watch, signal the group, re-adopt after a restart.

Jobs are started with ``os.posix_spawn`` rather than ``asyncio.create_subprocess_exec``: an
asyncio subprocess transport kills its child when it is closed (as it is when the loop shuts
down), and a job must outlive a graceful executor shutdown so the next executor can re-adopt
it. Exit is detected by polling (``waitpid(WNOHANG)`` for our children, ``/proc`` for adopted
ones), one mechanism for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ganglion.procfs import proc_info

log = logging.getLogger(__name__)

WRAPPER = Path(__file__).with_name("wrap.py")
EXIT_UNKNOWN = -1


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def is_alive(pid: int, start_ticks: int) -> bool:
    """True when ``pid`` is still the process that started at ``start_ticks`` and not a zombie."""
    info = proc_info(pid)
    return info is not None and info.running and info.start_ticks == start_ticks


def find_wrapper(job_id: str, host: str) -> tuple[int, int] | None:
    """(pid, start ticks) of a live wrapper started for ``job_id`` by this host's executor.

    Needed when the executor died between starting a job and recording its pid: the ledger then
    says "allocated" only, but the job may be running on its GPUs. The wrapper leads its own
    process group and carries ``GANGLION_JOB_ID``/``GANGLION_HOST`` in its environment.
    """
    for pid in _job_pids(job_id, host):
        info = proc_info(pid)
        if info is not None and info.running and info.pgrp == pid:
            return pid, info.start_ticks
    return None


def kill_leftovers(job_id: str, host: str) -> int:
    """SIGKILL every process still running for ``job_id`` (by its environment) after its
    wrapper is gone; returns how many. A restarted executor calls it before it frees a job's
    GPUs: the wrapper's group sweep (:meth:`JobProcess.watch`) did not run while it was down."""
    killed = 0
    for pid in _job_pids(job_id, host):
        info = proc_info(pid)
        if info is None or not info.running:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _job_pids(job_id: str, host: str) -> Iterator[int]:
    """Processes whose environment says this host's executor started them for ``job_id``."""
    want = {f"GANGLION_JOB_ID={job_id}".encode(), f"GANGLION_HOST={host}".encode()}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = set(Path(f"/proc/{name}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue  # gone, or another user's process
        if want <= environ:
            yield int(name)


@dataclass(frozen=True)
class ExitStatus:
    """How a job process ended."""

    exit_code: int
    """Exit code; negative: killed by that signal; -1: unknown."""
    time_s: float
    """Unix seconds of the end (as near as known)."""
    message: str = ""
    """Why, when the code alone does not say."""


def read_exit_file(path: Path) -> ExitStatus | None:
    """The status the wrapper recorded, None when it wrote none (killed, or never ran)."""
    try:
        d = json.loads(path.read_bytes())
        return ExitStatus(int(d["exit_code"]), float(d["time_s"]), str(d.get("message", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable exit file %s: %s", path, exc)
        return None


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one job."""

    job_id: str
    """The job."""
    host: str
    """This executor's host (``GANGLION_HOST``)."""
    command: tuple[str, ...]
    """argv of the job."""
    env: Mapping[str, str]
    """Extra environment of the job (over the executor's own)."""
    visible_devices: str
    """``CUDA_VISIBLE_DEVICES`` for its GPUs."""
    log_path: Path
    """File that receives its stdout and stderr (appended)."""
    exit_path: Path
    """Where the wrapper records its exit status."""


class SpawnError(Exception):
    """The job could not be started at all."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


class JobProcess:
    """A job's wrapper process (leader of the job's process group), child or adopted."""

    def __init__(
        self, pid: int, start_ticks: int, exit_path: Path, *, child: bool, poll_s: float
    ) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.exit_path = exit_path
        self.child = child
        self.poll_s = poll_s
        self.exited = asyncio.Event()
        self.status: ExitStatus | None = None

    def _poll(self) -> tuple[bool, int | None]:
        """(exited, exit code when it was our child and we reaped it)."""
        if self.child:
            try:
                # WNOWAIT: the exited wrapper stays a zombie, so its pid (the job's process
                # group id) cannot be reused while the group is swept below.
                exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                self.child = False  # reaped by someone else: watch it through /proc
            else:
                if exited is None:
                    return False, None
                self._sweep_group()
                _, wait_status = os.waitpid(self.pid, 0)
                return True, os.waitstatus_to_exitcode(wait_status)
        info = proc_info(self.pid)
        if info is not None and info.start_ticks == self.start_ticks:
            if info.running:
                return False, None
            self._sweep_group()  # a zombie still holds the pid: safe to signal its group
        return True, None

    def _sweep_group(self) -> None:
        """SIGKILL what the job left behind in its group: its GPUs are about to be reused."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def watch(self) -> ExitStatus:
        """Wait for the process to end; the exit file, when there is one, has the job's code."""
        while True:
            done, code = self._poll()
            if done:
                break
            await asyncio.sleep(self.poll_s)
        status = read_exit_file(self.exit_path)
        if status is None:
            if code is None:
                status = ExitStatus(
                    EXIT_UNKNOWN, time.time(), "exit status unknown: the wrapper left no exit file"
                )
            elif code < 0:
                status = ExitStatus(code, time.time(), f"killed by {signal_name(-code)}")
            else:
                status = ExitStatus(code, time.time(), "the wrapper left no exit file")
        self.status = status
        self.exited.set()
        return status

    def signal_group(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the job's process group; False when it is already gone."""
        if self.exited.is_set() or (not self.child and not is_alive(self.pid, self.start_ticks)):
            return False
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM the group, SIGKILL it after ``grace_s``; returns once it ended.

        Needs :meth:`watch` running in another task (it notices the exit).
        """
        if self.signal_group(signal.SIGTERM):
            log.info(
                "SIGTERM sent to job process group", extra={"pid": self.pid, "grace_s": grace_s}
            )
        try:
            await asyncio.wait_for(self.exited.wait(), grace_s)
        except TimeoutError:
            if self.signal_group(signal.SIGKILL):
                log.info("grace over: SIGKILL sent to job process group", extra={"pid": self.pid})
            await self.exited.wait()


def spawn(spec: LaunchSpec, poll_s: float) -> JobProcess:
    """Start ``spec.command`` through the wrapper in a new session; raises :class:`SpawnError`."""
    env = {
        **os.environ,
        **spec.env,
        "CUDA_VISIBLE_DEVICES": spec.visible_devices,
        "GANGLION_JOB_ID": spec.job_id,
        "GANGLION_HOST": spec.host,
    }
    # Checked here so a missing command is FAILED at once, with no RUNNING event; the wrapper
    # reports the same (exit 127) if the command vanishes in between.
    if shutil.which(spec.command[0], path=env.get("PATH", os.defpath)) is None:
        raise SpawnError(127, f"command not found or not executable: {spec.command[0]!r}")
    try:
        spec.exit_path.unlink(missing_ok=True)
    except OSError as exc:  # e.g. a name too long for the file system: FAILED, GPUs freed
        raise SpawnError(EXIT_UNKNOWN, f"cannot use {spec.exit_path}: {exc}") from exc
    argv = [sys.executable, "-I", str(WRAPPER), str(spec.exit_path), "--", *spec.command]
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(spec.log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        pid = os.posix_spawn(sys.executable, argv, env, file_actions=file_actions, setsid=True)
    except OSError as exc:
        raise SpawnError(EXIT_UNKNOWN, f"cannot start the job wrapper: {exc}") from exc
    info = proc_info(pid)  # our unreaped child: /proc/<pid> exists even if it already exited
    return JobProcess(
        pid, info.start_ticks if info else 0, spec.exit_path, child=True, poll_s=poll_s
    )


def adopt(pid: int, start_ticks: int, exit_path: Path, poll_s: float) -> JobProcess | None:
    """Watch a job started by an earlier executor; None when it is gone (or its pid reused)."""
    if not is_alive(pid, start_ticks):
        return None
    return JobProcess(pid, start_ticks, exit_path, child=False, poll_s=poll_s)
