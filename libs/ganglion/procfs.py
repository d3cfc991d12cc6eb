"""``/proc/<pid>/stat``: process state, group and start time (stdlib only: cheap to import).

Shared by the executor (re-adopting jobs after a restart) and the SDK (lease holders): a pid
plus its start time identifies one process incarnation, so a recycled pid is never mistaken.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcInfo:
    """The parts of ``/proc/<pid>/stat`` Ganglion needs."""

    state: str
    """One letter: R, S, D, Z (zombie), X (dead), ..."""
    pgrp: int
    """Process group id."""
    start_ticks: int
    """Field 22: start time in clock ticks after boot, unique per pid incarnation."""

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def proc_info(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` of a process, None when there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields that follow start after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return ProcInfo(state=rest[0].decode(), pgrp=int(rest[2]), start_ticks=int(rest[19]))
