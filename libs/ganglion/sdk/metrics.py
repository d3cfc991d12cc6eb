"""Job metrics: validation, the typed record, the latest-per-job book, and where they go.

``Scheduler.update({"throughput": 812.0, "loss": 0.41})`` validates the values (names
non-empty strings, values finite real numbers), records them in :data:`BOOK` (the latest record
per job, readable with :func:`latest_metrics`) and sends them on:

- with NATS (``GANGLION_NATS_URL``, ``nats_url=``, or cluster mode): a ``JobMetrics`` protobuf
  on ``ganglion.telemetry.<host>.jobs.<job_id>``, stored by the telemetry JetStream stream;
- without NATS: one JSON line per update appended to ``<state dir>/metrics.jsonl``.

A consumer in another process (the learned policies' features and reward) keeps its own
:class:`MetricsBook` fed from NATS with :func:`follow_job_metrics`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from ganglion.bus import TELEMETRY_SUBJECT
from ganglion.v1 import telemetry_pb2

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

TYPE_HEADER = "Ganglion-Type"
JOB_METRICS_TYPE = "ganglion.v1.JobMetrics"
WELL_KNOWN = ("throughput", "step_time_s", "loss", "accuracy")
"""Names the learned policies look for; any other name is kept and forwarded too."""
MAX_NAME_LEN = 128
MAX_VALUES = 256
METRICS_FILE_MAX_BYTES = 64 * 1024 * 1024
"""The JSON-lines file is rotated to ``metrics.jsonl.1`` beyond this size (it lives in RAM)."""


def job_metrics_subject(host: str, job_id: str) -> str:
    return f"{TELEMETRY_SUBJECT}.{host}.jobs.{job_id}"


def validate_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The metrics as ``{name: float}``; ValueError naming the first bad entry."""
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"metrics must be a mapping of name -> number, got {type(metrics).__name__}"
        )
    if not metrics:
        raise ValueError("metrics is empty: report at least one value")
    if len(metrics) > MAX_VALUES:
        raise ValueError(f"at most {MAX_VALUES} metrics per update, got {len(metrics)}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if len(name) > MAX_NAME_LEN or not name.isprintable():
            raise ValueError(
                f"metric name {name[:40]!r}...: at most {MAX_NAME_LEN} printable characters"
            )
        # bool is an int subclass, but True is no measurement; numbers.Real also admits numpy
        # scalars. A 0-d tensor is refused: pass loss.item().
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"metric {name!r}: expected a real number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r}: expected a finite number, got {number}")
        out[name] = number
    return out


@dataclass(frozen=True)
class JobMetricsRecord:
    """One ``update()`` of one job."""

    job_id: str
    """The reporting job."""
    lease_id: str
    """The lease it held (controller job id in cluster mode); empty when none."""
    host: str
    """Host of the lease's GPUs (or of the process when it held none)."""
    time_s: float
    """Unix seconds."""
    sequence: int
    """1, 2, ... per job (per Scheduler)."""
    values: Mapping[str, float] = field(default_factory=dict)
    """Finite values by name (read-only)."""
    gpu_indices: tuple[int, ...] = ()
    """GPUs held when reported."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def to_proto(self) -> telemetry_pb2.JobMetrics:
        return telemetry_pb2.JobMetrics(
            job_id=self.job_id,
            lease_id=self.lease_id,
            host=self.host,
            time_s=self.time_s,
            sequence=self.sequence,
            values=dict(self.values),
            gpu_indices=list(self.gpu_indices),
        )

    @classmethod
    def from_proto(cls, msg: telemetry_pb2.JobMetrics) -> JobMetricsRecord:
        return cls(
            job_id=msg.job_id,
            lease_id=msg.lease_id,
            host=msg.host,
            time_s=msg.time_s,
            sequence=msg.sequence,
            values=dict(msg.values),
            gpu_indices=tuple(msg.gpu_indices),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "lease_id": self.lease_id,
                "host": self.host,
                "time_s": self.time_s,
                "sequence": self.sequence,
                "values": dict(self.values),
                "gpu_indices": list(self.gpu_indices),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, line: str) -> JobMetricsRecord:
        d = json.loads(line)
        return cls(
            job_id=str(d["job_id"]),
            lease_id=str(d["lease_id"]),
            host=str(d["host"]),
            time_s=float(d["time_s"]),
            sequence=int(d["sequence"]),
            values={str(k): float(v) for k, v in d["values"].items()},
            gpu_indices=tuple(int(g) for g in d["gpu_indices"]),
        )


class MetricsBook:
    """The latest metrics record per job (thread-safe). Older records are replaced."""

    def __init__(self) -> None:
        self._latest: dict[str, JobMetricsRecord] = {}
        self._lock = threading.Lock()

    def observe(self, record: JobMetricsRecord) -> None:
        with self._lock:
            old = self._latest.get(record.job_id)
            # Out-of-order delivery (a redelivered older message) must not roll values back.
            if old is None or record.sequence >= old.sequence or record.time_s > old.time_s:
                self._latest[record.job_id] = record

    def latest(self, job_id: str) -> JobMetricsRecord | None:
        with self._lock:
            return self._latest.get(job_id)

    def snapshot(self) -> dict[str, JobMetricsRecord]:
        with self._lock:
            return dict(self._latest)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._latest.pop(job_id, None)


BOOK = MetricsBook()
"""Every ``update()`` made in this process lands here."""


def latest_metrics(job_id: str | None = None) -> dict[str, JobMetricsRecord]:
    """The latest record per job reported from this process (one job when ``job_id`` is given)."""
    if job_id is None:
        return BOOK.snapshot()
    record = BOOK.latest(job_id)
    return {job_id: record} if record is not None else {}


async def follow_job_metrics(nc: NatsClient, book: MetricsBook) -> Subscription:
    """Feed ``book`` with every ``JobMetrics`` published on NATS from now on (core subscription:
    for history, read the telemetry stream). Returns the subscription to unsubscribe."""

    async def on_msg(msg: Msg) -> None:
        if (msg.headers or {}).get(TYPE_HEADER) != JOB_METRICS_TYPE:
            return  # a TelemetryBatch from sensing
        try:
            book.observe(JobMetricsRecord.from_proto(telemetry_pb2.JobMetrics.FromString(msg.data)))
        except Exception:
            log.warning("undecodable JobMetrics on %s", msg.subject, exc_info=True)

    return await nc.subscribe(f"{TELEMETRY_SUBJECT}.>", cb=on_msg)


class FileSink:
    """Appends records as JSON lines (one ``write`` each, ``O_APPEND``: lines never interleave)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: JobMetricsRecord) -> None:
        data = (record.to_json() + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > METRICS_FILE_MAX_BYTES:
                # Two processes may race to rotate; the loser's replace just moves a fresh file.
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))


def read_metrics_file(path: Path) -> list[JobMetricsRecord]:
    """Every record in a metrics file, oldest first."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [JobMetricsRecord.from_json(line) for line in text.splitlines() if line.strip()]
