"""Job traces: the canonical CSV, importers for public traces, windows and load scaling.

The canonical trace is a CSV with the header ``job_id,submit_s,duration_s,num_gpus,tenant``
(``submit_s`` in seconds from the trace start), optionally ``priority``; any further column
is allowed and ignored. A first line ``# origin=<ISO datetime>`` records the wall-clock
start of the trace so that windows can be given as dates; it is optional.

Importers: ``philly`` (the Pollux-cleaned Microsoft Philly trace: ``timestamp,duration,
num_gpus,gpu_time,cluster``; tenant = ``cluster``), ``tiresias`` (the Tiresias simulator's
``job_id,num_gpu,submit_time,...,duration``) and ``csv`` (canonical). ``auto`` picks one from
the header. A malformed row raises :class:`TraceFormatError` naming file and line, unless
``skip_bad`` is set, in which case it is counted in :attr:`Trace.skipped`.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt

FORMATS = ("auto", "philly", "tiresias", "csv")
CANONICAL_HEADER = ("job_id", "submit_s", "duration_s", "num_gpus", "tenant")
DEFAULT_TENANT = "default"
DAY_S = 86_400.0
_ORIGIN = re.compile(r"^#\s*origin=(\S+)\s*$")


def traces_dir() -> Path:
    """``$GANGLION_TRACES`` or ``../shared/traces`` beside the repository."""
    env = os.environ.get("GANGLION_TRACES")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "traces"


class TraceError(Exception):
    """Base of trace errors."""


class TraceFormatError(TraceError, ValueError):
    """A malformed row or file; ``path`` and ``line`` (1-based, 0 for the whole file) say where."""

    def __init__(self, path: Path | str, line: int, problem: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class Row:
    """One job as read from a file, before sorting."""

    job_id: str
    """Unique id within the trace."""
    submit: float | datetime
    """Seconds from the trace start, or a wall-clock time (converted against the origin)."""
    duration_s: float
    """Run time in seconds when given all its GPUs."""
    num_gpus: int
    """GPUs asked (gang)."""
    tenant: str
    """Who submitted it (fairness is per tenant)."""
    priority: int = 0
    """Higher runs first where a policy honours priority."""


@dataclass(frozen=True, eq=False)
class Trace:
    """Jobs in submit order, one entry per job in each column."""

    job_id: tuple[str, ...]
    """Unique ids."""
    submit_s: npt.NDArray[np.float64]
    """Submit time, seconds from the trace (or window) start; non-decreasing."""
    duration_s: npt.NDArray[np.float64]
    """Run time in seconds on all its GPUs."""
    num_gpus: npt.NDArray[np.int32]
    """GPUs asked."""
    tenant: tuple[str, ...]
    """Tenant of each job."""
    priority: npt.NDArray[np.int32]
    """Priority of each job (0 by default)."""
    origin: datetime | None = None
    """Wall-clock time of ``submit_s == 0``, when known."""
    source: str = ""
    """Where it came from (file and transformations), for reports."""
    skipped: int = 0
    """Malformed rows left out (``skip_bad``)."""

    def __post_init__(self) -> None:
        n = len(self.job_id)
        for name in ("submit_s", "duration_s", "num_gpus", "tenant", "priority"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, job_id has {n}")
        if n > 1 and bool(np.any(np.diff(self.submit_s) < 0)):
            raise ValueError("submit_s must be sorted")

    def __len__(self) -> int:
        return len(self.job_id)

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last submission."""
        return float(self.submit_s[-1] - self.submit_s[0]) if len(self) else 0.0

    def select(self, mask: npt.NDArray[np.bool_], source: str) -> Trace:
        """The jobs where ``mask`` is true (order kept)."""
        idx = np.flatnonzero(mask)
        return Trace(
            tuple(self.job_id[i] for i in idx),
            self.submit_s[idx],
            self.duration_s[idx],
            self.num_gpus[idx],
            tuple(self.tenant[i] for i in idx),
            self.priority[idx],
            self.origin,
            source,
            self.skipped,
        )

    def head(self, n: int) -> Trace:
        """The first ``n`` jobs by submit time."""
        mask = np.zeros(len(self), dtype=bool)
        mask[:n] = True
        return self.select(mask, f"{self.source} first {n}")

    def window(self, window: Window) -> Trace:
        """Jobs submitted in ``[start, end)``, re-based so the window starts at 0."""
        start, end = window.resolve(self.origin)
        mask = (self.submit_s >= start) & (self.submit_s < end)
        out = self.select(mask, f"{self.source} window {window.text}")
        origin = self.origin + timedelta(seconds=start) if self.origin else None
        return Trace(
            out.job_id,
            out.submit_s - start,
            out.duration_s,
            out.num_gpus,
            out.tenant,
            out.priority,
            origin,
            out.source,
            out.skipped,
        )

    def scale_load(self, factor: float) -> Trace:
        """Arrival rate times ``factor``: inter-arrival times divided by it (durations kept)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"load scale must be a positive number, got {factor}")
        if factor == 1.0:
            return self
        return Trace(
            self.job_id,
            self.submit_s / factor,
            self.duration_s,
            self.num_gpus,
            self.tenant,
            self.priority,
            self.origin,
            f"{self.source} load x{factor:g}",
            self.skipped,
        )

    def write_csv(self, path: Path) -> None:
        """The canonical CSV (with an ``# origin=`` line when the origin is known)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            if self.origin is not None:
                f.write(f"# origin={self.origin.isoformat()}\n")
            w = csv.writer(f, lineterminator="\n")
            w.writerow([*CANONICAL_HEADER, "priority"])
            for i in range(len(self)):
                w.writerow(
                    [
                        self.job_id[i],
                        _num(float(self.submit_s[i])),
                        _num(float(self.duration_s[i])),
                        int(self.num_gpus[i]),
                        self.tenant[i],
                        int(self.priority[i]),
                    ]
                )


def _num(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


@dataclass(frozen=True)
class Window:
    """``START:END`` (or ``START..END``): days from the trace start, or ISO dates/times."""

    text: str
    """As given, for reports."""
    start: float | datetime
    """Days (float) or a wall-clock time."""
    end: float | datetime

    @classmethod
    def parse(cls, text: str) -> Window:
        """``7:14``, ``7.5..9``, ``2017-10-01:2017-10-15`` or ``2017-10-01T06:00..2017-10-02``."""
        parts = text.split("..") if ".." in text else text.split(":")
        if len(parts) != 2:
            raise ValueError(
                f"window {text!r}: expected START:END (days or YYYY-MM-DD), or START..END"
            )
        start, end = (_bound(p.strip(), text) for p in parts)
        if isinstance(start, float) != isinstance(end, float):
            raise ValueError(f"window {text!r}: give both bounds as days or both as dates")
        if start >= end:  # type: ignore[operator]  # same kind, checked above
            raise ValueError(f"window {text!r}: START must be before END")
        return cls(text, start, end)

    def resolve(self, origin: datetime | None) -> tuple[float, float]:
        """Seconds from the trace start."""
        if isinstance(self.start, float) and isinstance(self.end, float):
            return self.start * DAY_S, self.end * DAY_S
        if origin is None:
            raise TraceError(
                f"window {self.text!r} uses dates but the trace has no origin "
                "(use days from the trace start, or a trace with an '# origin=' line)"
            )
        assert isinstance(self.start, datetime) and isinstance(self.end, datetime)
        return (self.start - origin).total_seconds(), (self.end - origin).total_seconds()


def _bound(text: str, whole: str) -> float | datetime:
    try:
        days = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(days):
            raise ValueError(f"window {whole!r}: {text!r} is not a finite number of days")
        if days < 0:
            raise ValueError(f"window {whole!r}: days count from the trace start (0), got {text}")
        return days
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"window {whole!r}: {text!r} is neither days nor an ISO date") from None


RowParser = Callable[[dict[str, str], int], Row]
"""(row by column name, 1-based data row number) -> Row."""


def _philly_row(row: dict[str, str], n: int) -> Row:
    # Philly rows have no id; the data row number is stable for a given file.
    return Row(
        job_id=f"philly-{n}",
        submit=datetime.fromisoformat(row["timestamp"]),
        duration_s=float(row["duration"]),
        num_gpus=int(row["num_gpus"]),
        tenant=row["cluster"] or DEFAULT_TENANT,
    )


def _tiresias_row(row: dict[str, str], n: int) -> Row:
    return Row(
        job_id=f"j{row['job_id']}",
        submit=float(row["submit_time"]),
        duration_s=float(row["duration"]),
        num_gpus=int(row["num_gpu"]),
        tenant=row.get("user") or DEFAULT_TENANT,
    )


def _canonical_row(row: dict[str, str], n: int) -> Row:
    return Row(
        job_id=row["job_id"],
        submit=float(row["submit_s"]),
        duration_s=float(row["duration_s"]),
        num_gpus=int(row["num_gpus"]),
        tenant=row["tenant"] or DEFAULT_TENANT,
        priority=int(row["priority"]) if row.get("priority") else 0,
    )


_REQUIRED = {
    "philly": ("timestamp", "duration", "num_gpus", "cluster"),
    "tiresias": ("job_id", "num_gpu", "submit_time", "duration"),
    "csv": CANONICAL_HEADER,
}


def detect_format(fields: list[str]) -> str:
    """The importer whose required columns the header has."""
    for name, required in _REQUIRED.items():
        if all(c in fields for c in required):
            return name
    raise ValueError(
        "unknown trace format; header needs one of: "
        + "; ".join(f"{k}: {','.join(v)}" for k, v in _REQUIRED.items())
    )


def _rows(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line, comments included."""
    with path.open(newline="") as f:
        yield from enumerate(f, start=1)


def load(path: Path, fmt: str = "auto", *, skip_bad: bool = False) -> Trace:
    """Read a trace in any known format, sorted by submit time (file order breaks ties)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.is_file():
        raise TraceError(f"trace not found: {path}")
    origin: datetime | None = None
    numbers: list[int] = []
    body: list[str] = []
    for n, text in _rows(path):
        m = _ORIGIN.match(text.strip())
        if m:
            try:
                origin = datetime.fromisoformat(m.group(1))
            except ValueError:
                raise TraceFormatError(path, n, f"bad origin {m.group(1)!r}") from None
            continue
        if text.startswith("#") or not text.strip():
            continue
        numbers.append(n)
        body.append(text)
    if not body:
        raise TraceFormatError(path, 0, "empty file (no header)")
    reader = csv.reader(body)
    header = [h.strip() for h in next(reader)]
    try:
        kind = detect_format(header) if fmt == "auto" else fmt
    except ValueError as exc:
        raise TraceFormatError(path, numbers[0], str(exc)) from None
    missing = [c for c in _REQUIRED[kind] if c not in header]
    if missing:
        raise TraceFormatError(
            path, numbers[0], f"not a {kind} trace: missing column(s) {', '.join(missing)}"
        )
    parsed: list[Row] = []
    parser = _PARSERS[kind]
    skipped = 0
    seen: set[str] = set()
    for k, values in enumerate(reader, start=1):
        line = numbers[k]
        try:
            if len(values) != len(header):
                raise ValueError(f"{len(values)} fields, header has {len(header)}")
            row = dict(zip(header, values, strict=True))
            job = parser(row, k)
            _check(job, seen)
        except (KeyError, ValueError) as exc:
            if skip_bad:
                skipped += 1
                continue
            raise TraceFormatError(path, line, f"bad row ({exc})") from None
        seen.add(job.job_id)
        parsed.append(job)
    return _build(parsed, origin, f"{path.name} ({kind})", skipped)


def _check(job: Row, seen: set[str]) -> None:
    if not job.job_id:
        raise ValueError("empty job id")
    if job.job_id in seen:
        raise ValueError(f"duplicate job id {job.job_id!r}")
    if not (math.isfinite(job.duration_s) and job.duration_s >= 0):
        raise ValueError(f"duration must be finite and >= 0, got {job.duration_s}")
    if job.num_gpus < 1:
        raise ValueError(f"GPUs must be at least 1, got {job.num_gpus}")
    if isinstance(job.submit, float) and not (math.isfinite(job.submit) and job.submit >= 0):
        raise ValueError(f"submit time must be finite and >= 0, got {job.submit}")


_PARSERS: dict[str, RowParser] = {
    "philly": _philly_row,
    "tiresias": _tiresias_row,
    "csv": _canonical_row,
}


def _build(rows: list[Row], origin: datetime | None, source: str, skipped: int) -> Trace:
    stamps = [r.submit for r in rows]
    if any(isinstance(s, datetime) for s in stamps):
        # Wall-clock submits (philly): the trace starts at the earliest one.
        dates = [s for s in stamps if isinstance(s, datetime)]
        origin = min(dates)
        submit = np.array(
            [(s - origin).total_seconds() if isinstance(s, datetime) else s for s in stamps],
            dtype=np.float64,
        )
    else:
        submit = np.array(stamps, dtype=np.float64)
    order = np.argsort(submit, kind="stable")
    return Trace(
        tuple(rows[i].job_id for i in order),
        submit[order],
        np.array([rows[i].duration_s for i in order], dtype=np.float64),
        np.array([rows[i].num_gpus for i in order], dtype=np.int32),
        tuple(rows[i].tenant for i in order),
        np.array([rows[i].priority for i in order], dtype=np.int32),
        origin,
        source,
        skipped,
    )


def prepare(
    path: Path,
    fmt: str = "auto",
    *,
    window: str | None = None,
    load_scale: float = 1.0,
    max_jobs: int = 0,
    skip_bad: bool = False,
) -> Trace:
    """Load, cut to a window, scale the load and keep the first ``max_jobs`` (0: all)."""
    trace = load(path, fmt, skip_bad=skip_bad)
    if window:
        trace = trace.window(Window.parse(window))
    trace = trace.scale_load(load_scale)
    if max_jobs:
        trace = trace.head(max_jobs)
    return trace
