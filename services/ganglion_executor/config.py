"""Executor configuration: flags (and ``GANGLION_NATS_URL``) into a frozen dataclass."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path

from ganglion.bus import check_host_name

DEFAULT_PORT = 50061
DEFAULT_CACHE_BYTES = 10 << 30
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})


def default_state_dir(host: str) -> Path:
    return Path.home() / ".local" / "state" / "ganglion" / f"executor-{host}"


@dataclass(frozen=True)
class ExecutorConfig:
    host: str
    """Name of this host in plans, events and the hosts bucket."""
    state_dir: Path
    """Ledger, job logs (``logs/``) and job exit files (``exit/``); must survive restarts."""
    port: int = DEFAULT_PORT
    """gRPC port; 0 picks a free one (printed in the ready line)."""
    bind: str = "127.0.0.1"
    """Address the gRPC server binds."""
    advertise: str = ""
    """``host:port`` registered for the controller; empty derives it from ``bind`` and the port."""
    backend: str = "auto"
    """GPU discovery: ``auto`` (NVML, simulated GPUs without a driver), ``nvml`` or ``sim``."""
    sim_gpus: int = 4
    """Number of simulated GPUs when the backend is (or falls back to) ``sim``."""
    grace_s: float = 5.0
    """Default seconds between SIGTERM and SIGKILL when a job is preempted."""
    stop_jobs_on_exit: bool = False
    """Preempt every job on shutdown; by default jobs keep running and are re-adopted on restart."""
    register_interval_s: float = 3.0
    """Seconds between refreshes of this executor's key in the hosts bucket (TTL 15 s)."""
    poll_interval_s: float = 0.2
    """Seconds between liveness checks of each job process."""
    shutdown_grace_s: float = 2.0
    """Seconds in-flight RPCs get to finish on shutdown."""
    cache_bytes: int = DEFAULT_CACHE_BYTES
    """Byte budget of the host's blob cache in ``<state_dir>/cache``."""
    cache_policy: str = "s3fifo"
    """Eviction policy of the cache: ``s3fifo``, ``lru`` or ``arc``."""
    origin: str = ""
    """TransferService ``host:port`` that misses not found at peers are fetched from."""
    metrics_port: int | None = None
    """Prometheus ``/metrics`` port for cache metrics (0: a free one; None: not served)."""
    metrics_addr: str = "127.0.0.1"
    """Address ``/metrics`` binds."""
    cache_stats_interval_s: float = 10.0
    """Seconds between CacheStats messages on ``ganglion.telemetry.<host>.cache``."""
    decision_addr: str = ""
    """Decision service asked for cache budgets and transport settings; empty: never asked."""
    tune_interval_s: float = 60.0
    """Seconds between SizeCaches/TuneTransport rounds."""
    link_bandwidth: float = 0.0
    """Bytes/s of this host's link, for TuneTransport; 0 (unknown) skips transport tuning."""

    def local_address(self, port: int) -> str:
        """Where a client on this machine reaches the server (the ready line prints it)."""
        host = "127.0.0.1" if self.bind in _WILDCARDS else self.bind
        return f"{host}:{port}"

    def advertise_address(self, port: int) -> str:
        """The address registered in the hosts bucket."""
        if self.advertise:
            return self.advertise
        if self.bind in _WILDCARDS:
            return f"{socket.gethostname()}:{port}"
        return f"{self.bind}:{port}"


def _non_negative(value: str) -> float:
    f = float(value)
    if not f >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return f


def _byte_size(value: str) -> int:
    """``123``, ``512M``, ``10G``, ``1.5T`` (binary units) -> bytes."""
    v = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = v[-1:] if v[-1:] in _SIZE_SUFFIXES else ""
    try:
        n = float(v[: len(v) - len(unit)]) * _SIZE_SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {value!r}") from None
    if not n >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return int(n)


def parse_args(argv: list[str] | None = None) -> ExecutorConfig:
    p = argparse.ArgumentParser(
        prog="ganglion-executor",
        description="Runs the jobs that allocation plans assign to this GPU host.",
        epilog="On SIGTERM the server stops but job processes keep running; a restarted "
        "executor on the same --state-dir re-adopts them (use --stop-jobs-on-exit to preempt "
        "them instead). NATS: $GANGLION_NATS_URL, else an embedded nats-server.",
    )
    p.add_argument("--host", default=socket.gethostname(), help="host name (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: a free one)")
    p.add_argument("--bind", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--advertise", default="", help="host:port registered for the controller")
    p.add_argument("--state-dir", type=Path, default=None, help="ledger, logs and exit files")
    p.add_argument(
        "--backend", choices=("auto", "nvml", "sim"), default="auto", help="GPU discovery"
    )
    p.add_argument("--sim-gpus", type=int, default=4, help="simulated GPU count (default 4)")
    p.add_argument(
        "--grace", type=_non_negative, default=5.0, help="preemption grace, s (default 5)"
    )
    p.add_argument("--stop-jobs-on-exit", action="store_true", help="preempt all jobs on shutdown")
    p.add_argument(
        "--cache-bytes",
        type=_byte_size,
        default=DEFAULT_CACHE_BYTES,
        help="blob cache budget, e.g. 500G (default 10G)",
    )
    p.add_argument(
        "--cache-policy", choices=("s3fifo", "lru", "arc"), default="s3fifo", help="eviction"
    )
    p.add_argument("--origin", default="", help="TransferService host:port to fetch misses from")
    p.add_argument(
        "--metrics-port", type=int, default=0, help="cache /metrics port (0: a free one, -1: off)"
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address /metrics binds")
    p.add_argument(
        "--cache-stats-interval",
        type=_non_negative,
        default=10.0,
        help="seconds between CacheStats on NATS (default 10)",
    )
    p.add_argument(
        "--decision-addr", default="", help="decision service for cache/transport tuning"
    )
    p.add_argument(
        "--tune-interval", type=_non_negative, default=60.0, help="seconds between tuning rounds"
    )
    p.add_argument(
        "--link-bandwidth",
        type=_byte_size,
        default=0,
        help="link bytes/s for TuneTransport, e.g. 1.25G (default 0: no transport tuning)",
    )
    a = p.parse_args(argv)
    if not 0 <= a.port <= 65535:
        p.error(f"--port must be in 0..65535, got {a.port}")
    if not -1 <= a.metrics_port <= 65535:
        p.error(f"--metrics-port must be in -1..65535, got {a.metrics_port}")
    if a.cache_stats_interval <= 0:
        p.error("--cache-stats-interval must be > 0")
    if a.sim_gpus < 0:
        p.error(f"--sim-gpus must be >= 0, got {a.sim_gpus}")
    try:
        check_host_name(a.host)  # as sensing: it names subjects and KV keys
    except ValueError as exc:
        p.error(f"--host: {exc}")
    state_dir: Path = a.state_dir if a.state_dir is not None else default_state_dir(a.host)
    return ExecutorConfig(
        host=a.host,
        state_dir=state_dir.expanduser(),
        port=a.port,
        bind=a.bind,
        advertise=a.advertise,
        backend=a.backend,
        sim_gpus=a.sim_gpus,
        grace_s=a.grace,
        stop_jobs_on_exit=a.stop_jobs_on_exit,
        cache_bytes=a.cache_bytes,
        cache_policy=a.cache_policy,
        origin=a.origin,
        metrics_port=None if a.metrics_port < 0 else a.metrics_port,
        metrics_addr=a.metrics_addr,
        cache_stats_interval_s=a.cache_stats_interval,
        decision_addr=a.decision_addr,
        tune_interval_s=a.tune_interval or 60.0,
        link_bandwidth=float(a.link_bandwidth),
    )
