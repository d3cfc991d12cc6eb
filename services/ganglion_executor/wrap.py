"""Job wrapper: runs a job's command, then records its exit status in an exit file.

``python wrap.py <exit_file> -- <command...>`` (or ``-m ganglion_executor.wrap``). The executor
starts every job through it, as the leader of a new process group. The exit file lets an
executor that restarted while the job ran learn the job's real exit code: the job is then not
its child, and the exit status of a non-child cannot be read any other way.

The wrapper ignores SIGTERM/SIGINT/SIGHUP itself: the executor signals the whole process group,
so the job gets them directly, and the wrapper must outlive the job to record how it ended.
The exit file is JSON ``{"exit_code", "time_s", "message"}``, written atomically (temporary
file, fsync, rename, fsync of the directory). ``exit_code`` is negative when the job was killed
by a signal; the wrapper then exits with 128 + that signal, as shells do.

Standard library only, and run with ``python -I`` by path: the job's environment
(``PYTHONPATH`` and friends) cannot break it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


def write_exit_file(path: Path, exit_code: int, message: str = "") -> None:
    body = json.dumps({"exit_code": exit_code, "time_s": time.time(), "message": message})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _ignore(signum: int, frame: object) -> None:
    """The process group delivers the signal to the job too; the wrapper waits for it."""


def run(exit_file: Path, command: list[str]) -> int:
    # A Python-level handler (not SIG_IGN) so the job does not inherit "ignored" across exec.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _ignore)
    try:
        child = subprocess.Popen(command)
    except FileNotFoundError as exc:
        msg = f"command not found: {command[0]!r} ({exc.strerror})"
        print(f"ganglion-wrap: {msg}", file=sys.stderr, flush=True)
        write_exit_file(exit_file, EXIT_NOT_FOUND, msg)
        return EXIT_NOT_FOUND
    except OSError as exc:
        msg = f"cannot execute {command[0]!r}: {exc.strerror}"
        print(f"ganglion-wrap: {msg}", file=sys.stderr, flush=True)
        write_exit_file(exit_file, EXIT_NOT_EXECUTABLE, msg)
        return EXIT_NOT_EXECUTABLE
    code = child.wait()
    message = f"killed by {_signal_name(-code)}" if code < 0 else ""
    write_exit_file(exit_file, code, message)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: wrap.py EXIT_FILE -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    return run(Path(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
